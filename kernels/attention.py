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

Speed: scores are in base 2 (the scale and log2(e) folded into one multiply, exp2 for exp); the
key blocks that every row of a block sees whole (left of the causal diagonal, inside the cache,
no padding mask or window) run without masks, only the rest build one; the tile sizes and warps
are chosen per head_dim (TILES). Strides go in as multiples of 8 elements where they are
(STRIDE_UNIT), so the compiler can prove 16-byte alignment at head_dims such as 72 and 80 (a
stride of 72 is not a multiple of 16, the only divisibility triton infers from an argument) and
load vectors instead of scalars; the last dimension must be contiguous (the wrapper copies it
where it is not).
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


LOG2E = 1.4426950408889634


def stride_unit(strides) -> int:
    """8 when every stride is a multiple of 8 elements (the kernels then take stride // 8 and
    multiply by a constant 8, which the compiler sees), else 1."""
    return 8 if all(s % 8 == 0 for s in strides) else 1


@triton.jit
def _attend_block(
    q, k_base, v_base, ks, vs, n0, m_i, l_i, acc, pos, row_valid, dims, dim_valid, kv_len, window,
    valid_row_ptr, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, HAS_WINDOW: tl.constexpr,
    FP32_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax; MASK False: every key of the block is visible to every row."""
    keys = n0 + tl.arange(0, BLOCK_N)
    if MASK:
        key_valid = keys < kv_len
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_base + keys[:, None] * ks + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None] * vs + dims[None, :], mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_base + keys[:, None] * ks + dims[None, :], mask=dim_valid[None, :], other=0.0)
        v = tl.load(v_base + keys[:, None] * vs + dims[None, :], mask=dim_valid[None, :], other=0.0)
    if FP32_DOT:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale  # base-2 scores
    if MASK:
        visible = key_valid[None, :] & row_valid[:, None]
        if CAUSAL:
            visible = visible & (keys[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible = visible & (keys[None, :] > pos[:, None] - window)
        if HAS_VALID:
            real = tl.load(valid_row_ptr + keys, mask=key_valid, other=0)
            visible = visible & (real[None, :] != 0)
        s = tl.where(visible, s, MASKED)
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    if MASK:
        p = tl.where(key_valid[None, :], p, 0.0)  # keys past the end do not exist, not even as padding
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP32_DOT:  # p is rounded to the value dtype either way
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, valid_ptr,
    qs0, qs1, qs2, ks0, ks1, ks2, vs0, vs1, vs2, os0, os1, os2, valid_s0,
    kv_heads, groups, q_len, kv_len, q_offset, window, qk_scale,
    CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, HAS_WINDOW: tl.constexpr, FP32_DOT: tl.constexpr,
    STRIDE_UNIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
        q_ptr
        + b * (qs0 * STRIDE_UNIT)
        + head[:, None] * (qs1 * STRIDE_UNIT)
        + (rows % q_len)[:, None] * (qs2 * STRIDE_UNIT)
        + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    k_base = k_ptr + b * (ks0 * STRIDE_UNIT) + kv_head * (ks1 * STRIDE_UNIT)
    v_base = v_ptr + b * (vs0 * STRIDE_UNIT) + kv_head * (vs1 * STRIDE_UNIT)
    valid_row_ptr = valid_ptr + b * valid_s0

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
    # Whole blocks that every row sees entirely: before the first row's position (causal), inside
    # the cache, and only without a padding mask or a window, which can hide any key.
    whole = start
    if not HAS_VALID and not HAS_WINDOW:
        whole = (tl.minimum(lo_pos + 1, kv_len) if CAUSAL else kv_len) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], MASKED, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    ks, vs = ks2 * STRIDE_UNIT, vs2 * STRIDE_UNIT
    for n0 in range(start, whole, BLOCK_N):
        m_i, l_i, acc = _attend_block(
            q, k_base, v_base, ks, vs, n0, m_i, l_i, acc, pos, row_valid, dims, dim_valid, kv_len, window,
            valid_row_ptr, qk_scale, False, CAUSAL, HAS_VALID, HAS_WINDOW, FP32_DOT, BLOCK_N,
        )  # fmt: skip
    for n0 in range(tl.maximum(whole, start), end, BLOCK_N):
        m_i, l_i, acc = _attend_block(
            q, k_base, v_base, ks, vs, n0, m_i, l_i, acc, pos, row_valid, dims, dim_valid, kv_len, window,
            valid_row_ptr, qk_scale, True, CAUSAL, HAS_VALID, HAS_WINDOW, FP32_DOT, BLOCK_N,
        )  # fmt: skip
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(
        out_ptr
        + b * (os0 * STRIDE_UNIT)
        + head[:, None] * (os1 * STRIDE_UNIT)
        + (rows % q_len)[:, None] * (os2 * STRIDE_UNIT)
        + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head_dim, for blocks of more than 16 rows:
# the tiles of triton's fused-attention tutorial, smaller where the head is wide so that q, k, v
# and the fp32 accumulator fit the registers (tests/test_kernels_compile.py checks for spills).
TILES = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3), 256: (32, 32, 4, 2)}
# fp32 runs its products on the FMA units (input_precision "ieee", to stay fp32-exact), which
# hold the tiles in registers: smaller tiles, or they spill.
TILES_FP32 = {16: (32, 32, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 32, 4, 2), 256: (16, 16, 4, 2)}
DECODE_TILE = (16, 64, 4, 2)  # a decode step's few rows (the group's heads) fill one small block
DECODE_TILE_FP32 = (16, 32, 4, 2)


def tile(head_dim: int, rows: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head_dim, this many rows per KV head and dtype."""
    fp32 = dtype == torch.float32
    if rows <= 16:
        return DECODE_TILE_FP32 if fp32 else DECODE_TILE
    return (TILES_FP32 if fp32 else TILES)[max(triton.next_power_of_2(head_dim), 16)]


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
    kv_len, head_dim), any strides -> (batch, heads, q_len, head_dim), written into `out` if given
    (its last dimension contiguous)."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim}: the attention kernel takes at most 256")
    groups = heads // kv_heads
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(batch, heads, q_len, head_dim, dtype=q.dtype, device=q.device)
    rows = groups * q_len
    block_m, block_n, warps, stages = tile(head_dim, rows, q.dtype)
    valid = kv_valid.to(torch.int8) if kv_valid is not None else q.new_empty(1, 1, dtype=torch.int8)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3])
    unit = stride_unit(strides)
    scale = head_dim**-0.5 if scale is None else scale
    grid = (triton.cdiv(rows, block_m), batch * kv_heads)
    _attention_kernel[grid](
        q, k, v, out, valid,
        *(s // unit for s in strides), valid.stride(0),
        kv_heads, groups, q_len, kv_len, q_offset, window or 0, scale * LOG2E,
        CAUSAL=causal, HAS_VALID=kv_valid is not None, HAS_WINDOW=window is not None,
        FP32_DOT=q.dtype == torch.float32 or INTERPRETED, STRIDE_UNIT=unit, HEAD_DIM=head_dim,
        BLOCK_D=max(triton.next_power_of_2(head_dim), 16), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
