"""Bad input on the processing side (issue 15): every case ends in one clear error of the right
class, naming what is wrong and what was expected, or is handled as transformers' PIL-backend
processor handles it; never a traceback, a hang, or gigabytes of memory."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import minivlm
from minivlm import ProcessorError
from minivlm.bench.tiny.llama3v import TEMPLATE as LLAMA3V_TEMPLATE
from minivlm.bench.tiny.processors import PROCESSORS
from minivlm.bench.tiny.vocab import build_llava15, train_bpe
from minivlm.processing.chat import ChatTemplateError, find_chat_template, render
from minivlm.processing.geometry import anyres_token_count, unpadded_size
from minivlm.processing.image import ImageError, load_image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One processor folder per family, no weights: the builders of tests/test_processor.py, and llama3v's tokenizer."""
    out = {}
    for name in ("llava15", "next", "interleave", "idefics3"):
        folder = out[name] = tmp_path_factory.mktemp(name)
        build_llava15(folder) if name == "llava15" else train_bpe("smollm2" if name == "idefics3" else "qwen2", folder)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        tok.pad_token = tok.pad_token or "<|endoftext|>"
        PROCESSORS[name](tok).save_pretrained(folder)
    folder = out["llama3v"] = tmp_path_factory.mktemp("llama3v")
    train_bpe("llama3v", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": LLAMA3V_TEMPLATE, "pad_token": "!"})
    )
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama3v", "image_size": 448, "patch_size": 14, "query_num": 96})
    )
    return out


@pytest.fixture(scope="module")
def procs(folders):
    return {name: minivlm.load_processor(folder) for name, folder in folders.items()}


def png(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kwargs.pop("format", "PNG"), **kwargs)
    return buf.getvalue()


