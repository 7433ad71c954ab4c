"""Training's loss and labels against transformers.

- The loss and its gradients against transformers' `model(**inputs, labels=labels).loss` and its
  `.backward()`, on the tiny random checkpoints of LLaVA-1.5, NeXT, Interleave and Idefics3 and a
  text decoder: the connector's gradients and every parameter of decoder layer 1.
  Tolerance: fp32 on the reference path (kernels="off", transformers' eager arithmetic): 1e-5
  relative to the largest value (measured: 0 to 2e-7; the sums run in another order, since only
  the labelled positions go through lm_head). The fast path (torch SDPA forward and backward):
  1e-4 (SDPA's fused kernel sums in another order than eager attention; measured below 1e-5).
- Labels built from a two-turn conversation, against a hand-worked example on LLaVA-1.5's chat
  template (llava-hf's, with its {% generation %} marks) and the real Llama-2 vocabulary, and on
  LLaVA-Interleave's ChatML and the real Qwen vocabulary: exactly the tokens LLaVA learns (each
  answer and the end-of-sequence token that closes it), written out by hand.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from real_files import real_folder
from test_chat import TEMPLATES
from test_vlm import batch

import minivlm
from minivlm.bench.tiny import tiny_checkpoint
from minivlm.bench.tiny.models import build_text_model, build_vlm_model, save_checkpoint
from minivlm.training import IGNORE, LabelError, conversation_inputs, loss
from minivlm.weights import IDEFICS3_KEYS, LLAVA_KEYS, TEXT_KEYS

FAMILIES = {"llava": LLAVA_KEYS, "llava_next": LLAVA_KEYS, "llava_interleave": LLAVA_KEYS, "idefics3": IDEFICS3_KEYS}
TOLERANCE = {"off": 1e-5, "auto": 1e-4}


def rel(ours: torch.Tensor, theirs: torch.Tensor, floor: float = 1e-30) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=floor))


def labels_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Learn the text tokens of each row but its first (its BOS, as every real prompt masks it);
    padding and image tokens are IGNORE.

    The first real token stays unlearned for a reason besides realism: in a left-padded row its
    prediction would come from a padding position, whose query sees no key. Both sides then average
    every key (the same forward), but transformers masks by adding the dtype's minimum to the scores,
    which rounds the scores away in the forward pass and not in the backward, so its gradient through
    that position is not the gradient of its own forward; minivlm's masked_fill gives the true one
    (zero). Training batches are right-padded (data.collate), where no such position exists."""
    labels = ids.clone()
    labels[(mask == 0) | (ids == 200)] = IGNORE
    first = mask.argmax(dim=1)  # each row's first real position
    labels[torch.arange(len(ids)), first] = IGNORE
    return labels


def compare_gradients(hf, ours, table, kernels: str, compared: list[str]) -> None:
    """Each gradient relative to its own largest value; a tensor whose gradient is zero in exact
    arithmetic (a key's bias: softmax ignores a constant added to all of a query's scores) holds
    rounding noise on both sides, so it is measured against 1e-4 of the model's largest gradient."""
    theirs = {table.model_key(n): p.grad for n, p in hf.named_parameters() if p.grad is not None}
    floor = 1e-4 * max(float(g.abs().max()) for g in theirs.values())
    mine = dict(ours.named_parameters())
    for name in compared:
        assert mine[name].grad is not None, name
        err = rel(mine[name].grad, theirs[name], floor)
        assert err <= TOLERANCE[kernels], (name, err)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm(request, tmp_path_factory):
    hf = build_vlm_model(request.param)
    return request.param, hf, save_checkpoint(hf, tmp_path_factory.mktemp(request.param), layout="hub")


