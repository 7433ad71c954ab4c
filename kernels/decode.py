"""Decode attention split over the keys (flash-decoding): one query per row against a static KV
cache, the rules of `minivlm.ops.decode_attention`.

A decode step has one query per head, so the prefill kernel's grid (one program per KV head and
row block) is a few programs on a GPU of a hundred SMs: 2 for Qwen2-0.5B, 8 for Llama-3-8B, each
reading the whole cache alone. Here the keys are cut into `splits` parts, each program attends one
part for one KV head's group of query heads and writes its partial output with the log-sum-exp of
its scores; a second kernel combines the parts, weighting each by exp(lse - max lse).

The filled length is read on the device from `slot` (the query's cache slot), never on the host,
and the number of splits depends only on the cache's shape and the device: one launch serves every
step, so the step can be captured in a CUDA graph. The filled keys are shared out among the splits
at run time, in whole blocks; splits past the end attend nothing.

Scores are fp32, in base 2: the scale and log2(e) are folded into one multiply and exp2 replaces
exp. Strides go in as multiples of 8 elements where they are (STRIDE_UNIT), so that the compiler
can prove 16-byte alignment at head_dims such as 72 and 80 and load vectors, not scalars.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention import DECODE_TILE, DECODE_TILE_FP32, INTERPRETED, MASKED, stride_unit

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, slot_ptr, part_out_ptr, part_lse_ptr,
    qs0, qs1, ks0, ks1, ks2, vs0, vs1, vs2, valid_s0,
    kv_heads, groups, window, qk_scale,
    SPLITS: tl.constexpr, STRIDE_UNIT: tl.constexpr, HAS_VALID: tl.constexpr, HAS_WINDOW: tl.constexpr,
    FP32_DOT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b, kv_head = bh // kv_heads, bh % kv_heads
    slot = tl.load(slot_ptr).to(tl.int32)  # keys 0 .. slot are filled; the query sits at slot
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(slot - window + 1, 0)
    # This split's share of [start, slot], in whole blocks.
    per_split = tl.cdiv(tl.cdiv(slot + 1 - start, SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, slot + 1)

    rows = tl.arange(0, BLOCK_H)  # the query heads of this KV head's group
    row_valid = rows < groups
    head = kv_head * groups + rows
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        q_ptr + b * (qs0 * STRIDE_UNIT) + head[:, None] * (qs1 * STRIDE_UNIT) + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    k_base = k_ptr + b * (ks0 * STRIDE_UNIT) + kv_head * (ks1 * STRIDE_UNIT)
    v_base = v_ptr + b * (vs0 * STRIDE_UNIT) + kv_head * (vs1 * STRIDE_UNIT)

    m_i = tl.full([BLOCK_H], MASKED, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_valid = keys < hi
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_base + keys[:, None] * (ks2 * STRIDE_UNIT) + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None] * (vs2 * STRIDE_UNIT) + dims[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # log2(e) / sqrt(head_dim): base-2 scores
        visible = key_valid
        if HAS_VALID:
            real = tl.load(valid_ptr + b * valid_s0 + keys, mask=key_valid, other=0)
            visible = visible & (real != 0)
        s = tl.where(visible[None, :], s, MASKED)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        # A hidden key weighs nothing, even in a block where every key is hidden (padding).
        p = tl.where(visible[None, :], tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FP32_DOT:  # p is rounded to the value dtype either way
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # (batch * heads, SPLITS, HEAD_DIM) and (batch * heads, SPLITS), fp32; an empty split: lse MASKED
    part = (b * kv_heads * groups + head) * SPLITS + split
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_valid[:, None] & dim_valid[None, :])
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), MASKED)
    tl.store(part_lse_ptr + part, lse, mask=row_valid)


@triton.jit
def _decode_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, heads, os0, os1,
    SPLITS: tl.constexpr, STRIDE_UNIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # batch * heads + head
    b, head = row // heads, row % heads
    splits = tl.arange(0, BLOCK_S)
    split_valid = splits < SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * SPLITS + splits, mask=split_valid, other=MASKED)
    top = tl.max(lse, axis=0)  # finite: the query's own key is always visible
    weight = tl.where(split_valid & (lse > MASKED), tl.exp2(lse - top), 0.0)
    parts = tl.load(
        part_out_ptr + (row * SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :],
        mask=split_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    out = tl.sum(weight[:, None] * parts, axis=0) / tl.sum(weight, axis=0)
    tl.store(
        out_ptr + b * (os0 * STRIDE_UNIT) + head * (os1 * STRIDE_UNIT) + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dim_valid,
    )


@torch.compiler.assume_constant_result  # under torch.compile: read once, at trace time
@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; elsewhere (the interpreter) a small stand-in."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


MAX_SPLITS = 64


def num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """How many parts the keys are cut into: enough programs to fill the device twice over, no
    more parts than blocks of the cache, at most MAX_SPLITS. A function of shapes and the device
    alone, so every step of one generation launches the same grid."""
    wanted = triton.cdiv(2 * _sm_count(device), batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(max_len, DECODE_TILE[1]), MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    *,
    kv_valid: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """As `minivlm.ops.decode_attention`: q (batch, heads, 1, head_dim); k_cache, v_cache (batch,
    kv_heads, max_len, head_dim); slot (1,) long on the device. splits: the number of key parts
    (None: `num_splits`; tests set it). -> (batch, heads, 1, head_dim)."""
    batch, heads, _, head_dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    groups = heads // kv_heads
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    splits = splits or num_splits(batch, kv_heads, max_len, q.device)
    part_out = torch.empty(batch * heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch * heads, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, heads, 1, head_dim, dtype=q.dtype, device=q.device)
    valid = kv_valid.to(torch.int8) if kv_valid is not None else q.new_empty(1, 1, dtype=torch.int8)
    strides = (*q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3])
    unit = stride_unit(strides)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    _, block_n, warps, stages = DECODE_TILE_FP32 if q.dtype == torch.float32 else DECODE_TILE
    scale = head_dim**-0.5 if scale is None else scale
    _decode_split_kernel[(batch * kv_heads, splits)](
        q, k_cache, v_cache, valid, slot, part_out, part_lse,
        *(s // unit for s in strides), valid.stride(0),
        kv_heads, groups, window or 0, scale * LOG2E,
        SPLITS=splits, STRIDE_UNIT=unit, HAS_VALID=kv_valid is not None, HAS_WINDOW=window is not None,
        FP32_DOT=q.dtype == torch.float32 or INTERPRETED, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_H=max(triton.next_power_of_2(groups), 16), BLOCK_N=block_n, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    out_unit = stride_unit(out.stride()[:2])
    _decode_combine_kernel[(batch * heads,)](
        part_out, part_lse, out, heads, out.stride(0) // out_unit, out.stride(1) // out_unit,
        SPLITS=splits, STRIDE_UNIT=out_unit, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_S=max(triton.next_power_of_2(splits), 2),
    )  # fmt: skip
    return out
