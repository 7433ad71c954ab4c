"""The plain-PyTorch op definitions against transformers' modules and torch's own SDPA.

Ops that do the same arithmetic in the same order as transformers must be bit-identical, in bf16
too: RMSNorm's cast order and RoPE's table are where half-precision parity is won or lost, and a
model-level bf16 tolerance is too loose to notice one extra rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from minivlm import ops
from minivlm.config import TextConfig


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 896, 4096])
def test_rms_norm_is_bitwise_transformers(dtype, hidden):
    torch.manual_seed(0)
    ref = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(hidden))
    ref = ref.to(dtype)
    x = (3 * torch.randn(3, 5, hidden)).to(dtype)
    assert torch.equal(ops.rms_norm(x, ref.weight, 1e-5), ref(x))


ROPES = {
    "default": {"rope_theta": 10000.0},
    "linear": {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama3": {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(ROPES))
@pytest.mark.parametrize("head_dim", [64, 72, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_bitwise_transformers(kind, head_dim, dtype):
    hf_config = LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=4096, **ROPES[kind]
    )
    ours = TextConfig.from_hf({**hf_config.to_dict(), "model_type": "llama", "vocab_size": 10})
    inv_freq = ops.rope_inv_freq(ours.rope, head_dim)
    init = ROPE_INIT_FUNCTIONS.get(kind, LlamaRotaryEmbedding.compute_default_rope_parameters)
    assert torch.equal(inv_freq, init(hf_config)[0])

    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 900, 4000], [7, 7, 8, 9, 3000]])
    q = torch.randn(2, 4, 5, head_dim).to(dtype)
    k = torch.randn(2, 2, 5, head_dim).to(dtype)
    cos, sin = ops.rope_cos_sin(inv_freq, positions, dtype)
    ref_cos, ref_sin = LlamaRotaryEmbedding(hf_config)(q, positions)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    for ours_t, ref_t in zip(ops.apply_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, ref_cos, ref_sin)):
        assert torch.equal(ours_t, ref_t)


def sdpa_reference(q, k, v, allowed):
    """torch's SDPA (math backend on CPU) with the same visibility, as an independent definition."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


# (batch, heads, kv_heads, q_len, kv_len, head_dim): GQA, the real head dims, SigLIP's 729 and
# CLIP's 577 patch counts, and decode shapes (one or a few queries against a longer cache).
SHAPES = [
    (2, 4, 2, 13, 13, 64),
    (1, 8, 1, 7, 7, 128),
    (2, 2, 2, 1, 37, 72),
    (1, 4, 4, 3, 50, 80),
    (1, 2, 2, 729, 729, 72),
    (1, 2, 1, 577, 577, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa(shape, causal):
    batch, heads, kv_heads, q_len, kv_len, head_dim = shape
    torch.manual_seed(0)
    q = torch.randn(batch, heads, q_len, head_dim)
    k = torch.randn(batch, kv_heads, kv_len, head_dim)
    v = torch.randn(batch, kv_heads, kv_len, head_dim)
    offset = kv_len - q_len  # the queries are the newest tokens of the cache
    kv_valid = torch.ones(batch, kv_len, dtype=torch.bool)
    kv_valid[0, : kv_len // 3] = False  # the first row is left-padded
    window = 5 if causal else None

    out = ops.attention(q, k, v, causal=causal, q_offset=offset, kv_valid=kv_valid, window=window, kernels="off")

    i = torch.arange(offset, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        allowed &= (j <= i) & (j > i - window)
    allowed = allowed & kv_valid[:, None, None, :]  # (batch, 1, q_len, kv_len)
    ref = sdpa_reference(q, k, v, allowed)
    # Queries that see no key at all: SDPA gives NaN, transformers (and we) average every key.
    seen = allowed.any(-1, keepdim=True).expand_as(ref[:, :1, :, :1]).expand(-1, heads, -1, head_dim)
    torch.testing.assert_close(out[seen], ref[seen], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    unseen = ~seen
    if unseen.any():
        mean_v = v.repeat_interleave(heads // kv_heads, dim=1).mean(dim=2, keepdim=True).expand_as(out)
        torch.testing.assert_close(out[unseen], mean_v[unseen], rtol=1e-5, atol=1e-5)


def test_attention_without_mask_is_plain_softmax_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 64)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(64), dim=-1) @ v
    torch.testing.assert_close(ops.attention(q, k, v, causal=False, kernels="off"), ref, rtol=1e-5, atol=1e-6)
