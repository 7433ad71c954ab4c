"""minivlm's Triton kernels against the plain-PyTorch definitions in minivlm/ops.py.

Without a GPU they run under triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
at small shapes but with the head dims (64, 72, 80, 128), GQA and sequence lengths (577, 729) of
the real checkpoints. Every output buffer starts as NaN, so an element a kernel fails to write
fails the test. Then whole tiny models of every family run through the kernels
(MINIVLM_KERNELS=1) and must match transformers as the plain path does.

Tolerances: fp32 as the parity tests (1e-5 relative; 1e-6 for the norms). In half precision the
norms and RoPE may differ from PyTorch by two units in the last place (they round twice, and the
interpreter rounds float -> bf16 by truncation; on a GPU a different summation order can move a
rounding), and
attention, whose scores the kernel keeps in fp32 where the definition rounds them, must be at
least as close to the fp32 result as the definition itself is (up to 2x plus one ulp).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need triton")

from minivlm.kernels import attention as attention_kernel  # noqa: E402
from minivlm.kernels import norms, rope  # noqa: E402

from minivlm import ops  # noqa: E402
from minivlm.config import RopeConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 72, 80, 128]


def with_kernels(flag: str, fn, *args, **kwargs):
    """The op fn(*args, **kwargs) with the kernel choice `flag` ("0" plain PyTorch, "1" the kernels)."""
    return fn(*args, kernels={"0": "off", "1": "on"}[flag], **kwargs)


def plain(fn, *args, **kwargs):
    return with_kernels("0", fn, *args, **kwargs)


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def randn(*shape, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def assert_close(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, fp32_tol: float = 1e-6, per_value: bool = True
) -> None:
    """fp32: relative to the largest value; half precision: within two ulps of each value (RMSNorm
    and RoPE round twice in the input dtype, and each rounding may go the other way), or with
    per_value False of the largest value (RoPE's difference of two products can cancel)."""
    assert not got.isnan().any(), "an output element was never written"
    got, want = got.float(), want.float()
    if dtype == torch.float32:
        assert (got - want).abs().max() <= fp32_tol * want.abs().max()
    else:
        scale = want.abs() if per_value else want.abs().max()
        ulp = 2 * torch.finfo(dtype).eps * scale.clamp(min=torch.finfo(dtype).tiny)
        assert ((got - want).abs() <= ulp).all(), (got - want).abs().max()


# ---------------------------------------------------------------------------------------------
# Norms and RoPE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [64, 72, 80, 128, 1152, 4096])
def test_rms_norm(dtype, width):
    x = randn(3, 11, width, dtype=dtype) * 3
    weight = 1 + 0.2 * randn(width, dtype=dtype, seed=1)
    out = poisoned((3, 11, width), dtype)
    norms.rms_norm(x, weight, 1e-6, out=out)
    assert_close(out, plain(ops.rms_norm, x, weight, 1e-6), dtype)
    strided = x.transpose(0, 1)  # rows that are not evenly spaced in memory
    assert_close(
        with_kernels("1", ops.rms_norm, strided, weight, 1e-6), plain(ops.rms_norm, strided, weight, 1e-6), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [72, 144, 1152])  # the towers' widths: tiny CLIP/SigLIP, so400m
def test_layer_norm(dtype, width):
    x = randn(2, 13, width, dtype=dtype) * 2 + 1
    weight, bias = 1 + 0.2 * randn(width, dtype=dtype, seed=1), randn(width, dtype=dtype, seed=2)
    out = poisoned((2, 13, width), dtype)
    norms.layer_norm(x, weight, bias, 1e-6, out=out)
    assert_close(out, plain(ops.layer_norm, x, weight, bias, 1e-6), dtype, fp32_tol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rope(dtype, head_dim):
    batch, seq, heads, kv_heads = 2, 9, 4, 2
    # q and k as the decoder makes them: projections viewed (batch, seq, heads, dim), then transposed.
    q = randn(batch, seq, heads, head_dim, dtype=dtype).transpose(1, 2)
    k = randn(batch, seq, kv_heads, head_dim, dtype=dtype, seed=1).transpose(1, 2)
    rope_config = RopeConfig(
        theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=64
    )
    positions = torch.arange(seq)[None].expand(batch, seq) + torch.tensor([[0], [5]])  # a row that starts later
    cos, sin = ops.rope_cos_sin(ops.rope_inv_freq(rope_config, head_dim), positions, dtype)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    out = poisoned(q.shape, dtype), poisoned(k.shape, dtype)
    rope.apply_rope(q, k, cos, sin, out=out)
    want_q, want_k = plain(ops.apply_rope, q, k, cos, sin)
    assert_close(out[0], want_q, dtype, fp32_tol=0, per_value=False)
    assert_close(out[1], want_k, dtype, fp32_tol=0, per_value=False)


# ---------------------------------------------------------------------------------------------
# Attention

# name -> (batch, heads, kv_heads, q_len, kv_len, causal, left padding per row, window)
ATTENTION_CASES = {
    "prefill_gqa": (2, 4, 2, 37, 37, True, None, None),
    "prefill_long": (1, 4, 2, 100, 100, True, None, None),  # row blocks that span two query heads
    "prefill_left_padded": (2, 4, 1, 21, 21, True, [0, 6], None),
    "vision_padded_patches": (2, 2, 2, 30, 30, False, [0, 9], None),
    "decode_one": (2, 8, 2, 1, 50, True, [0, 4], None),
    "decode_three": (1, 4, 2, 3, 47, True, None, None),
    "sliding_window": (1, 4, 2, 40, 40, True, None, 8),
    "sliding_window_long": (1, 2, 1, 150, 150, True, None, 16),  # key blocks wholly outside the window
    # blocks of one head's rows far enough down that whole key blocks run without masks
    "prefill_causal_long": (1, 2, 2, 200, 200, True, None, None),
    "chunk_after_cache": (1, 2, 1, 20, 150, True, None, None),  # the same with the queries past a cache
}


def attention_inputs(case: str, head_dim: int, dtype: torch.dtype):
    batch, heads, kv_heads, q_len, kv_len, causal, pads, window = ATTENTION_CASES[case]
    q = randn(batch, heads, q_len, head_dim, dtype=dtype)
    k = randn(batch, kv_heads, kv_len, head_dim, dtype=dtype, seed=1)
    v = randn(batch, kv_heads, kv_len, head_dim, dtype=dtype, seed=2)
    kv_valid = None
    if pads is not None:
        kv_valid = torch.ones(batch, kv_len, dtype=torch.bool, device=DEVICE)
        for b, n in enumerate(pads):
            if causal:
                kv_valid[b, :n] = False  # left padding
            else:
                kv_valid[b, kv_len - n :] = False  # a smaller image's padded patches
    args = dict(causal=causal, q_offset=kv_len - q_len, kv_valid=kv_valid, window=window)
    return q, k, v, args


def real_queries(args: dict, q: torch.Tensor) -> torch.Tensor:
    """(batch, heads, q_len) True where the query is a real token: a padding position sees no key,
    and there the kernel and the definition give different (meaningless) averages."""
    keep = torch.ones(q.shape[:3], dtype=torch.bool, device=q.device)
    if args["kv_valid"] is not None and args["causal"]:
        keep &= args["kv_valid"][:, None, args["q_offset"] :]
    return keep


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention(case, head_dim, dtype):
    q, k, v, args = attention_inputs(case, head_dim, dtype)
    out = poisoned(q.shape, dtype)
    attention_kernel.attention(q, k, v, **args, out=out)
    assert not out.isnan().any(), "an output element was never written"
    keep = real_queries(args, q)
    exact = plain(ops.attention, q.float(), k.float(), v.float(), **args)
    err = (out.float() - exact)[keep].abs().max() / exact[keep].abs().max()
    if dtype == torch.float32:
        assert err < 1e-5
    else:
        definition = plain(ops.attention, q, k, v, **args).float()
        err_definition = (definition - exact)[keep].abs().max() / exact[keep].abs().max()
        assert err <= 2 * err_definition + torch.finfo(dtype).eps


@pytest.mark.parametrize("tokens, head_dim", [(729, 72), (577, 64)], ids=["siglip_729", "clip_577"])
def test_attention_at_the_towers_real_lengths(tokens, head_dim):
    q, k, v = (randn(1, 1, tokens, head_dim, dtype=torch.float32, seed=i) for i in range(3))
    out = poisoned(q.shape, torch.float32)
    attention_kernel.attention(q, k, v, causal=False, out=out)
    exact = plain(ops.attention, q, k, v, causal=False)
    assert_close(out, exact, torch.float32, fp32_tol=1e-5)
