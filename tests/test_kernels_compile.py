"""Every kernel compiles for real NVIDIA targets (sm_80, sm_90), ahead of time, on any machine:
triton lowers it to PTX and runs its bundled ptxas, no GPU needed. The CPU interpreter that the
other kernel tests use accepts code the compiler refuses (globals that are not constexpr, some
dtype mixes), so without this a kernel could pass every test here and fail on its first GPU.

The compiler cannot run in a process where TRITON_INTERPRET=1 (conftest.py sets it on machines
without a GPU), so the test runs this file as a script in a fresh process without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def ints(*names: str) -> dict:
    return {name: "i32" for name in names}


def cases():
    """(name, kernel, signature, constexprs) for each kernel at the dtypes and shapes that matter."""
    import triton
    from minivlm.kernels import attention, norms, rope

    for dtype in ("bf16", "fp16", "fp32"):
        rows = {
            "x_ptr": f"*{dtype}",
            "w_ptr": f"*{dtype}",
            "out_ptr": f"*{dtype}",
            **ints("n_cols", "x_row_stride", "out_row_stride"),
            "eps": "fp32",
        }
        yield f"rms_norm {dtype}", norms._rms_norm_kernel, rows, {"BLOCK": 4096}
        yield f"layer_norm {dtype}", norms._layer_norm_kernel, {**rows, "b_ptr": f"*{dtype}"}, {"BLOCK": 2048}
    for dtype, half in (("bf16", 64), ("fp16", 36), ("fp32", 40)):
        strides = ints(*(f"{t}{i}" for t in ("qs", "ks", "qo", "ko") for i in range(4)), "cs0", "cs1", "cs2")
        signature = {
            "q_ptr": f"*{dtype}",
            "k_ptr": f"*{dtype}",
            "cos_ptr": f"*{dtype}",
            "sin_ptr": f"*{dtype}",
            "q_out": f"*{dtype}",
            "k_out": f"*{dtype}",
            **ints("seq", "q_heads", "k_heads", "half"),
            **strides,
        }
        yield (
            f"rope {dtype} half {half}",
            rope._rope_kernel,
            signature,
            {"BLOCK_QH": 32, "BLOCK_KH": 8, "BLOCK_HALF": triton.next_power_of_2(half)},
        )
    for dtype, head_dim, block_m, causal, valid, window in [
        ("bf16", 128, 64, True, True, False),
        ("fp16", 72, 16, True, False, True),
        ("bf16", 80, 64, False, True, False),
        ("fp32", 64, 16, True, True, True),
    ]:
        strides = ints(*(f"{t}{i}" for t in ("qs", "ks", "vs", "os") for i in range(4)), "valid_s0")
        signature = {
            "q_ptr": f"*{dtype}",
            "k_ptr": f"*{dtype}",
            "v_ptr": f"*{dtype}",
            "out_ptr": f"*{dtype}",
            "valid_ptr": "*i8",
            **strides,
            **ints("kv_heads", "groups", "q_len", "kv_len", "q_offset", "window"),
            "scale": "fp32",
        }
        constexprs = {
            "CAUSAL": causal,
            "HAS_VALID": valid,
            "HAS_WINDOW": window,
            "FP32_DOT": dtype == "fp32",
            "HEAD_DIM": head_dim,
            "BLOCK_D": triton.next_power_of_2(head_dim),
            "BLOCK_M": block_m,
            "BLOCK_N": 64,
        }
        yield f"attention {dtype} d{head_dim} m{block_m}", attention._attention_kernel, signature, constexprs


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = 0
    for arch in (80, 90):
        for name, kernel, signature, constexprs in cases():
            signature = {**signature, **{k: "constexpr" for k in constexprs}}
            try:
                source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
                assert compiled.asm["cubin"], "no cubin"
            except Exception as e:  # noqa: BLE001  (report every kernel, then fail)
                failed += 1
                print(f"FAILED sm_{arch} {name}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"compiled, {failed} failed")
    return 1 if failed else 0


def test_every_kernel_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton", reason="the kernels need triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9 warns when it is unset
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


if __name__ == "__main__":
    sys.exit(main())
