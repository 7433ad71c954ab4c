"""Generation against transformers' `generate`, and the sampling rules against their definitions.

Greedy decoding is compared token for token with transformers' greedy `generate` (fp32, CPU) on
tiny random checkpoints of every family: one prompt, and left-padded batches with different image
counts and prompt lengths, with an EOS that ends one row early (transformers pads it after).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from test_vlm import batch

import minivlm
from minivlm.bench.tiny.models import TEXT_CONFIGS, VLM_CONFIGS, build_text_model, build_vlm_model, save_checkpoint
from minivlm.generation import (
    GenerationError,
    Sampling,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate_steps,
    sample,
)

NEW = 10


def hf_generate(hf, ids, mask, eos, pad, **inputs) -> torch.Tensor:
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        **inputs,
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return out[:, ids.shape[1] :]


@pytest.fixture(scope="module", params=sorted(VLM_CONFIGS))
def vlm(request, tmp_path_factory):
    hf = build_vlm_model(request.param)
    folder = save_checkpoint(hf, tmp_path_factory.mktemp(request.param), layout="hub")
    return request.param, hf, folder, minivlm.load_model(folder)


@pytest.mark.parametrize("images", [[1], [2, 1], [1, 3, 2]], ids=["one", "batch_2_1", "batch_1_3_2"])
def test_greedy_equals_transformers_generate(vlm, images):
    name, hf, _, model = vlm
    ids, mask, inputs, _ = batch(name, hf, images)
    free = minivlm.generate(model, ids, mask, max_new_tokens=NEW, **inputs)
    assert torch.equal(free, hf_generate(hf, ids, mask, None, 0, **inputs))
    # An EOS that the first row reaches early: that row stops (padded after), the others go on.
    eos = int(free[0, 2])
    model.generation_defaults = minivlm.generation.GenerationDefaults((eos,), 0, None)
    try:
        ours = minivlm.generate(model, ids, mask, max_new_tokens=NEW, **inputs)
    finally:
        del model.generation_defaults
    theirs = hf_generate(hf, ids, mask, eos, 0, **inputs)
    assert torch.equal(ours, theirs)
    first = int((free[0] == eos).nonzero()[0])  # where the first row first says it
    assert torch.equal(ours[0, : first + 1], free[0, : first + 1]) and (ours[0, first + 1 :] == 0).all()


def test_a_batch_row_gets_what_it_gets_alone(vlm):
    name, hf, _, model = vlm
    ids, mask, inputs, rows = batch(name, hf, [1, 3, 2])
    together = minivlm.generate(model, ids, mask, max_new_tokens=NEW, **inputs)
    for b in range(len(rows)):
        alone_ids, alone_mask, alone_px, _ = _row(name, hf, [1, 3, 2], b)
        alone = minivlm.generate(model, alone_ids, alone_mask, max_new_tokens=NEW, **alone_px)
        assert torch.equal(together[b], alone[0]), b


def _row(name, hf, images, b):
    """Row b of batch(...) on its own: its ids without padding and its own image inputs."""
    ids, mask, inputs, rows = batch(name, hf, images)
    first, last = sum(images[:b]), sum(images[: b + 1])
    if VLM_CONFIGS[name]["cls"] == "Idefics3Config":
        px = {k: v[b : b + 1, : images[b]] for k, v in inputs.items()}
    elif VLM_CONFIGS[name]["cls"] == "LlavaNextConfig":
        px = {"pixel_values": inputs["pixel_values"][first:last], "image_sizes": inputs["image_sizes"][first:last]}
    else:
        px = {"pixel_values": inputs["pixel_values"][first:last]}
    row = rows[b][None]
    return row, torch.ones_like(row), px, None


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_only_greedy_equals_transformers(name, tmp_path):
    hf = build_text_model(name)
    model = minivlm.load_model(save_checkpoint(hf, tmp_path))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a shorter, left-padded second row
    ours = minivlm.generate(model, ids, mask, max_new_tokens=NEW)
    assert torch.equal(ours, hf_generate(hf, ids, mask, None, 0))


def test_eos_from_generation_config(tmp_path):
    hf = build_text_model("qwen2")
    folder = save_checkpoint(hf, tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    free = minivlm.generate(minivlm.load_model(folder), ids, max_new_tokens=NEW)
    eos = int(free[0, 4])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [999, eos], "pad_token_id": 3}))
    ours = minivlm.generate(minivlm.load_model(folder), ids, max_new_tokens=NEW)
    first = int((free[0] == eos).nonzero()[0])  # the first time the free run says eos
    assert torch.equal(ours[0], free[0, : first + 1])


# -- sampling rules on fixed logits ------------------------------------------------------------

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 0.5, 3.0, -4.0, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4, -0.5, 9.0, -2.0, 0.0]])


def test_top_k_keeps_the_k_largest_and_their_ties():
    out = apply_top_k(LOGITS, 4)
    assert torch.isinf(out).sum(dim=1).tolist() == [3, 4]  # row 0: two 0.5s tie for the 4th place
    assert torch.equal(out, transformers.TopKLogitsWarper(4)(None, LOGITS.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.8, 0.95, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    out = apply_top_p(LOGITS, p)
    probs = LOGITS.softmax(-1)
    for row in range(2):
        kept = ~torch.isinf(out[row])
        assert probs[row][kept].sum() >= p - 1e-6 or kept.sum() == 1
        # minimal: dropping the least likely kept token would fall below p
        assert probs[row][kept].sum() - probs[row][kept].min() < p + 1e-6
    if p < 1.0:
        assert torch.equal(out, transformers.TopPLogitsWarper(p)(None, LOGITS.clone()))


def test_repetition_penalty_is_ctrls_rule():
    seen = torch.zeros_like(LOGITS, dtype=torch.bool)
    seen[0, [0, 1]] = True
    out = apply_repetition_penalty(LOGITS, seen, 2.0)
    assert out[0, 0] == 1.0 and out[0, 1] == -2.0 and torch.equal(out[1], LOGITS[1])
    theirs = transformers.RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1], [5, 5]]), LOGITS.clone())
    seen[1, 5] = True
    assert torch.equal(apply_repetition_penalty(LOGITS, seen, 2.0), theirs)


def test_temperature_and_sampling_follow_the_softmax():
    """Empirical frequencies of 20000 draws match softmax(logits / T) after top-k."""
    g = torch.Generator().manual_seed(0)
    logits = LOGITS[:1].expand(20000, -1)
    draws = sample(logits, Sampling(temperature=1.7, top_k=5), None, g)
    freq = torch.bincount(draws, minlength=8).float() / len(draws)
    expect = apply_top_k(LOGITS[:1] / 1.7, 5).softmax(-1)[0]
    assert (freq - expect).abs().max() < 0.015
    assert freq[torch.isinf(apply_top_k(LOGITS[:1], 5))[0]].sum() == 0


def test_greedy_ignores_the_generator_and_sampling_is_reproducible(vlm):
    name, hf, _, model = vlm
    ids, mask, inputs, _ = batch(name, hf, [1])
    runs = [
        minivlm.generate(model, ids, mask, max_new_tokens=NEW, temperature=1.5, top_p=0.9, seed=s, **inputs)
        for s in (7, 7, 8)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])  # a different seed samples differently (random weights: near-flat logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), r"max_new_tokens 0: expected a positive number of tokens"),
        (dict(max_new_tokens=-3), r"max_new_tokens -3: expected a positive number of tokens"),
        (dict(temperature=-1.0), r"temperature -1.0: expected 0 \(greedy\) or more"),
        (dict(top_p=0.0), r"top_p 0.0: expected a probability mass in \(0, 1\]"),
        (dict(top_k=-1), r"top_k -1: expected 0 \(off\) or a positive count"),
        (dict(stop=["x"]), r"stop strings need the tokenizer"),
    ],
)
def test_bad_arguments(kwargs, message, tmp_path):
    hf = build_text_model("llama")
    model = minivlm.load_model(save_checkpoint(hf, tmp_path))
    with pytest.raises(GenerationError, match=message):
        minivlm.generate(model, torch.ones(1, 4, dtype=torch.long), **{"max_new_tokens": 4, **kwargs})


def test_prompt_longer_than_the_context(tmp_path):
    hf = build_text_model("llama")
    model = minivlm.load_model(save_checkpoint(hf, tmp_path))
    context = model.generation_defaults.max_positions
    with pytest.raises(GenerationError, match=rf"the prompt is {context} tokens; the model's context is {context}"):
        minivlm.generate(model, torch.ones(1, context, dtype=torch.long), max_new_tokens=4)
    # Near the end of the context, generation stops at the context rather than running past it.
    out = minivlm.generate(model, torch.ones(1, context - 3, dtype=torch.long), max_new_tokens=10)
    assert out.shape == (1, 3)


def test_steps_stop_when_every_row_is_done(vlm):
    name, hf, _, model = vlm
    ids, mask, inputs, _ = batch(name, hf, [1])
    steps = list(generate_steps(model, ids, mask, max_new_tokens=NEW, **inputs))
    assert len(steps) == NEW and not steps[-1][1].any()


# -- stop strings and streaming, on a model that says a scripted text ----------------------------


class Scripted(torch.nn.Module):
    """A stand-in model whose next token is always the next id of a script (one prompt row)."""

    def __init__(self, script: list[int], vocab: int, eos: int):
        super().__init__()
        self.script, self.calls = script, 0
        self.config = type("Config", (), {"vocab_size": vocab})()
        self.generation_defaults = minivlm.generation.GenerationDefaults((eos,), eos, None)

    def new_cache(self, batch_size, max_len):
        return None

    def forward(self, input_ids, attention_mask=None, *, cache=None, logits_to_keep=0):
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), -1e4)
        logits[:, :, self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return logits


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from minivlm.bench.tiny.vocab import train_bpe
    from minivlm.processing.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("qwen2_tok")
    train_bpe("qwen2", folder)
    return load_tokenizer(folder)


ANSWER = "Sure: the cat 😀 sat. ### Next question: why?"


def scripted(tokenizer, text=ANSWER, end="<|im_end|>"):
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.token_to_id[end]]
    return Scripted(ids, tokenizer.vocab_size, tokenizer.token_to_id[end]), ids


def test_stop_string_across_tokens_keeps_the_completing_token(tokenizer):
    model, ids = scripted(tokenizer)
    stop = "t. ##"  # spans the tokens of "sat", ".", " ###"
    assert not any(stop in tokenizer.decode([i]) for i in ids)
    out = minivlm.generate(
        model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=50, stop=[stop], tokenizer=tokenizer
    )[0].tolist()
    assert out == ids[: len(out)]
    assert stop in tokenizer.decode(out) and stop not in tokenizer.decode(out[:-1])


def test_stop_id_and_eos(tokenizer):
    model, ids = scripted(tokenizer)
    out = minivlm.generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=50)[0].tolist()
    assert out == ids  # to the EOS, which is kept
    model, ids = scripted(tokenizer)
    out = minivlm.generate(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=50, stop=[ids[3]])[0].tolist()
    assert out == ids[:4]


@pytest.mark.parametrize("stop", [None, "###", "t. ##", "question: why?"])
def test_stream_shows_the_text_up_to_the_stop(tokenizer, stop):
    model, ids = scripted(tokenizer)
    pieces = list(
        minivlm.stream(
            model, tokenizer, torch.ones(1, 3, dtype=torch.long), max_new_tokens=50, stop=[stop] if stop else None
        )
    )
    expect = ANSWER if stop is None else ANSWER[: ANSWER.index(stop)]
    assert "".join(pieces) == expect
    assert all("\ufffd" not in p for p in pieces)  # the emoji's bytes span tokens; never half of it
    assert len(pieces) > 3  # streamed, not one piece at the end


def test_stream_takes_one_prompt(tokenizer):
    model, _ = scripted(tokenizer)
    with pytest.raises(GenerationError, match=r"stream\(\) takes one prompt; input_ids has 2 rows"):
        list(minivlm.stream(model, tokenizer, torch.ones(2, 3, dtype=torch.long)))


def test_stop_text_holds_back_a_possible_start_and_cuts_at_the_stop():
    """The stop-string matcher generate and stream share: text that may begin a stop string is held
    back until it cannot, a stop string split over pieces is found, and what follows it is dropped."""
    from minivlm.generation import StopText

    matcher = StopText(["</s>", "END"])
    assert matcher.push("hello <") == ("hello ", False)  # "<" may begin "</s>"
    assert matcher.push("b") == ("<b", False)  # it did not
    assert matcher.push("E") == ("", False)
    assert matcher.push("N") == ("", False)
    assert matcher.flush() == "EN"  # no more text: what was held is shown
    matcher = StopText(["</s>"])
    assert matcher.push("a</") == ("a", False)
    assert matcher.push("s>and more") == ("", True)
