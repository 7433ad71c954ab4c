"""Every family's processor and `python -m minivlm generate` on real vocabularies and real photos.

The tokenizers are real trained vocabularies of each family's kind (tests/real_files.py fetches
them: Mistral's SentencePiece model for LLaVA-1.5's Llama-2 kind, the Qwen vocabulary for
LLaVA-NeXT/Interleave's Qwen2, Meta's Llama-3 for Idefics3-8B-Llama3), with the family's image
tokens added by transformers. The photos are the ones matplotlib ships (a JPEG portrait and an RGBA
PNG). Expected: transformers' processor outputs, key by key and bit for bit, and transformers'
greedy answer, character for character.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest
import torch
import transformers
from PIL import Image
from real_files import real_folder

import minivlm
from minivlm.__main__ import main
from minivlm.bench.tiny import tiny_checkpoint

VOCABULARY = {"llava-1.5": "mistral", "llava-next": "qwen3", "llava-interleave": "qwen3", "idefics3": "llama3"}
PHOTOS = [
    Path(matplotlib.get_data_path()) / "sample_data" / name
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
]
NEW = 12


@pytest.fixture(scope="module", params=sorted(VOCABULARY))
def checkpoint(request, tmp_path_factory):
    family = request.param
    folder = tiny_checkpoint(family, tmp_path_factory.mktemp(family), vocabulary=real_folder(VOCABULARY[family]))
    return family, folder


def messages(images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def test_the_photos_are_real_files():
    assert Image.open(PHOTOS[0]).format == "JPEG" and Image.open(PHOTOS[1]).mode == "RGBA"


@pytest.mark.parametrize("images", [0, 1, 2])
def test_processor_equals_transformers(checkpoint, images):
    family, folder = checkpoint
    theirs, ours = transformers.AutoProcessor.from_pretrained(folder), minivlm.load_processor(folder)
    text = "Who is this? 谁？ 😀 Describe the\tpicture  in 3 words."
    prompt = ours.apply_chat_template(messages(images, text), add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(messages(images, text), add_generation_prompt=True)
    photos = [Image.open(p) for p in PHOTOS[:images]] or None
    expected = theirs(text=prompt, images=photos, return_tensors="pt")
    got = ours(text=prompt, images=photos)
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(torch.as_tensor(got[key]), expected[key]), key


@pytest.mark.parametrize("images", [0, 1])
def test_generate_prints_transformers_greedy_text(checkpoint, capsys, images):
    family, folder = checkpoint
    prompt = "Qui est-ce ? 这是谁？"
    argv = ["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", str(NEW)]
    for path in PHOTOS[:images]:
        argv += ["--image", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out

    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager")
    text = processor.apply_chat_template(messages(images, prompt), add_generation_prompt=True)
    inputs = processor(text=text, images=[Image.open(p) for p in PHOTOS[:images]] or None, return_tensors="pt")
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    expected = processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out == expected + "\n"
