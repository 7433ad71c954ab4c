"""Rotary position embedding applied to q and k in one launch: one program per (batch, position)
rotates every head of q and of k there, reading cos/sin once. The arithmetic is transformers'
`q * cos + rotate_half(q) * sin` in the input dtype: each product and the sum rounded to it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(
    x_ptr,
    out_ptr,
    x_strides,
    out_strides,
    b,
    s,
    n_heads,
    cos1,
    cos2,
    sin1,
    sin2,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    valid = (heads < n_heads) & (cols < half)
    xs0, xs1, xs2, xs3 = x_strides
    os0, os1, os2, os3 = out_strides
    base = x_ptr + b * xs0 + s * xs2 + heads * xs1
    x1 = tl.load(base + cols * xs3, mask=valid, other=0.0)
    x2 = tl.load(base + (cols + half) * xs3, mask=valid, other=0.0)
    dt = x1.dtype
    # first half: x1*cos - x2*sin; second half: x2*cos + x1*sin; every step rounded to the dtype
    a1 = (x1.to(tl.float32) * cos1).to(dt).to(tl.float32)
    b1 = (x2.to(tl.float32) * sin1).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * cos2).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * sin2).to(dt).to(tl.float32)
    out = out_ptr + b * os0 + s * os2 + heads * os1
    tl.store(out + cols * os3, (a1 - b1).to(dt), mask=valid)
    tl.store(out + (cols + half) * os3, (a2 + b2).to(dt), mask=valid)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out,
    k_out,
    seq,
    q_heads,
    k_heads,
    half,
    qs0,
    qs1,
    qs2,
    qs3,
    ks0,
    ks1,
    ks2,
    ks3,
    qo0,
    qo1,
    qo2,
    qo3,
    ko0,
    ko1,
    ko2,
    ko3,
    cs0,
    cs1,
    cs2,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // seq, pid % seq
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    cvalid = cols < half
    trig = b * cs0 + s * cs1
    cos1 = tl.load(cos_ptr + trig + cols * cs2, mask=cvalid, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + trig + (cols + half) * cs2, mask=cvalid, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + trig + cols * cs2, mask=cvalid, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + trig + (cols + half) * cs2, mask=cvalid, other=0.0).to(tl.float32)
    _rotate(
        q_ptr,
        q_out,
        (qs0, qs1, qs2, qs3),
        (qo0, qo1, qo2, qo3),
        b,
        s,
        q_heads,
        cos1,
        cos2,
        sin1,
        sin2,
        half,
        BLOCK_QH,
        BLOCK_HALF,
    )
    _rotate(
        k_ptr,
        k_out,
        (ks0, ks1, ks2, ks3),
        (ko0, ko1, ko2, ko3),
        b,
        s,
        k_heads,
        cos1,
        cos2,
        sin1,
        sin2,
        half,
        BLOCK_KH,
        BLOCK_HALF,
    )


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (batch, heads, seq, head_dim), k (batch, kv_heads, seq, head_dim), any strides; cos/sin
    (batch or 1, seq, head_dim). Returns new contiguous q and k (or writes `out`, a pair like them)."""
    batch, q_heads, seq, head_dim = q.shape
    cos, sin = cos.expand(batch, seq, head_dim), sin.expand(batch, seq, head_dim)
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if out is None:
        out = (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
        )
    q_out, k_out = out
    half = head_dim // 2
    _rope_kernel[(batch * seq,)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        seq,
        q_heads,
        k.shape[1],
        half,
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        *cos.stride(),
        BLOCK_QH=triton.next_power_of_2(q_heads),
        BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
    )
    return q_out, k_out
