"""Dequantize-and-multiply for minivlm.quant.QuantLinear on CUDA: y = x @ dequant(W)^T (+ bias).

One program computes a BLOCK_M x BLOCK_N tile of y, walking the inputs BLOCK_K at a time: it
loads the stored weights (int8, or two int4 values a byte), dequantizes them in registers with
the scales (and zeros) of their channel or group, and multiplies in the activations' dtype with
fp32 accumulation. The weights leave memory at 1 or 0.5 bytes each, which is the point for a
batch-1 decode step (bound by the bytes it reads); BLOCK_M 16 is the smallest tile tl.dot takes,
so the same kernel serves decode (one row) and prefill (tiles of rows).

The arithmetic is quant.py's reference up to the order of the sums and the rounding of the
dequantized weight to the activations' dtype before the product (the reference rounds it too).
For int4, BLOCK_K is the group size, so each step has one scale and zero per output channel; the
stored rows are padded to whole groups, and inputs past `in_features` are masked to zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import INTERPRETED


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    rows, in_features, out_features, xs0, ws0, ss0, os0,
    INT4: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid, n_valid = m < rows, n < out_features
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if not INT4:
        scale = tl.load(scales_ptr + n, mask=n_valid, other=0.0).to(tl.float32)  # one per output channel
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_valid = k < in_features
        x = tl.load(
            x_ptr + m[:, None].to(tl.int64) * xs0 + k[None, :], mask=m_valid[:, None] & k_valid[None, :], other=0.0
        )
        if INT4:
            # (BLOCK_N, BLOCK_K / 2) bytes -> (BLOCK_N, BLOCK_K) values: input 2j low nibble, 2j + 1 high
            pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + n[:, None].to(tl.int64) * ws0 + pairs[None, :], mask=n_valid[:, None], other=0)
            q = tl.reshape(tl.join(packed & 0xF, packed >> 4), [BLOCK_N, BLOCK_K]).to(tl.float32)
            group = k0 // BLOCK_K
            scale = tl.load(scales_ptr + n * ss0 + group, mask=n_valid, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + n * ss0 + group, mask=n_valid, other=0.0).to(tl.float32)
            w = (q - 8.0) * scale[:, None] + zero[:, None]
        else:
            q = tl.load(w_ptr + n[:, None].to(tl.int64) * ws0 + k[None, :], mask=n_valid[:, None] & k_valid[None, :],
                        other=0)  # fmt: skip
            w = q.to(tl.float32) * scale[:, None]
        w = tl.where(k_valid[None, :], w, 0.0).to(x.dtype)  # rounded as the reference rounds it
        if FP32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None].to(tl.int64) * os0 + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_valid[:, None] & n_valid[None, :])  # fmt: skip


def quant_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """x (..., in_features) through a QuantLinear `layer` -> (..., out_features) in x's dtype."""
    rows = x.reshape(-1, layer.in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
    int4 = layer.scheme == "int4"
    block_k = layer.group_size if int4 else 64
    block_m = 16 if rows.shape[0] <= 16 else 64
    block_n = 64
    bias = layer.bias if layer.bias is not None else layer.scales
    zeros = layer.zeros if int4 else layer.scales
    grid = (triton.cdiv(rows.shape[0], block_m), triton.cdiv(layer.out_features, block_n))
    _quant_matmul_kernel[grid](
        rows, layer.qweight, layer.scales, zeros, bias, out,
        rows.shape[0], layer.in_features, layer.out_features, rows.stride(0), layer.qweight.stride(0),
        layer.scales.stride(0) if int4 else 0, out.stride(0),
        INT4=int4, HAS_BIAS=layer.bias is not None, FP32_DOT=x.dtype == torch.float32 or INTERPRETED,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out.view(*x.shape[:-1], layer.out_features)
