"""`python -m minivlm.kernels.bench` (also `python -m minivlm bench kernels`): each Triton kernel
against the plain PyTorch definition it replaces (torch eager) and, for attention, torch's
`scaled_dot_product_attention` with the flash backend, on the shapes of the real checkpoints.
Prints time, achieved GB/s or TFLOP/s, the ratio, and the device's measured copy bandwidth,
which the memory-bound kernels are judged against. CUDA only: the CPU interpreter is for tests.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _time(fn, repeats: int = 50) -> float:
    """Best seconds of one call on the GPU (minivlm.bench's timer, synchronising after each call)."""
    from minivlm.bench import time_call

    return time_call(fn, repeats, "cuda")


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _time(lambda: dst.copy_(src), 20) / 1e9


def _row(name: str, seconds: float, amount: float, unit: str, baseline: dict[str, float]) -> None:
    ratios = "  ".join(f"{base / seconds:5.2f}x {label}" for label, base in baseline.items())
    rate = amount / seconds / (1e12 if unit == "TFLOP/s" else 1e9)
    print(f"{name:44s} {seconds * 1e6:9.1f} us  {rate:8.1f} {unit}  {ratios}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minivlm.kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    run(p.parse_args(argv))


def run(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "minivlm: error: bench kernels needs a CUDA device (the CPU interpreter is for tests, not timing)"
        )
    from minivlm import ops

    dtype = DTYPES[args.dtype]
    dev = "cuda"
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, {args.dtype}; measured copy bandwidth {bandwidth:.0f} GB/s")
    print("kernel vs torch eager (the ops.py definition) and torch SDPA where it applies")

    for tokens, hidden in [(1, 4096), (4096, 4096), (729 * 5, 1152)]:
        x = torch.randn(tokens, hidden, dtype=dtype, device=dev)
        w = torch.randn(hidden, dtype=dtype, device=dev)
        b = torch.randn(hidden, dtype=dtype, device=dev)
        moved = 2 * x.numel() * x.element_size()
        fast = _time(lambda: ops.rms_norm(x, w, 1e-6, kernels="on"))
        _row(
            f"rms_norm {tokens}x{hidden}",
            fast,
            moved,
            "GB/s",
            {"eager": _time(lambda: ops.rms_norm(x, w, 1e-6, kernels="off"))},
        )
        fast = _time(lambda: ops.layer_norm(x, w, b, 1e-6, kernels="on"))
        _row(
            f"layer_norm {tokens}x{hidden}",
            fast,
            moved,
            "GB/s",
            {"eager": _time(lambda: ops.layer_norm(x, w, b, 1e-6, kernels="off"))},
        )

    for seq in (1, 4096):
        q = torch.randn(1, seq, 32, 128, dtype=dtype, device=dev).transpose(1, 2)
        k = torch.randn(1, seq, 8, 128, dtype=dtype, device=dev).transpose(1, 2)
        cos, sin = (torch.randn(1, seq, 128, dtype=dtype, device=dev) for _ in range(2))
        moved = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * cos.element_size()
        fast = _time(lambda: ops.apply_rope(q, k, cos, sin, kernels="on"))
        _row(
            f"rope q 32x{seq}x128, k 8x{seq}x128",
            fast,
            moved,
            "GB/s",
            {"eager": _time(lambda: ops.apply_rope(q, k, cos, sin, kernels="off"))},
        )

    # prefill: (batch, heads, kv_heads, tokens, head_dim, causal)
    for batch, heads, kv_heads, tokens, head_dim, causal in [
        (1, 32, 8, 4096, 128, True),
        (1, 14, 2, 2048, 64, True),
        (5, 16, 16, 729, 72, False),
        (2, 16, 16, 577, 64, False),
    ]:
        q = torch.randn(batch, heads, tokens, head_dim, dtype=dtype, device=dev)
        k = torch.randn(batch, kv_heads, tokens, head_dim, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        flops = 4 * batch * heads * tokens * tokens * head_dim / (2 if causal else 1)
        fast = _time(lambda: ops.attention(q, k, v, causal=causal, kernels="on"))
        base = {"eager": _time(lambda: ops.attention(q, k, v, causal=causal, kernels="off"))}
        try:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=heads != kv_heads)  # noqa: E731
                base["sdpa flash"] = _time(sdpa)
        except RuntimeError as e:  # a head dim the flash backend does not take
            print(f"  (sdpa flash unavailable: {str(e).splitlines()[0][:80]})")
        _row(
            f"attention b{batch} h{heads}/{kv_heads} {tokens} d{head_dim} {'causal' if causal else 'full'}",
            fast,
            flops,
            "TFLOP/s",
            base,
        )

    # decode: one query per head against a cache of kv_len filled slots, Llama-3-8B's heads
    for kv_len in (1024, 8192, 32768):
        q = torch.randn(1, 32, 1, 128, dtype=dtype, device=dev)
        k = torch.randn(1, 8, kv_len, 128, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        slot = torch.tensor([kv_len - 1], device=dev)
        moved = 2 * k.numel() * k.element_size()
        fast = _time(lambda: ops.decode_attention(q, k, v, slot, kernels="on"))
        base = {
            "eager": _time(lambda: ops.attention(q, k, v, causal=True, q_offset=kv_len - 1, kernels="off")),
            "one block per KV head": _time(
                lambda: ops.attention(q, k, v, causal=True, q_offset=kv_len - 1, kernels="on")
            ),
            "sdpa": _time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
        }
        _row(f"decode attention (split-KV) h32/8 kv {kv_len} d128", fast, moved, "GB/s", base)
        print(f"  ({moved / fast / 1e9 / bandwidth:.0%} of the copy bandwidth)")


if __name__ == "__main__":
    main()
