"""Image preprocessing against transformers' PIL-backend image processors (the reference: they
resize with Pillow, as the original LLaVA code did; see MODELS.md). The processors are configured
as the real checkpoints configure them, saved with save_pretrained, and read back by minivlm from
that preprocessor_config.json. Expected: the same shapes and the same floats, bit for bit."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from minivlm.processing.geometry import anyres_tiles, idefics3_tiles
from minivlm.processing.image import ImageError, load_image
from minivlm.processing.pixels import ImageConfig, preprocess_single

CLIP_336 = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
PROCESSORS = {
    "clip": lambda: CLIPImageProcessorPil(**CLIP_336),  # llava-hf/llava-1.5-7b-hf
    "llava_pad": lambda: LlavaImageProcessorPil(do_pad=True, **CLIP_336),  # expand2square in the mean colour
    "siglip": lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384}),  # llava-interleave
    "next": lambda: LlavaNextImageProcessorPil(**CLIP_336),  # llava-v1.6 pinpoints
    "idefics3": lambda: Idefics3ImageProcessorPil(),  # 4 x 364 longest edge, 364 tiles
    "smolvlm": lambda: Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}),
    "idefics3_nosplit": lambda: Idefics3ImageProcessorPil(do_image_splitting=False),
}
# (height, width): a pixel, a line each way, odd sides, exactly a tile, just over, every aspect class.
SIZES = [
    (1, 1),
    (1, 3000),
    (3000, 1),
    (7, 13),
    (335, 337),
    (336, 336),
    (337, 336),
    (384, 384),
    (375, 500),
    (200, 1000),
    (1000, 333),
    (672, 672),
    (365, 729),
]


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + height * 7 + width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return image
    if mode == "P_transparent":
        image = image.convert("P")
        image.info["transparency"] = 3
        return image
    return image.convert(mode)


@pytest.fixture(scope="module", params=sorted(PROCESSORS))
def processors(request, tmp_path_factory):
    hf = PROCESSORS[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    ours = ImageConfig.from_hf(__import__("json").loads((folder / "preprocessor_config.json").read_text()))
    return request.param, hf, ours


def ours_and_theirs(name, hf, ours, image):
    if name == "next":
        tiles, size = anyres_tiles(load_image(image), ours)
        out = hf(images=[image], return_tensors="np")
        assert tuple(out["image_sizes"][0]) == size
        return tiles, out["pixel_values"][0]
    if name.startswith(("idefics3", "smolvlm")):
        tiles, rows, cols = idefics3_tiles(load_image(image), ours)
        out = hf(images=[[image]], return_tensors="np", return_row_col_info=True)
        assert (rows, cols) == (out["rows"][0][0], out["cols"][0][0])
        assert out["pixel_attention_mask"].all()  # one image: nothing is padding
        return np.stack(tiles), out["pixel_values"][0]
    return preprocess_single(load_image(image), ours)[None], hf(images=[image], return_tensors="np")["pixel_values"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixels_equal_transformers(processors, size):
    name, hf, ours = processors
    a, b = ours_and_theirs(name, hf, ours, random_image(*size))
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "P_transparent", "CMYK", "LA", "1"])
def test_modes_equal_transformers(processors, mode):
    name, hf, ours = processors
    a, b = ours_and_theirs(name, hf, ours, random_image(61, 97, mode))
    assert np.array_equal(a, b)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    """A deliberate deviation from transformers, which clips 16-bit values above 255 to white."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb = np.asarray(load_image(Image.fromarray(ramp)))
    assert Image.fromarray(ramp).mode == "I;16"
    assert rgb.shape == (64, 64, 3) and rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 100 < rgb[32, 0, 0] < 155  # mid-grey stays mid-grey


def test_exif_orientation_of_a_file_is_applied(tmp_path):
    image = random_image(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)  # (width, height): now portrait


def test_bad_images_get_clear_errors(tmp_path):
    good = io.BytesIO()
    random_image(50, 50).save(good, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[:200])
    with pytest.raises(ImageError, match=r"truncated.png: cannot decode the image"):
        load_image(truncated)
    garbage = tmp_path / "notes.png"
    garbage.write_text("not an image")
    with pytest.raises(ImageError, match=r"notes.png: not an image file Pillow can read"):
        load_image(garbage)
    with pytest.raises(ImageError, match=r"missing.jpg: no such image file"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match=r"the image is empty \(0x5\)"):
        load_image(Image.new("RGB", (0, 5)))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(bomb)  # 100 M pixels, a few KB on disk
    with pytest.raises(
        ImageError,
        match=r"bomb.png: refusing to decode an image this large \(Image size \(100000000 pixels\) exceeds limit",
    ):
        load_image(bomb)
    with pytest.raises(ImageError, match=r"not an image \(expected a path"):
        load_image(3.5)
