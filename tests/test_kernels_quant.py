"""The Triton dequantize-and-multiply kernel (kernels/quant.py) against QuantLinear's reference
(dequantize, then a matmul), under triton's CPU interpreter where there is no GPU: int8 and int4
in groups of 32, 64 and 128, one row (a decode step) and blocks of rows (prefill), widths the
group does not divide, a bias, outputs that do not fill a tile.

Tolerance: fp32 1e-5 of the largest output (the sums run in another order); bf16 against the
reference computed in fp32 from the same bf16 weights, no further than the bf16 reference itself
plus two bf16 units (2 x 2^-8): the interpreter rounds float -> bf16 by truncation, which biases
the dequantized weights and the output by up to a unit each (a GPU rounds to nearest).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton")

from minivlm.kernels import quant as quant_kernel  # noqa: E402

from minivlm.quant import QuantLinear, quantize_int4, quantize_int8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def layer(out_features, in_features, scheme, group_size, dtype, bias):
    g = torch.Generator().manual_seed(out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    m = QuantLinear(in_features, out_features, bias, scheme, group_size, dtype)
    parts = quantize_int8(w, dtype) if scheme == "int8" else quantize_int4(w, group_size, dtype)
    for k, v in parts.items():
        setattr(m, k, v)
    if bias:
        m.bias = torch.nn.Parameter(torch.randn(out_features, generator=g).to(dtype))
    return m.to(DEVICE)


CASES = [  # (out, in, scheme, group, bias)
    (96, 128, "int8", 64, False),
    (70, 200, "int8", 64, True),  # inputs not a multiple of the block, outputs not of the tile
    (96, 128, "int4", 32, False),
    (64, 200, "int4", 64, True),  # the last group padded
    (130, 256, "int4", 128, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_quant_kernel_equals_the_reference(case, rows, dtype):
    out_features, in_features, scheme, group_size, bias = case
    m = layer(out_features, in_features, scheme, group_size, dtype, bias)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(DEVICE, dtype)
    got = quant_kernel.quant_linear(x, m)
    assert got.shape == (rows, out_features) and got.dtype == dtype and not got.isnan().any()
    bias = None if m.bias is None else m.bias.float()
    exact = torch.nn.functional.linear(x.float(), m.dequantize(dtype).float(), bias)
    err = (got.float() - exact).abs().max() / exact.abs().max()
    if dtype == torch.float32:
        assert err < 1e-5, err
    else:
        m.kernels = "off"
        reference = m(x).float()
        err_reference = (reference - exact).abs().max() / exact.abs().max()
        assert err <= err_reference + 2 * 2**-8, (err, err_reference)


def test_a_quantized_layer_takes_the_kernel_when_told(monkeypatch):
    m = layer(64, 128, "int4", 64, torch.float32, False)
    m.kernels = "on"
    calls = []
    monkeypatch.setattr(quant_kernel, "quant_linear", lambda x, layer: calls.append(1) or layer.dequantize()[:1, :1])
    m(torch.randn(1, 128, device=DEVICE))
    assert calls == [1]