def photo(height=30, width=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- 1. sizes: a line of pixels, a bomb, an empty or single-pixel image ------------------------------


@pytest.mark.parametrize("family", ["llava15", "next", "interleave", "idefics3", "llama3v"])
def test_a_200_byte_line_of_30000_pixels(procs, family):
    """LLaVA-1.5 would resize it to 336 x 10,080,000 (13 GB): refused before the resize; the
    other families' tilings bound the resized size themselves and process it."""
    data = png(Image.new("RGB", (30000, 1), (200, 10, 10)))
    assert len(data) < 400
    start = time.monotonic()
    if family == "llava15":
        with pytest.raises(
            ImageError,
            match=r"image 0 \(30000x1, llava\): resizing 30000x1 to 10080000x336 .* over the limit .*MINIVLM_MAX_IMAGE_PIXELS",
        ):
            procs[family](text="<image>", images=[data])
    else:
        out = procs[family](text="<image>", images=[data])
        assert out["pixel_values"].numel() * 4 < 200e6
    assert time.monotonic() - start < 10


def test_the_pixel_limit_can_be_raised_and_lowered(procs, monkeypatch):
    line = Image.new("RGB", (1000, 1))  # LLaVA-1.5: 336 x 336,000 = 113 M pixels, under 4 x 89 M
    assert procs["llava15"](text="<image>", images=[line])["pixel_values"].shape == (1, 3, 336, 336)
    monkeypatch.setenv("MINIVLM_MAX_IMAGE_PIXELS", "10_000_000")
    with pytest.raises(ImageError, match=r"over the limit of 40,000,000 \(4 x the 10,000,000 a decoded image may hold"):
        procs["llava15"](text="<image>", images=[line])
    monkeypatch.setenv("MINIVLM_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ImageError, match=r"MINIVLM_MAX_IMAGE_PIXELS='lots': expected a positive whole number"):
        procs["llava15"](text="<image>", images=[line])
    monkeypatch.delenv("MINIVLM_MAX_IMAGE_PIXELS")
    procs["next"].max_image_pixels = 2000  # the 40x30 photo decodes; its anyres resize does not fit
    try:
        with pytest.raises(
            ImageError,
            match=r"image 0 \(40x30, llava_next\): resizing 40x30 to 448x336 makes 150,528 pixels, over the limit of 8,000",
        ):
            procs["next"](text="<image>", images=[photo()])
    finally:
        procs["next"].max_image_pixels = None


def test_decompression_bomb_under_pillows_hard_limit(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 200 M pixels in a few KB: over Pillow's 2x limit too
    with pytest.raises(
        ImageError, match=r"bomb.png: refusing to decode an image this large \(Image size \(200000000 pixels\)"
    ):
        load_image(bomb)


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_an_empty_image(procs, size):
    with pytest.raises(ImageError, match=r"image 0: the image is empty"):
        procs["interleave"](text="<image>", images=[Image.new("RGB", size)])


@pytest.mark.parametrize("family", ["llava15", "next", "interleave", "idefics3"])
def test_a_single_pixel_equals_transformers(folders, procs, family):
    hf = transformers.AutoProcessor.from_pretrained(folders[family])
    pixel = Image.new("RGB", (1, 1), (10, 200, 30))
    mine, theirs = (
        procs[family](text="<image>", images=[pixel]),
        hf(text="<image>", images=[pixel], return_tensors="pt"),
    )
    for key in mine:
        assert torch.equal(mine[key], theirs[key].to(mine[key].dtype)), key


# -- 2. odd modes and files ----------------------------------------------------------------------------


def _animated() -> bytes:
    frames = [Image.new("RGB", (16, 12), c) for c in ("red", "green", "blue")]
    return png(frames[0], format="GIF", save_all=True, append_images=frames[1:])


def _palette_alpha() -> Image.Image:
    return photo().convert("P").convert("PA")


ODD = {  # name -> an input transformers' PIL backend converts to RGB as minivlm does
    "animated_gif_first_frame": lambda: _animated(),
    "PA": _palette_alpha,
    "CMYK_jpeg": lambda: png(photo().convert("CMYK"), format="JPEG"),
    "1bit_png": lambda: png(photo().convert("1")),
    "LA_png": lambda: png(photo().convert("LA")),
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_modes_equal_transformers(folders, procs, name):
    hf = transformers.AutoProcessor.from_pretrained(folders["interleave"])
    source = ODD[name]()
    theirs_image = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else source
    mine = procs["interleave"](text="<image>", images=[source])
    theirs = hf(text="<image>", images=[theirs_image], return_tensors="pt")
    assert torch.equal(mine["pixel_values"], theirs["pixel_values"])


def test_float_image_is_stretched_to_8_bits():
    ramp = Image.fromarray(np.linspace(-1, 3, 20 * 30, dtype=np.float32).reshape(20, 30))
    rgb = np.asarray(load_image(ramp))
    assert ramp.mode == "F" and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


BAD_FILES = {
    "empty.png": (b"", r"empty.png\): an empty file \(0 bytes\), not an image"),
    "notes.png": (b"just some text, not a PNG", r"notes.png\): not an image file Pillow can read"),
    "cut.jpg": (None, r"cut.jpg\): cannot decode the image"),
    "cut.png": (None, r"cut.png\): cannot decode the image"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files(procs, tmp_path, name):
    data, message = BAD_FILES[name]
    if data is None:
        whole = png(photo(200, 200), format="JPEG" if name.endswith("jpg") else "PNG")
        data = whole[: len(whole) // 3]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageError, match=message):
        procs["interleave"](text="<image>", images=[tmp_path / name])


def test_a_lazily_opened_truncated_image(procs):
    lazy = Image.open(io.BytesIO(png(photo(200, 200))[:300]))
    with pytest.raises(ImageError, match=r"image 0: cannot decode the image \(image file is truncated"):
        procs["interleave"](text="<image>", images=[lazy])


def test_a_mode_pillow_cannot_convert():
    with pytest.raises(ImageError, match=r"cannot convert a La image to RGB .* expected a mode Pillow converts"):
        load_image(photo().convert("RGBA").convert("La"))


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((4, 4, 5), np.uint8), r"expected a uint8 array \(H, W\) or \(H, W, C\) with C 1, 2, 3 or 4, got uint8 \(4, 4, 5\)"),
    (np.zeros((4, 4, 3), np.float32), r"got float32"),
    (np.zeros((0, 4, 3), np.uint8), r"the image is empty"),
])  # fmt: skip
def test_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_grey_array_with_a_channel_axis():
    assert np.array_equal(np.asarray(load_image(np.full((4, 6, 1), 7, np.uint8))), np.full((4, 6, 3), 7, np.uint8))


def test_a_url_is_not_fetched():
    with pytest.raises(ImageError, match=r"minivlm does not fetch URLs"):
        load_image("https://example.com/cat.png")


# -- 3. chat templates ------------------------------------------------------------------------------

HELLO = [{"role": "user", "content": "hi"}]
TEMPLATES = {
    "nested_range": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     r"did not finish within 0.5 s .*MINIVLM_TEMPLATE_SECONDS"),
    "nested_list_loop": ("{% set x = range(100000)|list %}{% for a in x %}{% for b in x %}{% endfor %}{% endfor %}",
                         r"did not finish within 0.5 s"),
    "10^8_characters": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
                        r"asked for an output of more than 4,000,000 characters \(MINIVLM_MAX_PROMPT_CHARS"),
    "one_huge_string": ("{{ 'x' * 10**9 }}", r"a repetition of 1,000,000,000 characters"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                 r"namespace attribute 's' of 4,194,304 characters"),
    "center_filter": ("{{ 'x' | center(10**9) }}", r"a size argument of 1,000,000,000"),
    "format_width": ("{{ '%1000000000s' % 1 }}", r"a format width of 1,000,000,000"),
    "huge_power": ("{{ 10 ** 100000000 }}", r"the sandbox forbids: 10 \*\* 100000000 is a number of more than"),
    "recursive_macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"recursed too deeply"),
    "raise_exception": ("{{ raise_exception('Only user and assistant roles are supported!') }}",
                        r"refused the conversation: Only user and assistant roles are supported!"),
    "syntax_error": ("{% for m in messages %}{{ m.content }", r"does not parse: unexpected '}' \(line 1\)"),
    "not_a_string": (42, r"the chat template is a int; expected a jinja template string"),
    "division_by_zero": ("{{ 1 / 0 }}", r"failed: ZeroDivisionError"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_bad_templates(monkeypatch, name):
    monkeypatch.setenv("MINIVLM_TEMPLATE_SECONDS", "0.5")
    template, message = TEMPLATES[name]
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=message):
        render(template, HELLO)
    assert time.monotonic() - start < 3


def test_template_limits_can_be_raised(monkeypatch):
    monkeypatch.setenv("MINIVLM_MAX_PROMPT_CHARS", "5000000")
    assert len(render("{{ 'x' * 4500000 }}", HELLO)) == 4_500_000
    monkeypatch.setenv("MINIVLM_TEMPLATE_SECONDS", "-1")
    with pytest.raises(ChatTemplateError, match=r"MINIVLM_TEMPLATE_SECONDS='-1': expected a positive number"):
        render("hi", HELLO)


@pytest.mark.parametrize(("messages", "message"), [
    ("hello", r"messages: expected a list of dicts with a 'role', got str"),
    (None, r"messages: expected a list"),
    ([{"content": "no role"}], r"each message needs to be a dict with a 'role'"),
])  # fmt: skip
def test_bad_messages(procs, messages, message):
    with pytest.raises(ChatTemplateError, match=message):
        procs["interleave"].apply_chat_template(messages)


def test_llama3v_content_that_is_not_dicts(procs):
    with pytest.raises(ChatTemplateError, match=r"content list holds \['str'\]; expected dicts"):
        procs["llama3v"].apply_chat_template([{"role": "user", "content": ["hi"]}])


def test_a_shipped_template_that_is_not_a_string(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": {"oops": 1}}))
    with pytest.raises(
        ChatTemplateError, match=r"tokenizer_config.json: chat_template is a dict; expected a jinja string"
    ):
        find_chat_template(tmp_path)


def test_a_long_prompt_is_refused_before_tokenizing(procs, monkeypatch):
    monkeypatch.setenv("MINIVLM_MAX_PROMPT_CHARS", "1000")
    start = time.monotonic()
    with pytest.raises(
        ProcessorError, match=r"prompt 1 is 2,000 characters, over the limit of 1,000 \(MINIVLM_MAX_PROMPT_CHARS"
    ):
        procs["interleave"](text=["short", "y" * 2000])
    assert time.monotonic() - start < 1


# -- 4. processor arguments -------------------------------------------------------------------------


PROCESSOR_CASES = {
    "count_mismatch": (dict(text="<image> <image>", images=[photo()]), r"the prompt has 2 <image> tokens \(2\) but 1 images were given"),
    "image_token_without_image": (dict(text="what is <image>?"), r"the prompt has 1 <image> tokens \(1\) but 0 images"),
    "padding_middle": (dict(text=["a", "a b c"], padding_side="middle"), r"padding_side 'middle': expected 'left' or 'right'"),
    "padding_middle_one_prompt": (dict(text="a", padding_side="middle"), r"padding_side 'middle'"),
    "no_text": (dict(images=[photo()]), r"no text: pass the prompt"),
    "text_not_str": (dict(text=5), r"text: expected a prompt \(str\) or a non-empty list of prompts, got int 5"),
    "text_list_with_none": (dict(text=["a", None]), r"text\[1\]: expected a str, got NoneType"),
    "empty_text_list": (dict(text=[]), r"non-empty list of prompts"),
    "image_lists_swapped": (dict(text=["<image> a", "b"], images=[[], [photo()]]),
                            r"prompt 0 has 1 <image> tokens but its list holds 0 images"),
    "image_lists_too_few": (dict(text=["<image> a", "<image> b"], images=[[photo()]]), r"1 lists of images for 2 prompts"),
    "image_lists_mixed": (dict(text=["<image>", "<image>"], images=[photo(), [photo()]]), r"not a mix"),
    "videos_not_a_list": (dict(text="<video>", videos=photo()), r"videos: expected a list with one video per <video>"),
    "return_tensors_np": (dict(text="hi", return_tensors="np"), r"return_tensors 'np': expected 'pt' or None"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PROCESSOR_CASES))
def test_bad_processor_arguments(procs, name):
    kwargs, message = PROCESSOR_CASES[name]
    with pytest.raises(ProcessorError, match=message):
        procs["interleave"](**kwargs)


@pytest.mark.parametrize("family", ["next", "idefics3", "llama3v"])
def test_videos_to_a_family_without_video_support(procs, family):
    with pytest.raises(
        ProcessorError,
        match=rf"videos are read by LLaVA-Interleave \(llava\) checkpoints; this one is {family.replace('next', 'llava_next')}, which has no video support",
    ):
        procs[family](text="<video> <image>", videos=[[photo(), photo()]])


def test_per_prompt_image_lists_equal_transformers(folders, procs):
    hf = transformers.AutoProcessor.from_pretrained(folders["interleave"])
    a, b = photo(seed=1), photo(50, 20, seed=2)
    mine = procs["interleave"](text=["<image> a", "b <image>"], images=[[a], [b]])
    theirs = hf(text=["<image> a", "b <image>"], images=[a, b], return_tensors="pt", padding=True)
    for key in mine:
        assert torch.equal(mine[key], theirs[key].to(mine[key].dtype)), key


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (-1, 3)])
def test_next_image_sizes_with_zero(size):
    with pytest.raises(ImageError, match=r"expected a \(height, width\) of whole numbers, each at least 1"):
        anyres_token_count(*size, [[336, 672]], 336, 24)
    with pytest.raises(ImageError, match=r"each at least 1"):
        unpadded_size(*size, 24, 48)


def test_idefics3_padding_slots_are_the_only_all_zero_masks(procs):
    """An all-zero pixel_attention_mask comes only from a padding slot (a prompt with fewer tiles
    than another); those slots' pixels are zero too. A real image's slot always has ones."""
    out = procs["idefics3"](text=["<image>", "no image"], images=[[photo()], []])
    mask, pixels = out["pixel_attention_mask"], out["pixel_values"]
    assert mask[0].flatten(1).any(1).all()
    assert not mask[1].any() and not pixels[1].any()
