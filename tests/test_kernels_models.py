"""Whole tiny models of every family through the Triton kernels (MINIVLM_KERNELS=1; under triton's
CPU interpreter without a GPU) against transformers, with the parity tests' fp32 tolerance: the
logits of a left-padded batch with images (real tokens), and greedy generation token for token,
which runs the decode path of the attention kernel against a growing KV cache."""

from __future__ import annotations

import pytest
import torch
from test_fast_path import text_model_matches_transformers, vlm_matches_transformers
from test_vlm import FP32_TOL, rel_err

import minivlm
from minivlm import ops
from minivlm.bench.tiny.models import TEXT_CONFIGS, VLM_CONFIGS, build_text_model, save_checkpoint
from minivlm.ops import KernelsError

pytest.importorskip("triton", reason="the kernels need triton")


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv("MINIVLM_KERNELS", "1")


@pytest.mark.parametrize("name", sorted(VLM_CONFIGS))
def test_vlm_through_kernels_matches_transformers(name, tmp_path):
    vlm_matches_transformers(name, tmp_path, "on")


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_model_through_kernels_matches_transformers(name, tmp_path):
    text_model_matches_transformers(name, tmp_path, "on")


def test_llama3v_through_kernels_matches_its_reference(tmp_path):
    from test_llama3v import photo, reference_greedy

    from minivlm.bench.tiny.llama3v import llama3v_checkpoint

    ref = llama3v_checkpoint(tmp_path)
    model, processor = minivlm.load_model(tmp_path), minivlm.load_processor(tmp_path)
    inputs = processor(text="<image>What is it?", images=[photo(100, 50, 0)])
    with torch.no_grad():
        embeds = ref.embeds(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
        theirs = ref.llm(inputs_embeds=embeds).logits
        ours = model(**inputs)
    assert rel_err(ours, theirs) < FP32_TOL
    expected = reference_greedy(ref, inputs, eos=[])
    assert torch.equal(minivlm.generate(model, **inputs, max_new_tokens=expected.shape[1]), expected)


def kernel_calls(model, monkeypatch) -> list:
    """The calls a forward pass of `model` makes to the RMSNorm kernel (replaced by a stand-in)."""
    from minivlm.kernels import norms

    calls = []
    monkeypatch.setattr(norms, "rms_norm", lambda *a, **k: calls.append(1) or a[0])
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    return calls


def test_the_kernels_ran(tmp_path, monkeypatch):
    """MINIVLM_KERNELS=1 does send the ops to the kernels (a dispatch that silently fell back
    would make every test above pass vacuously)."""
    model = minivlm.load_model(save_checkpoint(build_text_model("llama"), tmp_path, layout="hub"))
    assert model.kernels == "on" and model.model.norm.kernels == "on"
    assert kernel_calls(model, monkeypatch)


def test_the_choice_is_made_once_at_load(tmp_path, monkeypatch):
    """load_model reads MINIVLM_KERNELS once; its `kernels` argument overrides it; a later change
    of the environment does not reach a loaded model; a value it does not know is refused by name."""
    folder = save_checkpoint(build_text_model("llama"), tmp_path, layout="hub")
    off = minivlm.load_model(folder, kernels="off")
    assert {m.kernels for m in off.modules() if hasattr(m, "kernels")} == {"off"}
    assert not kernel_calls(off, monkeypatch)
    on = minivlm.load_model(folder)  # MINIVLM_KERNELS=1 (the fixture)
    monkeypatch.setenv("MINIVLM_KERNELS", "0")
    assert kernel_calls(on, monkeypatch)
    monkeypatch.setenv("MINIVLM_KERNELS", " ON ")  # the words kernels= takes, any case, spaces around
    assert minivlm.load_model(folder).kernels == "on"
    assert minivlm.load_model(folder, kernels=0).kernels == "off"
    monkeypatch.setenv("MINIVLM_KERNELS", "yes")
    with pytest.raises(KernelsError, match=r"MINIVLM_KERNELS='yes': expected auto \(or unset\), on \(1, true\) or off"):
        minivlm.load_model(folder)
    with pytest.raises(KernelsError, match="kernels='fast': expected auto"):
        minivlm.load_model(folder, kernels="fast")
    with pytest.raises(KernelsError, match="an op takes 'auto', 'on' or 'off'"):
        ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6, kernels=True)


def test_bad_choices_are_one_line_errors_at_load(tmp_path, monkeypatch, capsys):
    """Forced kernels where they cannot run fail when the model is loaded, not at its first op; the
    command line prints one line for a bad MINIVLM_KERNELS, and doctor does not blame the checkpoint."""
    from minivlm.__main__ import main

    folder = save_checkpoint(build_text_model("llama"), tmp_path, layout="hub")
    monkeypatch.setattr(ops, "_interpreting", lambda: False)  # as outside the tests: no TRITON_INTERPRET
    with pytest.raises(KernelsError, match="run on CUDA; on cpu they need TRITON_INTERPRET=1"):
        minivlm.load_model(folder, kernels="on")
    monkeypatch.setenv("MINIVLM_KERNELS", "yes")
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1"]) == 1
    assert capsys.readouterr().err.startswith("minivlm: error: MINIVLM_KERNELS='yes': expected auto")
    main(["doctor", str(folder)])  # (the folder has no tokenizer: doctor lists that, and only that)
    assert "cannot build the model" not in capsys.readouterr().out
