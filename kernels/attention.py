"""Flash attention (forward): the scores never leave the chip. Causal (the decoder) or not (the
vision tower), grouped KV heads, a padding mask over the keys, a query offset into a KV cache and
a sliding window: the rules of `minivlm.ops.attention_mask`.

One program takes BLOCK_M rows of one KV head's query group: row r is query head
`kv_head * groups + r // q_len` at position `r % q_len`. Packing the group's heads into rows lets
a decode step (q_len 1) fill a block from the 4-8 query heads that share the KV head, so each key
block is read once per group, not once per head. Scores and the running softmax are fp32; p is
rounded to the value dtype for the second matmul, as every flash kernel does.

A query that sees no key (a left-padding position) gets the mean of the values it scanned instead
of NaN: masked scores are a large finite negative, not -inf. Its row is padding anyway; NaN would
spread to real rows through the next layer's p @ v.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MASKED = tl.constexpr(-1.0e30)
# triton's CPU interpreter computes a half-precision tl.dot wrongly (triton 3.9); there the
# operands go to fp32 first, which gives the same result (half-precision products are exact in fp32).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, valid_ptr,
    qs0, qs1, qs2, qs3, ks0, ks1, ks2, ks3, vs0, vs1, vs2, vs3, os0, os1, os2, os3, valid_s0,
    kv_heads, groups, q_len, kv_len, q_offset, window, scale,
    CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, HAS_WINDOW: tl.constexpr, FP32_DOT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, kv_head = bh // kv_heads, bh % kv_heads
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of this group: (head in group, position)
    row_valid = rows < groups * q_len
    head = kv_head * groups + rows // q_len
    pos = rows % q_len + q_offset  # each query's index in the cache
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    q = tl.load(
        q_ptr + b * qs0 + head[:, None] * qs1 + (rows % q_len)[:, None] * qs2 + dims[None, :] * qs3,
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )

    # The keys this block can see: up to its last query (causal), from its first query's window.
    first_row = block * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, groups * q_len) - 1
    spans_heads = first_row // q_len != last_row // q_len
    lo_pos = tl.where(spans_heads, 0, first_row % q_len) + q_offset
    hi_pos = tl.where(spans_heads, q_len - 1, last_row % q_len) + q_offset
    end = tl.minimum(hi_pos + 1, kv_len) if CAUSAL else kv_len
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(lo_pos - window + 1, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], MASKED, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_valid = keys < kv_len
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(
            k_ptr + b * ks0 + kv_head * ks1 + keys[:, None] * ks2 + dims[None, :] * ks3, mask=kv_mask, other=0.0
        )
        v = tl.load(
            v_ptr + b * vs0 + kv_head * vs1 + keys[:, None] * vs2 + dims[None, :] * vs3, mask=kv_mask, other=0.0
        )
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        visible = key_valid[None, :] & row_valid[:, None]
        if CAUSAL:
            visible = visible & (keys[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (keys[None, :] > pos[:, None] - window)
        if HAS_VALID:
            real = tl.load(valid_ptr + b * valid_s0 + keys, mask=key_valid, other=0)
            visible = visible & (real[None, :] != 0)
        s = tl.where(visible, s, MASKED)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        p = tl.where(key_valid[None, :], p, 0.0)  # keys past the end do not exist, not even as padding
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32_DOT:  # p is rounded to the value dtype either way
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(
        out_ptr + b * os0 + head[:, None] * os1 + (rows % q_len)[:, None] * os2 + dims[None, :] * os3,
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    q_offset: int = 0,
    kv_valid: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """As `minivlm.ops.attention`: q (batch, heads, q_len, head_dim), k and v (batch, kv_heads,
    kv_len, head_dim), any strides -> (batch, heads, q_len, head_dim), written into `out` if given."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    if out is None:
        out = torch.empty(batch, heads, q_len, head_dim, dtype=q.dtype, device=q.device)
    rows = groups * q_len
    block_m = 16 if rows <= 16 else 64  # decode steps fill one small block
    block_n = 64
    valid = kv_valid.to(torch.int8) if kv_valid is not None else q.new_empty(1, 1, dtype=torch.int8)
    grid = (triton.cdiv(rows, block_m), batch * kv_heads)
    _attention_kernel[grid](
        q,
        k,
        v,
        out,
        valid,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        valid.stride(0),
        kv_heads,
        groups,
        q_len,
        kv_len,
        q_offset,
        window or 0,
        head_dim**-0.5 if scale is None else scale,
        CAUSAL=causal,
        HAS_VALID=kv_valid is not None,
        HAS_WINDOW=window is not None,
        FP32_DOT=q.dtype == torch.float32 or INTERPRETED,
        HEAD_DIM=head_dim,
        BLOCK_D=max(triton.next_power_of_2(head_dim), 16),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return out