@pytest.mark.parametrize("kernels", ["off", "auto"])
def test_vlm_loss_and_gradients_equal_transformers(vlm, kernels):
    name, hf, folder = vlm
    ours = minivlm.load_model(folder, kernels=kernels)
    ids, mask, inputs, _ = batch(name, hf, [1, 2])  # two rows, left-padded (as parity's), one and two images
    labels = labels_of(ids, mask)
    hf.zero_grad()
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels, **inputs).loss
    theirs.backward()
    mine = loss(ours, ids, labels, mask, **inputs)
    mine.backward()
    assert abs(mine.item() - theirs.item()) <= TOLERANCE[kernels] * abs(theirs.item())
    layer = "language_model.model.layers.1."
    compared = [n for n, _ in ours.named_parameters() if n.startswith(("multi_modal_projector.", layer))]
    assert any(n.startswith("multi_modal_projector.") for n in compared) and any(n.startswith(layer) for n in compared)
    compare_gradients(hf, ours, FAMILIES[name], kernels, compared)
    if name == "llava_next":  # the learned row separator is part of what stage 1 trains
        compare_gradients(hf, ours, FAMILIES[name], kernels, ["image_newline"])


@pytest.mark.parametrize("decoder", ["llama3", "qwen2", "mistral"])
def test_text_loss_and_gradients_equal_transformers(decoder, tmp_path):
    hf = build_text_model(decoder)
    folder = save_checkpoint(hf, tmp_path, layout="hub")
    ours = minivlm.load_model(folder, kernels="off")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    labels = labels_of(ids, mask)
    hf.train().zero_grad()
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    theirs.backward()
    mine = loss(ours, ids, labels, mask)
    mine.backward()
    assert abs(mine.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    compare_gradients(hf, ours, TEXT_KEYS, "off", [n for n, _ in ours.named_parameters() if ".layers.1." in n])


@pytest.mark.parametrize("bf16", [False, True])
def test_gradient_checkpointing_changes_no_gradient(vlm, bf16):
    """Recomputing the activations in the backward pass runs the same arithmetic: the same gradients,
    bit for bit, in fp32 and under bf16 autocast."""
    name, hf, folder = vlm
    ids, mask, inputs, _ = batch(name, hf, [2])
    labels = labels_of(ids, mask)
    grads = []
    for checkpointing in (False, True):
        ours = minivlm.load_model(folder)
        for module in ours.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = checkpointing
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = loss(ours, ids, labels, mask, **inputs)
        value.backward()
        grads.append({n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_loss_refuses_what_it_cannot_use(vlm):
    name, hf, folder = vlm
    ours = minivlm.load_model(folder)
    ids = torch.randint(0, 200, (1, 8))
    with pytest.raises(ValueError, match="no token to learn"):
        loss(ours, ids, torch.full_like(ids, IGNORE))
    with pytest.raises(ValueError, match="expected the shape of input_ids"):
        loss(ours, ids, ids[:, :4])
    with pytest.raises(ValueError, match="labels hold the id 99999"):
        loss(ours, ids, torch.full_like(ids, 99999))
    with pytest.raises(TypeError, match="integer token ids"):
        loss(ours, ids, ids.float())


# -- labels ---------------------------------------------------------------------------------------

TWO_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Orange."}]},
]


def learned_tokens(processor, out) -> list[str]:
    ids = [int(i) for i, label in zip(out["input_ids"][0], out["labels"][0]) if label != IGNORE]
    assert ids == [int(label) for label in out["labels"][0] if label != IGNORE]  # a label is its own token
    names = {i: t for t, i in processor.tokenizer.token_to_id.items()}
    return [names[i] for i in ids]


def test_llava15_labels_mask_what_llava_masks(tmp_path):
    """LLaVA's v1 conversation, "USER: <image>\\nQ ASSISTANT: A</s>USER: Q ASSISTANT: A</s>", learns
    each answer with its leading space and the </s> that ends it, and nothing of the rest."""
    folder = tiny_checkpoint("llava-1.5", tmp_path / "m", vocabulary=real_folder("llama2"))
    (folder / "chat_template.jinja").write_text(TEMPLATES["llava15"])  # llava-hf/llava-1.5-7b-hf's
    processor = minivlm.load_processor(folder)
    out = conversation_inputs(processor, TWO_TURNS, images=[torch.zeros(40, 30, 3, dtype=torch.uint8).numpy()])
    assert learned_tokens(processor, out) == ["▁A", "▁cat", ".", "</s>", "▁Orange", ".", "</s>"]
    text = processor.decode(out["input_ids"][0].tolist())
    assert text.endswith("ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT: Orange.</s>"), text
    image_id = processor.tokenizer.token_to_id["<image>"]
    assert int((out["input_ids"] == image_id).sum()) == 576  # LLaVA-1.5's 24x24 patches, all masked
    assert out["labels"].shape == out["input_ids"].shape == out["attention_mask"].shape
    assert out["pixel_values"].shape == (1, 3, 336, 336)


def test_chatml_labels_learn_each_answer_and_its_im_end(tmp_path):
    folder = tiny_checkpoint("llava-interleave", tmp_path / "m", vocabulary=real_folder("qwen3"))
    (folder / "chat_template.jinja").write_text(TEMPLATES["chatml_images"])
    processor = minivlm.load_processor(folder)
    out = conversation_inputs(processor, TWO_TURNS, images=[torch.zeros(40, 30, 3, dtype=torch.uint8).numpy()])
    assert learned_tokens(processor, out) == ["A", "Ġcat", ".", "<|im_end|>", "Orange", ".", "<|im_end|>"]
    # the newline after <|im_end|> is the template's layout: not learned
    ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    end = processor.tokenizer.token_to_id["<|im_end|>"]
    after_first_answer = ids.index(end, ids.index(end) + 1) + 1  # the user's <|im_end|>, then the answer's
    assert labels[after_first_answer + 1 :].count(IGNORE) > 0


def test_llama3s_own_template_learns_each_answer_and_its_eot(tmp_path):
    """The real Llama-3 tokenizer config's template, which writes an assistant header after the last
    turn even without a generation prompt: the header is not part of the answer."""
    folder = tiny_checkpoint("qwen2-text", tmp_path / "m", vocabulary=real_folder("llama3"))
    processor = minivlm.load_processor(folder)
    messages = [
        {"role": "user", "content": "What color?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    out = conversation_inputs(processor, messages)
    assert learned_tokens(processor, out) == ["Red", ".", "<|eot_id|>", "Yes", ".", "<|eot_id|>"]


def test_a_boundary_inside_a_token_is_refused(tmp_path):
    folder = tiny_checkpoint("qwen2-text", tmp_path / "m", vocabulary=real_folder("qwen3"))
    # The answer glued to the prompt's last word: "Is it" + "sunny" tokenizes as "Is", " its", "unny".
    glued = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (folder / "chat_template.jinja").write_text(glued)
    processor = minivlm.load_processor(folder)
    messages = [{"role": "user", "content": "Is it"}, {"role": "assistant", "content": "sunny"}]
    with pytest.raises(LabelError, match="inside a token"):
        conversation_inputs(processor, messages, eos_token="<|im_end|>")


def test_a_conversation_without_an_answer_is_refused(tmp_path):
    from minivlm.training import llava_messages

    with pytest.raises(LabelError, match="no assistant"):
        llava_messages([{"from": "human", "value": "<image>\nHi"}])
    with pytest.raises(LabelError, match="turn 1"):
        llava_messages([{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}])
    assert llava_messages([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]


def test_the_triton_kernels_step_aside_where_autograd_records(monkeypatch):
    """The kernels have no backward pass. Under "auto" an op whose inputs require grad takes the torch
    path (on CUDA; a CPU tensor never takes a kernel under "auto"); under "on" it is refused by name."""
    from minivlm import ops

    monkeypatch.setattr(ops, "_interpreting", lambda: True)  # "on" is allowed on the CPU only so
    x, w = torch.randn(2, 8), torch.ones(8, requires_grad=True)
    assert ops.use_kernels(x, "on", torch.ones(8))
    with pytest.raises(ops.KernelsError, match="no backward pass"):
        ops.use_kernels(x, "on", w)
    with torch.no_grad():
        assert ops.use_kernels(x, "on", w)  # inference: nothing records
    # Under "auto", a CUDA input takes the kernel unless autograd records (a stand-in: no GPU here).
    monkeypatch.setattr(ops, "_triton_kernels", lambda: object())
    cuda = SimpleNamespace(is_cuda=True, requires_grad=False)
    assert ops.use_kernels(cuda, "auto", torch.ones(8))
    assert not ops.use_kernels(cuda, "auto", w)
    with torch.no_grad():
        assert ops.use_kernels(cuda, "auto", w)
