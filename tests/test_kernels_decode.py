"""The split-KV decode attention kernel (kernels/decode.py) against the definition in ops.py, and
ops.decode_attention's own paths (SDPA, the definition over the whole cache) against the same.

The reference is `ops.attention` (the definition, kernels="off") over the filled slots only, with
the query at the last of them: what a decode step means. The cache is longer than what is filled,
and its unfilled slots hold NaN for the kernel (which must never read them) and large finite
garbage for the torch paths (which read them and must mask them: NaN would survive a zero weight).

Lengths 1, 63, 64, 65 and 4097 put the end of the filled keys on either side of a key block and
of a split; GQA 7:1 (Qwen2-0.5B's 14:2), 8:1 (Llama-3-8B) and 1:1; head_dims 64, 128 and 72.
Tolerances: fp32 1e-5 relative to the largest output (the kernel sums in another order); half
precision as tests/test_kernels.py's attention: at least as close to the fp32 result as the
definition in that dtype is, up to 2x plus one ulp.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton")

from minivlm.kernels import decode  # noqa: E402

from minivlm import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPARE = 37  # cache slots past the filled ones


def inputs(heads, kv_heads, filled, head_dim, dtype, *, batch=1, pads=None, unfilled=float("nan")):
    g = torch.Generator().manual_seed(filled * 7 + heads)
    q = torch.randn(batch, heads, 1, head_dim, generator=g).to(DEVICE, dtype)
    k = torch.randn(batch, kv_heads, filled + SPARE, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(batch, kv_heads, filled + SPARE, head_dim, generator=g).to(DEVICE, dtype)
    k[:, :, filled:], v[:, :, filled:] = unfilled, unfilled
    slot = torch.tensor([filled - 1], device=DEVICE)
    kv_valid = None
    if pads is not None:
        kv_valid = torch.ones(batch, filled + SPARE, dtype=torch.bool, device=DEVICE)
        for row, n in enumerate(pads):
            kv_valid[row, :n] = False  # left padding
    return q, k, v, slot, kv_valid


def reference(q, k, v, filled, kv_valid, window, dtype):
    """The definition over the filled slots, the query at the last one."""
    valid = kv_valid[:, :filled] if kv_valid is not None else None
    args = dict(causal=True, q_offset=filled - 1, kv_valid=valid, window=window, kernels="off")
    return ops.attention(q.to(dtype), k[:, :, :filled].to(dtype), v[:, :, :filled].to(dtype), **args)


def check(out, q, k, v, filled, kv_valid, window, dtype):
    assert not out.isnan().any()
    exact = reference(q.float(), k.float(), v.float(), filled, kv_valid, window, torch.float32)
    err = (out.float() - exact).abs().max() / exact.abs().max()
    if dtype == torch.float32:
        assert err < 1e-5, err
    else:
        definition = reference(q, k, v, filled, kv_valid, window, dtype).float()
        err_definition = (definition - exact).abs().max() / exact.abs().max()
        assert err <= 2 * err_definition + torch.finfo(dtype).eps, (err, err_definition)


GQA = {"7:1": (7, 1, 64), "8:1": (8, 1, 128), "1:1": (2, 2, 72)}  # heads, kv_heads, head_dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("filled", [1, 63, 64, 65, 4097])
@pytest.mark.parametrize("gqa", sorted(GQA))
def test_split_kv_kernel_equals_the_definition(gqa, filled, dtype):
    heads, kv_heads, head_dim = GQA[gqa]
    q, k, v, slot, _ = inputs(heads, kv_heads, filled, head_dim, dtype)
    out = decode.decode_attention(q, k, v, slot)
    check(out, q, k, v, filled, None, None, dtype)


@pytest.mark.parametrize("splits", [1, 3, 64])
@pytest.mark.parametrize("window", [None, 50])
def test_split_kv_kernel_with_padding_windows_and_any_split_count(splits, window):
    """Left padding that fills whole splits (row 1: 130 of 200 slots), a sliding window that starts
    inside the cache, and split counts from one to more splits than key blocks."""
    q, k, v, slot, kv_valid = inputs(8, 2, 200, 64, torch.float32, batch=2, pads=[0, 130])
    out = decode.decode_attention(q, k, v, slot, kv_valid=kv_valid, window=window, splits=splits)
    check(out, q, k, v, 200, kv_valid, window, torch.float32)


def test_the_split_count_depends_on_shapes_alone():
    """One grid for every step of a generation: the count comes from the batch, KV heads, cache
    length and device, never from how much of the cache is filled."""
    cpu = torch.device("cpu")
    assert decode.num_splits(1, 2, 8192, cpu) == 4  # 2 x the stand-in 4 SMs / 2 programs
    assert decode.num_splits(1, 1, 64, cpu) == 1  # no more splits than key blocks
    assert decode.num_splits(64, 8, 8192, cpu) == 1


@pytest.mark.parametrize("kernels", ["auto", "off"])
@pytest.mark.parametrize("gqa", sorted(GQA))
def test_decode_attention_over_the_whole_cache_hides_the_unfilled_slots(gqa, kernels):
    heads, kv_heads, head_dim = GQA[gqa]
    q, k, v, slot, kv_valid = inputs(heads, kv_heads, 65, head_dim, torch.float32, batch=2, pads=[3, 0], unfilled=1e4)
    for window in (None, 20):
        out = ops.decode_attention(q, k, v, slot, kv_valid=kv_valid, window=window, kernels=kernels)
        check(out, q, k, v, 65, kv_valid, window, torch.float32)
