"""The fast path's decode step (DecoderLM.decode_step) under torch.compile.

- It is one graph with no break, for every text architecture, with and without a padding mask:
  `torch._dynamo.explain` counts the graphs and the breaks (a break would run the step in pieces,
  with Python between them, and rule out CUDA graphs). generation compiles with fullgraph=True, so
  a break would also be an error there.
- `compile=True` gives the tokens eager decoding gives, and transformers' (inductor on this CPU;
  one compile of a tiny model, about 20 s on two cores).
- The reference path refuses to compile (it is the eager definition).
- generate() asks the host whether every row is done only every CHECK_EVERY steps; the padding
  steps it runs past the end are cut: its output equals the step-by-step loop's.

The Triton path cannot be traced here: dynamo handles triton kernels only where a GPU is, and
triton's CPU interpreter is not traceable. The one graph break known in it (torch.result_type in
kernels/norms.py) is gone; tracing it is on ../shared/GPU.md's list.
"""

from __future__ import annotations

import pytest
import torch
from test_generation import hf_generate

import minivlm
from minivlm.bench.tiny.models import build_text_model, save_checkpoint
from minivlm.generation import CHECK_EVERY, GenerationError, generate_steps
from minivlm.steps import DecodeStep, prefill


def load(name, folder, kernels="auto"):
    hf = build_text_model(name)
    return hf, minivlm.load_model(save_checkpoint(hf, folder, layout="hub"), kernels=kernels)


def prompt(padded: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    return ids, mask


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2_window"])
def test_the_decode_step_is_one_graph(name, padded, tmp_path):
    _, model = load(name, tmp_path)
    ids, mask = prompt(padded)
    with torch.inference_mode():
        cache = model.new_cache(2, 24)
        token = prefill(model, ids, mask, cache).argmax(-1)
        step = DecodeStep(model, cache, mask)
        assert (step.kv_valid is not None) == padded
        explained = torch._dynamo.explain(model.decode_step)(
            token, step.positions, step.slot, step.kv_valid, step.rope, cache
        )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_generation_equals_eager_and_transformers(tmp_path):
    hf, model = load("qwen2_window", tmp_path)  # biases, GQA, a sliding window
    ids, mask = prompt(padded=True)
    expected = hf_generate(hf, ids, mask, None, 0)
    eager = minivlm.generate(model, ids, mask, max_new_tokens=expected.shape[1])
    compiled = minivlm.generate(model, ids, mask, max_new_tokens=expected.shape[1], compile=True)
    assert torch.equal(eager, expected)
    assert torch.equal(compiled, expected)


def test_the_reference_path_does_not_compile(tmp_path):
    _, model = load("llama", tmp_path, kernels="off")
    ids, mask = prompt(padded=False)
    with pytest.raises(GenerationError, match="reference path"):
        minivlm.generate(model, ids, mask, max_new_tokens=3, compile=True)


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_generate_cuts_the_steps_run_after_every_row_was_done(kernels, tmp_path):
    """Rows stopping at steps 3 and 5 of 40: generate() checks every CHECK_EVERY steps, runs a few
    steps of padding past the end, and must return exactly what the step-by-step loop yields."""
    _, model = load("llama", tmp_path, kernels=kernels)
    ids, mask = prompt(padded=True)
    free = minivlm.generate(model, ids, mask, max_new_tokens=40)
    stops = [int(free[0, 2]), int(free[1, 4])]
    steps = generate_steps(model, ids, mask, max_new_tokens=40, stop=minivlm.generation.StopRules(set(stops)))
    expected = torch.stack([token for token, _ in steps], dim=1)
    got = minivlm.generate(model, ids, mask, max_new_tokens=40, stop=stops)
    assert torch.equal(got, expected)
    assert got.shape[1] <= 5 < CHECK_EVERY  # the rows finished within the first check's steps
