"""LoRA against PEFT: an adapter minivlm saves loads in peft (a test dependency) on transformers'
model and gives the logits of minivlm's merged weights, and of minivlm's unmerged LoRA layers.

Tolerance: fp32, 1e-5 relative to the largest logit (the reference path against transformers'
eager attention, as the parity tests; merging adds B A to W once in fp32, where PEFT adds the
low-rank product to the activations: the same sum in another order)."""

from __future__ import annotations

import json

import pytest
import torch
from test_vlm import batch

import minivlm
from minivlm.bench.tiny.models import build_text_model, build_vlm_model, save_checkpoint
from minivlm.load import FAMILIES
from minivlm.parallel import RowParallelLinear
from minivlm.training import LoraConfig, LoraError, apply_lora, load_adapter, merge_lora, save_adapter

peft = pytest.importorskip("peft")  # the test extra installs it; a clear skip without it

TOL = 1e-5


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def random_updates(model: torch.nn.Module, seed: int) -> None:
    """Give every B matrix random values (a trained adapter's), so the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize(
    "name,targets",
    [("llava", ("q_proj", "v_proj")), ("idefics3", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))],
)
def test_a_vlm_adapter_loads_in_peft_with_the_merged_logits(name, targets, tmp_path):
    hf = build_vlm_model(name)
    folder = save_checkpoint(hf, tmp_path / "base", layout="hub")
    ours = minivlm.load_model(folder, kernels="off")
    config = LoraConfig(rank=4, alpha=8, targets=targets)
    layers = apply_lora(ours, config)
    assert len(layers) == len(targets) * ours.config.text.num_layers  # the decoder's only, not the tower's q_proj
    random_updates(ours, 0)
    family = FAMILIES[ours.config.model_type]
    adapter = save_adapter(ours, config, tmp_path / "adapter", family.hf_decoder)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    ids, mask, inputs, _ = batch(name, hf, [1, 2])
    with torch.no_grad():
        unmerged = ours(ids, mask, **inputs)
        merge_lora(ours)
        merged = ours(ids, mask, **inputs)
        with_peft = peft.PeftModel.from_pretrained(hf, adapter)
        theirs = with_peft(input_ids=ids, attention_mask=mask, **inputs).logits
        plain = hf(input_ids=ids, attention_mask=mask, **inputs).logits  # is the adapter active at all?
    real = mask.bool()
    assert rel(merged[real], theirs[real]) <= TOL
    assert rel(unmerged[real], theirs[real]) <= TOL
    with with_peft.disable_adapter(), torch.no_grad():
        base = with_peft(input_ids=ids, attention_mask=mask, **inputs).logits
    assert rel(base[real], theirs[real]) > 1e-3  # the update changes the logits: the comparison means something
    assert rel(plain[real], theirs[real]) <= TOL  # from_pretrained injected the adapter into hf itself


def test_a_text_adapter_round_trips_and_loads_in_peft(tmp_path):
    hf = build_text_model("qwen2")
    folder = save_checkpoint(hf, tmp_path / "base", layout="hub")
    ours = minivlm.load_model(folder, kernels="off")
    config = LoraConfig(rank=2, alpha=4, targets=("q_proj", "up_proj"))
    apply_lora(ours, config)
    random_updates(ours, 1)
    adapter = save_adapter(ours, config, tmp_path / "adapter", "model")
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours(ids)
        theirs = peft.PeftModel.from_pretrained(hf, adapter)(input_ids=ids).logits
    assert rel(mine, theirs) <= TOL
    # minivlm reads the adapter back onto a fresh model: the same logits
    again = minivlm.load_model(folder, kernels="off")
    assert load_adapter(again, adapter, "model").targets == ("q_proj", "up_proj")
    with torch.no_grad():
        assert torch.equal(again(ids), mine)


def test_lora_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(LoraError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(LoraError, match="targets"):
        LoraConfig(targets=("fc1",))
    with pytest.raises(LoraError, match="dropout"):
        LoraConfig(dropout=1.5)
    hf = build_text_model("llama3")
    ours = minivlm.load_model(save_checkpoint(hf, tmp_path / "base", layout="hub"))
    apply_lora(ours, LoraConfig())
    with pytest.raises(LoraError, match="already"):
        apply_lora(ours, LoraConfig())
    (tmp_path / "bad").mkdir()
    with pytest.raises(LoraError, match="adapter_config.json"):
        load_adapter(minivlm.load_model(tmp_path / "base"), tmp_path / "bad", "model")
    # A tensor-parallel layer (an ops.Linear too) would lose its all-reduce under a LoRA wrapper.
    split = minivlm.load_model(tmp_path / "base", kernels="off")
    attention = split.model.layers[0].self_attn
    attention.o_proj = RowParallelLinear(attention.o_proj.in_features, attention.o_proj.out_features, bias=False)
    with pytest.raises(LoraError, match=r"model.layers.0.self_attn.o_proj is a RowParallelLinear"):
        apply_lora(split, LoraConfig())
    # The LoRA layers take the model's path, whatever class the base layer had.
    plain = minivlm.load_model(tmp_path / "base", kernels="off")
    plain.model.layers[0].self_attn.q_proj = torch.nn.Linear(*plain.model.layers[0].self_attn.q_proj.weight.T.shape)
    apply_lora(plain, LoraConfig())
    assert {m.kernels for m in plain.modules() if hasattr(m, "kernels")} == {"off"}


def test_an_adapter_peft_itself_wrote_loads_into_minivlm(tmp_path):
    """An adapter made by someone else's code: peft's get_peft_model + save_pretrained on
    transformers' model, with random B matrices; minivlm reads it and gives peft's logits."""
    hf = build_text_model("llama3")
    folder = save_checkpoint(hf, tmp_path / "base", layout="hub")
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    wrapped.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = wrapped(input_ids=ids).logits
    ours = minivlm.load_model(folder, kernels="off")
    config = load_adapter(ours, tmp_path / "adapter", "model")
    assert config.targets == ("q_proj", "v_proj") and config.rank == 4
    with torch.no_grad():
        assert rel(ours(ids), theirs) <= TOL
