"""The whole processor against transformers' processors: the same checkpoint files (tokenizer,
image settings, processor settings, chat template) give the same input_ids, attention_mask and
pixel inputs, for one image, several, none, and a padded batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import minivlm
from minivlm import ProcessorError
from minivlm.bench.tiny.processors import PROCESSORS
from minivlm.bench.tiny.vocab import build_llava15, train_bpe
from minivlm.processing.image import ImageError


@pytest.fixture(scope="module", params=sorted(PROCESSORS))
def processors(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava15":
        build_llava15(folder)  # SentencePiece, as LLaVA-1.5's Vicuna tokenizer
    else:
        train_bpe("smollm2" if request.param == "idefics3" else "qwen2", folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or "<|endoftext|>"
    PROCESSORS[request.param](tok).save_pretrained(folder)
    return transformers.AutoProcessor.from_pretrained(folder), minivlm.load_processor(folder)


def image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


CASES = {
    "one": (["<image>\nWhat is this? 😀"], [(300, 500)]),
    "two": (["Compare <image> and <image>: which is brighter?"], [(333, 333), (100, 700)]),
    "none": (["Just text, no image."], []),
    "batch": (["<image> left", "a longer prompt with two images <image> here <image> there"], [(500, 200), (50, 60), (400, 401)]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_inputs_equal_transformers(processors, case):
    hf, ours = processors
    texts, sizes = CASES[case]
    images = [image(h, w, i) for i, (h, w) in enumerate(sizes)]
    text = texts if len(texts) > 1 else texts[0]
    theirs = hf(text=text, images=images or None, return_tensors="pt", padding=True)
    mine = ours(text=text, images=images)
    assert set(mine) == set(theirs) - {"mm_token_type_ids"}
    for key in mine:
        assert mine[key].shape == theirs[key].shape, key
        assert torch.equal(mine[key], theirs[key].to(mine[key].dtype)), key
    assert mine["pixel_values"].dtype == torch.float32 if images else True


def test_chat_template_and_decode(processors):
    hf, ours = processors
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == hf.apply_chat_template(
        messages, add_generation_prompt=True
    )
    ids = hf(text="hello <|im_end|> world", return_tensors="pt")["input_ids"][0]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_image_count_must_match_the_prompt(processors):
    _, ours = processors
    with pytest.raises(ProcessorError, match=r"the prompt has 2 <image> tokens \(2\) but 1 images were given"):
        ours(text="<image> and <image>", images=[image(30, 30, 0)])
    with pytest.raises(ProcessorError, match=r"the prompts have 1 <image> tokens \(1, 0\) but 0 images were given"):
        ours(text=["<image>", "none"])


def test_video_is_its_frames(processors, tmp_path):
    """LLaVA-Interleave's video recipe: <video> becomes one image token per frame and the frames
    join the images where it stands. The reference is transformers given the expanded prompt."""
    hf, ours = processors
    if ours.family != "llava":
        with pytest.raises(ProcessorError, match=r"videos are read by LLaVA-Interleave \(llava\) checkpoints"):
            ours(text="<video>", videos=[[image(20, 20, 0)]])
        return
    frames = [image(90 + i, 120, 10 + i) for i in range(4)]
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"{i:03d}.png")
    photo = image(200, 300, 3)
    mine = ours(text="A photo <image> and a clip <video> what happens?", images=[photo], videos=[tmp_path])
    theirs = hf(
        text="A photo <image> and a clip " + "<image>" * 4 + " what happens?",
        images=[photo, *frames],
        return_tensors="pt",
    )
    for key in mine:
        assert torch.equal(mine[key], theirs[key].to(mine[key].dtype)), key
    with pytest.raises(ProcessorError, match=r"the prompt has 2 <video> tokens \(2\) but 1 videos were given"):
        ours(text="<video><video>", videos=[frames])
    with pytest.raises(ProcessorError, match=r"the prompt has 2 <image> tokens \(2\) but 1 images were given"):
        ours(text="<image><video>", images=[], videos=[frames[:1]])
    with pytest.raises(ImageError, match=r"missing: not a folder of video frames"):
        ours(text="<video>", videos=[tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=r"empty: no frame images in it"):
        ours(text="<video>", videos=[tmp_path / "empty"])
