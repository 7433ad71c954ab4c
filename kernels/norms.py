"""RMSNorm and LayerNorm, one program per row, with the casts of the PyTorch definitions in
minivlm/ops.py: statistics in fp32; RMSNorm rounds the normalised row to the input dtype before
the weight multiplies it (transformers' LlamaRMSNorm), LayerNorm rounds once at the end."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=valid, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * inv_rms).to(x_ptr.dtype.element_ty)  # the cast to x's dtype before the weight, as transformers
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    # A product of two half-precision numbers is exact in fp32, so rounding it once equals the
    # half-precision multiply PyTorch does.
    tl.store(
        out_ptr + row * out_row_stride + cols, (w * normed.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=valid
    )


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(valid, x - mean, 0.0)
    inv_std = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * out_row_stride + cols, (centred * inv_std * w + b).to(out_ptr.dtype.element_ty), mask=valid
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) with unit stride along n (a copy only when the last dim is strided)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """As `minivlm.ops.rms_norm`; `out`, if given, a contiguous tensor of x's shape to write into."""
    rows = _rows(x)
    out = (
        torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        if out is None
        else out.view(rows.shape)
    )
    block = triton.next_power_of_2(rows.shape[1])
    _rms_norm_kernel[(rows.shape[0],)](
        rows,
        weight,
        out,
        rows.shape[1],
        rows.stride(0),
        out.stride(0),
        eps,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),
    )
    return out.view(x.shape)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """As `minivlm.ops.layer_norm`; `out` as in rms_norm."""
    rows = _rows(x)
    out = torch.empty_like(rows) if out is None else out.view(rows.shape)
    block = triton.next_power_of_2(rows.shape[1])
    _layer_norm_kernel[(rows.shape[0],)](
        rows,
        weight,
        bias,
        out,
        rows.shape[1],
        rows.stride(0),
        out.stride(0),
        eps,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),
    )
    return out.view(x.shape)
