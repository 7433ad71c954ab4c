"""The fast path (kernels="auto", the default) off CUDA: attention through torch's
scaled_dot_product_attention instead of ops.py's eager definition. Not bit-equal to the reference
(the fused kernel sums in another order), so measured against transformers' eager models:
- attention alone against the definition, at the real shapes (729 tokens at head_dim 72, 577 at
  64, GQA 7:1 and 8:1, decode against a long cache, left padding, a sliding window);
- every tiny family's logits of a left-padded batch with images, on the real positions, within
  the parity tests' fp32 tolerance (1e-5 relative), and every padding position finite;
- greedy generation token for token, which runs the decode path against a growing KV cache.
"""

from __future__ import annotations

import pytest
import torch
from test_generation import hf_generate
from test_vlm import FP32_TOL, batch, rel_err

import minivlm
from minivlm import ops
from minivlm.bench.tiny.models import TEXT_CONFIGS, VLM_CONFIGS, build_text_model, build_vlm_model, save_checkpoint

SHAPES = [  # (batch, heads, kv_heads, q_len, kv_len, head_dim, causal, window)
    (1, 16, 16, 729, 729, 72, False, None),  # SigLIP so400m
    (2, 16, 16, 577, 577, 64, False, None),  # CLIP-L/14 at 336
    (2, 14, 2, 61, 61, 64, True, None),  # GQA 7:1, prefill
    (1, 32, 4, 1, 4097, 128, True, None),  # GQA 8:1, one decode step against a long cache
    (2, 8, 8, 1, 65, 80, True, 16),  # a sliding-window decode step
    (2, 4, 2, 33, 33, 128, True, 8),  # a sliding-window prefill
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_equals_the_definition(shape, dtype):
    b, heads, kv_heads, q_len, kv_len, head_dim, causal, window = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, heads, q_len, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(b, kv_heads, kv_len, head_dim, generator=g).to(dtype) for _ in range(2))
    valid = torch.ones(b, kv_len, dtype=torch.bool)
    valid[-1, : kv_len // 3] = False  # a left-padded row: its first queries see no key at all
    args = dict(causal=causal, q_offset=kv_len - q_len, kv_valid=valid if causal else None, window=window)
    fast = ops.sdpa_attention(q, k, v, **args)
    definition = ops.attention(q, k, v, **args, kernels="off")
    exact = ops.attention(q.double(), k.double(), v.double(), **args, kernels="off")
    assert fast.isfinite().all()  # a query that sees no key (padding) too: its value is not used
    seen = exact.isfinite().all(dim=-1)  # the rest, against float64 (where such a row is NaN)
    if dtype == torch.float32:  # the parity tests' tolerance; the definition itself is within ~1e-6
        assert rel_err(fast[seen], exact[seen]) < FP32_TOL
    else:  # no further from the exact result than the definition itself, up to one bf16 unit (2^-8)
        assert rel_err(fast[seen], exact[seen]) <= 2 * rel_err(definition[seen], exact[seen]) + 2**-8


@pytest.fixture(autouse=True)
def fast_path(monkeypatch):
    monkeypatch.setenv("MINIVLM_KERNELS", "auto")  # the suite runs the reference unless told (conftest.py)


def vlm_matches_transformers(name: str, folder, kernels: str) -> None:
    """The tiny `name` VLM on the path `kernels` against transformers' eager model: the logits of a
    left-padded batch with images on its real positions (fp32 tolerance), every position finite,
    and greedy generation token for token."""
    hf = build_vlm_model(name)
    model = minivlm.load_model(save_checkpoint(hf, folder, layout="hub"))
    assert model.kernels == kernels
    ids, mask, inputs, _ = batch(name, hf, [2, 1])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions, **inputs).logits
        ours = model(ids, attention_mask=mask, **inputs)
    real = mask.bool()
    assert rel_err(ours[real], theirs[real]) < FP32_TOL
    assert ours.isfinite().all()  # the padding positions too
    one_ids, one_mask, one_inputs, _ = batch(name, hf, [1])
    expected = hf_generate(hf, one_ids, one_mask, None, 0, **one_inputs)
    got = minivlm.generate(model, one_ids, one_mask, max_new_tokens=expected.shape[1], **one_inputs)
    assert torch.equal(got, expected)


def text_model_matches_transformers(name: str, folder, kernels: str) -> None:
    """As vlm_matches_transformers, for the tiny text model `name`."""
    hf = build_text_model(name)
    model = minivlm.load_model(save_checkpoint(hf, folder, layout="hub"))
    assert model.kernels == kernels
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row (Mistral's window of 5 and Qwen2's of 4 slide past it)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(ours[real], theirs[real]) < FP32_TOL
    assert ours.isfinite().all()
    expected = hf_generate(hf, ids, mask, None, 0)
    assert torch.equal(minivlm.generate(model, ids, mask, max_new_tokens=expected.shape[1]), expected)


@pytest.mark.parametrize("name", sorted(VLM_CONFIGS))
def test_vlm_on_the_fast_path_matches_transformers(name, tmp_path):
    vlm_matches_transformers(name, tmp_path, "auto")


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_model_on_the_fast_path_matches_transformers(name, tmp_path):
    text_model_matches_transformers(name, tmp_path, "auto")


def test_the_reference_path_is_the_definition(tmp_path, monkeypatch):
    """kernels="off" never reaches torch's SDPA (so the parity tests measure the definition)."""
    monkeypatch.setattr(ops, "sdpa_attention", lambda *a, **k: pytest.fail("the reference ran SDPA"))
    model = minivlm.load_model(save_checkpoint(build_text_model("llama"), tmp_path, layout="hub"), kernels="off")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_an_eager_decode_step_reads_only_the_filled_slots(tmp_path, monkeypatch):
    """The eager fast path's decode step attends over the slots filled so far (KVCache.reach), not
    the whole cache made for max_new_tokens, so a long max_new_tokens does not slow every step; the
    tokens stay transformers' (a left-padded row and a sliding window cut with the cache)."""
    hf = build_text_model("qwen2")  # a sliding window of 4
    model = minivlm.load_model(save_checkpoint(hf, tmp_path, layout="hub"))
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    read, attend = [], ops.decode_attention

    def recording(q, k_cache, v_cache, slot, **kwargs):
        read.append((k_cache.shape[2], int(slot)))
        return attend(q, k_cache, v_cache, slot, **kwargs)

    monkeypatch.setattr(ops, "decode_attention", recording)
    expected = hf_generate(hf, ids, mask, None, 0)
    new = expected.shape[1]
    assert torch.equal(minivlm.generate(model, ids, mask, max_new_tokens=new), expected)
    assert len(read) == model.config.num_layers * (new - 1)  # the first token comes from the prefill
    assert all(length == slot + 1 for length, slot in read)  # up to and including the new token's slot
    assert max(length for length, _ in read) == ids.shape[1] + new - 1  # the cache holds one slot more
