"""The text decoder against transformers' LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM.

Tolerances, as max |ours - theirs| / max |theirs| over the logits:
- fp32: 1e-5 (measured: 0, bit-identical). The arithmetic is the same op for op; what may remain
  is summation order inside matmuls of other shapes (grouped-query heads viewed as one matmul).
- bf16: 2^-8, one bf16 rounding step of the largest logit (measured: 0 against
  `from_pretrained(dtype=bfloat16)`). Same op order means the only room left is a GEMM kernel
  that blocks another shape differently. On top of that the greedy token must agree wherever
  transformers' top-2 margin is wider than the tolerance.
  The reference must be loaded with `from_pretrained(dtype=...)`: `model.to(bfloat16)` also
  rounds transformers' fp32 RoPE `inv_freq` buffer, which moves its logits by about 1e-2.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import minivlm
from minivlm.bench.tiny.models import TEXT_CONFIGS, build_text_model, read_folder_tensors, save_checkpoint, save_sharded

FP32_TOL = 1e-5
BF16_TOL = 2**-8


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


@pytest.fixture(scope="module", params=sorted(TEXT_CONFIGS))
def family(request, tmp_path_factory):
    """(name, transformers model, checkpoint folder in the hub layout, sharded with an index)."""
    hf = build_text_model(request.param)
    folder = save_checkpoint(hf, tmp_path_factory.mktemp(request.param), layout="hub", shards=3)
    return request.param, hf, folder


def prompt(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 211, (batch, length), generator=g)


@pytest.mark.parametrize("layout,shards", [("hub", 1), ("v5", 1), ("v5", 2)])
def test_layouts_load_to_the_same_logits(layout, shards, tmp_path):
    hf = build_text_model("llama3")
    model = minivlm.load_model(save_checkpoint(hf, tmp_path, layout=layout, shards=shards))
    ids = prompt(12)
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < FP32_TOL


def test_fp32_logits_match_transformers(family):
    name, hf, folder = family
    model = minivlm.load_model(folder)
    assert model.lm_head.weight.dtype == torch.float32
    ids = prompt(13, batch=2)  # 13 > every sliding window in TEXT_CONFIGS
    with torch.no_grad():
        err = rel_err(model(ids), hf(ids).logits)
    assert err < FP32_TOL, f"{name}: {err:.2e}"
    if hf.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_prefill_then_decode_matches_full_forward(family):
    name, hf, folder = family
    model = minivlm.load_model(folder)
    ids = prompt(14, seed=2, batch=2)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=20)
        steps = [model(ids[:, :6], cache=cache)]
        for t in range(6, 14):
            steps.append(model(ids[:, t : t + 1], cache=cache))
        assert cache.length == 14
    assert rel_err(torch.cat(steps, dim=1), full) < FP32_TOL, name


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def test_left_padded_batch_matches_rows_alone(family):
    name, hf, folder = family
    model = minivlm.load_model(folder)
    rows = [prompt(n, seed=s)[0] for n, s in [(11, 3), (4, 4), (8, 5)]]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        # transformers' own batched forward, given the position ids its generate() derives from the mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        for i, row in enumerate(rows):
            alone = model(row[None])
            real = batched[i, ids.shape[1] - len(row) :]
            assert rel_err(real, alone[0]) < FP32_TOL, f"{name} row {i}"
            assert rel_err(real, hf(row[None]).logits[0]) < FP32_TOL, f"{name} row {i}"
            assert rel_err(real, theirs[i, ids.shape[1] - len(row) :]) < FP32_TOL, f"{name} row {i}"
        assert torch.isfinite(batched).all(), "padding positions must not produce NaN"


def test_left_padded_batch_with_cache_matches_rows_alone(family):
    name, hf, folder = family
    model = minivlm.load_model(folder)
    rows = [prompt(n, seed=s)[0] for n, s in [(9, 6), (3, 7)]]
    ids, mask = left_pad(rows)
    extra = prompt(5, seed=8, batch=2)  # decoded tokens appended to both rows
    with torch.no_grad():
        cache = model.new_cache(batch_size=2, max_len=16)
        steps = [model(ids, attention_mask=mask, cache=cache)[:, -1:]]
        for t in range(5):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            steps.append(model(extra[:, t : t + 1], attention_mask=mask, cache=cache))
        decoded = torch.cat(steps, dim=1)  # (2, 6, vocab): last prompt token + 5 decode steps
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, extra[i]])[None])[0, len(row) - 1 :]
            assert rel_err(decoded[i], alone) < FP32_TOL, f"{name} row {i}"


def test_bf16_stays_close_to_transformers_bf16(family, tmp_path):
    name, hf, folder = family
    model = minivlm.load_model(folder, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    v5 = save_checkpoint(hf, tmp_path, layout="v5")
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(v5, dtype=torch.bfloat16, attn_implementation="eager")
    ids = prompt(12, seed=9, batch=2)
    with torch.no_grad():
        ours, theirs = model(ids).float(), hf16(ids).logits.float()
    assert rel_err(ours, theirs) < BF16_TOL, name
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > BF16_TOL * theirs.abs().max()
    assert clear.sum() > clear.numel() // 2, "the race check would be vacuous"
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear]), name


def test_dtype_follows_config_when_not_given(tmp_path):
    hf = build_text_model("llama").to(torch.bfloat16)
    model = minivlm.load_model(save_checkpoint(hf, tmp_path, layout="v5"))
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert minivlm.load_model(tmp_path, dtype="float32").lm_head.weight.dtype == torch.float32


def test_logits_to_keep_returns_the_last_positions(family):
    _, _, folder = family
    model = minivlm.load_model(folder)
    ids = prompt(7)
    with torch.no_grad():
        last = model(ids, logits_to_keep=1)
    assert last.shape == (1, 1, 211)
    # A matmul over one row may sum in another order than over seven: last-bit differences only.
    assert rel_err(last, model(ids)[:, -1:]) < 1e-6


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
    """Some tied checkpoints store lm_head.weight too. transformers 5 ties the pair when the two
    copies are equal and loads them untied, with a warning, when they differ; so must we."""
    hf = build_text_model("qwen2")
    folder = save_checkpoint(hf, tmp_path, layout="v5")
    tensors = read_folder_tensors(folder)
    for differs in (False, True):
        embed = tensors["model.embed_tokens.weight"]
        tensors["lm_head.weight"] = torch.randn_like(embed) if differs else embed.clone()
        save_sharded(folder, tensors, 1)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = minivlm.load_model(folder)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == (not differs)
        assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == (not differs)
        assert any("differ in the checkpoint" in str(w.message) for w in caught) == differs
        ids = prompt(9)
        with torch.no_grad():
            assert rel_err(model(ids), ref(ids).logits) < FP32_TOL
