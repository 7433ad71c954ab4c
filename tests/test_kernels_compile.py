"""Every kernel launch the seed checkpoints make compiles for real NVIDIA targets (sm_80, sm_90),
ahead of time, on any machine, without register spills, and the kernels that loop over keys copy
them asynchronously (cp.async, the software pipeline). No GPU is needed: triton lowers each kernel
to PTX and runs its bundled ptxas, whose report (`ptxas -v`) gives the registers, the stack frame
and the bytes of spill stores and loads; the PTX shows the copies.

Each launch is the real one: the wrappers in minivlm.kernels run on (uninitialised, CPU) tensors
of the checkpoint's shapes and dtype, their launch is caught instead of run, and triton's own
runtime binder specialises it as it would on a GPU: which integer arguments are multiples of 16,
which pointers are 16-byte aligned. That is what decides vector loads and alignment, so compiling
with hand-written signatures (as this test did before) missed that head_dim 72 spilled (255
registers, 632 bytes of stack, scalar loads), which passing strides in units of 8 fixed.

The seeds run half precision on a GPU: bf16 and fp16 are checked. fp32 (which the kernels compute
with fp32-exact products on the FMA units, in smaller tiles) compiles too, but some of its
configurations spill a little; `python tests/test_kernels_compile.py --fp32` lists them.

The CPU interpreter that the other kernel tests use accepts code the compiler refuses (globals
that are not constexpr, some dtype mixes), and the compiler cannot run where TRITON_INTERPRET=1
(conftest.py sets it on machines without a GPU), so the test runs this file as a script in a
fresh process without it (one per target). Run alone (`python tests/test_kernels_compile.py
[--sm80|--sm90] [--fp32]`) it prints the table of registers, stack, shared memory and cp.async for
every launch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

# name -> (vision layer shapes, decoder shapes) of the seed checkpoints, as the kernels see them:
# towers: (views, heads, tokens, head_dim, LayerNorm width, patch mask?);
# decoders: (heads, kv_heads, head_dim, RMSNorm width, sliding window)
TOWERS = {
    "CLIP-L/14-336 (llava-1.5, llava-v1.6)": (5, 16, 577, 64, 1024, False),
    "SigLIP so400m-384 (llava-interleave)": (1, 16, 729, 72, 1152, False),
    "SigLIP so400m NaViT (Idefics3, llama3v)": (2, 16, 676, 72, 1152, True),
    "SigLIP base-512 (SmolVLM)": (2, 12, 1024, 64, 768, True),
}
DECODERS = {
    "Llama-2-7B (llava-1.5)": (32, 32, 128, 4096, None),
    "Mistral-7B (llava-v1.6-mistral)": (32, 8, 128, 4096, None),
    "Qwen2-0.5B (llava-interleave)": (14, 2, 64, 896, None),
    "Llama-3-8B (Idefics3, llama3v)": (32, 8, 128, 4096, None),
    "SmolLM2-1.7B (SmolVLM)": (32, 32, 64, 2048, None),
    "Qwen2 with a sliding window": (14, 2, 64, 896, 4096),
}
PREFILL, CACHE = 1024, 8192  # a prompt, and the cache a decode step reads
# quantized projections (minivlm.quant): (name, out_features, in_features), an MLP's up and down
QUANT = [("Qwen2-0.5B", 4864, 896), ("Qwen2-0.5B", 896, 4864), ("Llama-3-8B", 14336, 4096), ("Llama-3-8B", 4096, 14336)]


def launches(dtypes):
    """(name, kernel, args, kwargs) of every launch the wrappers make at the seed shapes."""
    import torch
    from minivlm.kernels import attention, decode, norms, quant, rope
    from triton.runtime.jit import JITFunction

    from minivlm.quant import QuantLinear

    caught = []

    def catch(kernel, *args, grid, warmup, **kwargs):
        caught.append((kernel, args, kwargs))

    JITFunction.run = catch  # the launch is caught, not run (there is no GPU to run it on)

    def run(name, fn, *args, **kwargs):
        """fn's launches, each named after `name` and its kernel."""
        start = len(caught)
        fn(*args, **kwargs)
        for i in range(start, len(caught)):
            kernel, args, kwargs = caught[i]
            caught[i] = (f"{name}: {kernel.fn.__name__.strip('_')}", kernel, args, kwargs)

    empty = torch.empty
    for dtype in dtypes:
        d = str(dtype).removeprefix("torch.")
        for tower, (views, heads, tokens, head_dim, width, masked) in TOWERS.items():
            x = empty(views, tokens, width, dtype=dtype)
            run(
                f"{tower} {d} LayerNorm",
                norms.layer_norm,
                x,
                empty(width, dtype=dtype),
                empty(width, dtype=dtype),
                1e-6,
            )
            # (views, tokens, heads * head_dim) -> (views, heads, tokens, head_dim), as vision.py
            q = empty(views, tokens, heads * head_dim, dtype=dtype).view(views, tokens, heads, head_dim).transpose(1, 2)
            valid = torch.ones(views, tokens, dtype=torch.bool) if masked else None
            run(f"{tower} {d} attention", attention.attention, q, q, q, causal=False, kv_valid=valid)
        for decoder, (heads, kv_heads, head_dim, width, window) in DECODERS.items():
            run(
                f"{decoder} {d} RMSNorm",
                norms.rms_norm,
                empty(1, PREFILL, width, dtype=dtype),
                empty(width, dtype=dtype),
                1e-5,
            )
            for seq in (PREFILL, 1):
                q = empty(1, seq, heads, head_dim, dtype=dtype).transpose(1, 2)
                k = empty(1, seq, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
                cos = empty(1, seq, head_dim, dtype=dtype)
                run(f"{decoder} {d} RoPE {seq} token(s)", rope.apply_rope, q, k, cos, cos)
            q = empty(1, heads, PREFILL, head_dim, dtype=dtype)
            kv = empty(1, kv_heads, PREFILL, head_dim, dtype=dtype)
            for valid in (None, torch.ones(1, PREFILL, dtype=torch.bool)):
                what = "prefill" + (", left-padded" if valid is not None else "")
                run(f"{decoder} {d} {what}", attention.attention, q, kv, kv, causal=True, kv_valid=valid, window=window)
            q1 = empty(1, heads, 1, head_dim, dtype=dtype)
            cache = empty(1, kv_heads, CACHE, head_dim, dtype=dtype)
            run(f"{decoder} {d} one token, forward", attention.attention, q1, cache, cache, causal=True,
                q_offset=CACHE - 1, window=window)  # fmt: skip
            slot = torch.tensor([CACHE // 2])
            for valid in (None, torch.ones(1, CACHE, dtype=torch.bool)):
                what = "decode step" + (", left-padded" if valid is not None else "")
                run(f"{decoder} {d} {what}", decode.decode_attention, q1, cache, cache, slot, kv_valid=valid,
                    window=window)  # fmt: skip
        for model, out_features, in_features in QUANT:
            for scheme, group in (("int8", 64), ("int4", 64), ("int4", 128)):
                layer = QuantLinear(in_features, out_features, False, scheme, group, dtype)
                for rows in (1, PREFILL):
                    name = f"{model} {d} {scheme} g{group} {out_features}x{in_features}, {rows} row(s)"
                    run(name, quant.quant_linear, empty(rows, in_features, dtype=dtype), layer)
    return caught


_COMPILED: dict = {}  # compile_launch's results by specialisation


def compile_launch(kernel, args, kwargs, arch: int):
    """The launch compiled for sm_`arch` with the runtime's specialisation of these arguments, and
    ptxas's report on it (registers, stack frame, spill stores and loads)."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    # Launches that specialise alike (Mistral-7B's and Llama-3-8B's decoders, one RMSNorm width in
    # several models, ...) compile to the same kernel: compiled once (half of this test's time).
    key = (kernel.fn.__qualname__, arch, repr(signature), repr(constexprs), repr(attrs), repr(options))
    if key in _COMPILED:
        return _COMPILED[key]
    knobs.nvidia.dump_ptxas_log = True  # triton runs ptxas -v; this prints what it says
    log = io.StringIO()
    # A fresh cache folder: a cached kernel would run no ptxas. The compiled kernel holds its asm in
    # memory, so the folder goes right after (hundreds of them per run otherwise stay in /tmp).
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        previous, knobs.cache.dir = knobs.cache.dir, cache
        try:
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
            )
        finally:
            knobs.cache.dir = previous
    _COMPILED[key] = compiled, usage(log.getvalue())
    return _COMPILED[key]


def usage(ptxas_log: str) -> dict:
    """Registers, stack frame and spill bytes from `ptxas -v`."""
    found = {
        "regs": re.search(r"Used (\d+) registers", ptxas_log),
        "stack": re.search(r"(\d+) bytes stack frame", ptxas_log),
        "spill_stores": re.search(r"(\d+) bytes spill stores", ptxas_log),
        "spill_loads": re.search(r"(\d+) bytes spill loads", ptxas_log),
    }
    missing = [k for k, m in found.items() if m is None]
    assert not missing, f"ptxas -v did not report {missing}:\n{ptxas_log}"
    return {k: int(m.group(1)) for k, m in found.items()}


LOOPS_OVER_KEYS = ("attention_kernel", "decode_split_kernel", "quant_matmul_kernel")  # must pipeline their loads


def main() -> int:
    import torch

    dtypes = (torch.float32,) if "--fp32" in sys.argv else (torch.bfloat16, torch.float16)
    archs = [int(a.removeprefix("--sm")) for a in sys.argv if a.startswith("--sm")] or [80, 90]
    failed, seen = 0, set()
    print(f"{'launch':<78}{'sm':>4}{'regs':>6}{'spill B':>9}{'stack B':>9}{'smem KiB':>10}{'cp.async':>10}")
    for name, kernel, args, kwargs in launches(dtypes):
        for arch in archs:
            try:
                compiled, use = compile_launch(kernel, args, kwargs, arch)
            except Exception as e:  # noqa: BLE001  (report every launch, then fail)
                failed += 1
                print(f"FAILED sm_{arch} {name}: {type(e).__name__}: {str(e)[:2000]}")
                continue
            key = (compiled.hash, arch)  # launches that compile to the same kernel: one row
            if key in seen:
                continue
            seen.add(key)
            pipelined = "cp.async" in compiled.asm["ptx"]
            problems = []
            spilled = use["spill_stores"] + use["spill_loads"]
            if spilled:
                problems.append(f"spills ({use['spill_stores']} B stored, {use['spill_loads']} B loaded)")
            if any(k in name for k in LOOPS_OVER_KEYS) and not pipelined:
                problems.append("no cp.async in a loop over keys")
            print(f"{name[:78]:<78}{arch:>4}{use['regs']:>6}{spilled:>9}{use['stack']:>9}"
                  f"{compiled.metadata.shared / 1024:>10.1f}{'yes' if pipelined else '-':>10}"
                  + (f"  FAILED: {'; '.join(problems)}" if problems else ""))  # fmt: skip
            failed += bool(problems)
    print(f"{len(seen)} kernels compiled, {failed} failed")
    return 1 if failed else 0


def test_every_launch_compiles_for_sm80_and_sm90_without_spills():
    pytest.importorskip("triton", reason="the kernels need triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when it is unset
    # One process per target, side by side: compiling is most of this suite's longest test, and
    # the rest of the suite runs on one core.
    runs = [
        subprocess.Popen([sys.executable, __file__, f"--sm{arch}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
        for arch in (80, 90)
    ]  # fmt: skip
    for run in runs:
        stdout, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stdout[-6000:] + stderr[-3000:]


if __name__ == "__main__":
    sys.exit(main())
