"""Images in, pixel arrays out: decoding, resizing, rescaling, normalising, cropping, padding.

The reference is transformers' PIL backend (`...ImageProcessorPil`), which resizes with Pillow as
the original LLaVA code did: pixels stay uint8 through every resize and crop, are rescaled in
float64 and stored as float32, then normalised in float32. Doing the same steps in the same
dtypes gives the same floats, bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .files import env_number

# preprocessor_config.json's `resample` numbers are PIL's filter numbers.
RESAMPLE = {
    0: Image.Resampling.NEAREST,
    1: Image.Resampling.LANCZOS,
    2: Image.Resampling.BILINEAR,
    3: Image.Resampling.BICUBIC,
    4: Image.Resampling.BOX,
    5: Image.Resampling.HAMMING,
}
# The most pixels a decoded image may have: Pillow's own decompression-bomb threshold (about
# 9459 x 9459). What the tiling makes of it (a resized or padded image, a padded stack of tiles)
# may hold RESIZED_FACTOR times that: 357,913,940 pixels, 1.4 GB as Pillow holds RGB, enough for
# LLaVA-1.5's 336 x 1,008,000 resize of a 1 x 3000 line. MINIVLM_MAX_IMAGE_PIXELS overrides the
# limit, and a processor's `max_image_pixels` overrides that for its own calls.
MAX_PIXELS = 89_478_485
RESIZED_FACTOR = 4
PIXELS_ENV = "MINIVLM_MAX_IMAGE_PIXELS"
_pixel_limit: contextvars.ContextVar[int | None] = contextvars.ContextVar("max_image_pixels", default=None)


class ImageError(ValueError):
    """An input that is not a usable image; the message names it."""


def max_image_pixels() -> int:
    """The pixel limit now in force: a processor's override, else $MINIVLM_MAX_IMAGE_PIXELS, else MAX_PIXELS."""
    limit = _pixel_limit.get()
    if limit is not None:
        return limit
    return env_number(PIXELS_ENV, MAX_PIXELS, int, ImageError)


@contextlib.contextmanager
def pixel_limit(limit: int | None):
    """Within the block, images may hold at most `limit` pixels (None: the environment's or the default)."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ImageError(
            f"max_image_pixels {limit!r}: expected a positive int, or None for ${PIXELS_ENV} or {MAX_PIXELS}"
        )
    token = _pixel_limit.set(limit)
    try:
        yield
    finally:
        _pixel_limit.reset(token)


def check_pixels(height: int, width: int, what: str, count: int = 1) -> None:
    """Refuse to make `count` images of height x width when that is more pixels than the limit allows."""
    limit = RESIZED_FACTOR * max_image_pixels()
    if height < 1 or width < 1:
        raise ImageError(f"{what}: {width}x{height} pixels; expected at least 1x1")
    if count * height * width > limit:
        raise ImageError(
            f"{what} makes {count * height * width:,} pixels, over the limit of {limit:,} "
            f"({RESIZED_FACTOR} x the {limit // RESIZED_FACTOR:,} a decoded image may hold: an image of an extreme "
            f"aspect ratio or size; set {PIXELS_ENV} or the processor's max_image_pixels to allow more)"
        )


def load_image(source: Any, name: str | None = None) -> Image.Image:
    """A path, bytes, numpy array or PIL image -> an RGB PIL image.

    Files are decoded fully here, so that a truncated file fails now with its name, not later in a
    resize. A file's EXIF orientation is applied (as transformers' `load_image`); a PIL image handed
    in is taken as it is. An animated image (GIF, APNG, WebP) gives its first frame, as in transformers.
    """
    name = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    if isinstance(source, np.ndarray):
        source = _from_array(source, name)
    if isinstance(source, Image.Image):
        _checked_size(source, name)
        try:
            source.load()  # a lazily opened file: decode now, so that a truncated one fails here
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: cannot decode the image ({e})") from None
        return to_rgb(source, name)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError(f"{name}: minivlm does not fetch URLs; download the image and pass its path or bytes")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ImageError(f"{name}: no such image file")
        with open(source, "rb") as f:
            source = f.read()
    if isinstance(source, memoryview):
        source = source.tobytes()
    if not isinstance(source, (bytes, bytearray)):
        raise ImageError(f"{name}: not an image (expected a path, bytes, a numpy array or a PIL image)")
    if not source:
        raise ImageError(f"{name}: an empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its limit and refuses above twice it; minivlm's own limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source))
            _checked_size(image, name)
            image.load()
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"{name}: refusing to decode an image this large ({e}; Pillow's own limit, "
            "PIL.Image.MAX_IMAGE_PIXELS, applies too)"
        ) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name}: cannot decode the image ({e})") from None
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        pass  # unreadable EXIF: the pixels as stored, which is what transformers gets when it cannot rotate
    return to_rgb(image, name)


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    """uint8 (H, W) or (H, W, C) with C in 1, 2, 3, 4 (grey, grey + alpha, RGB, RGBA) -> a PIL image."""
    shape = array.shape
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and shape[2] not in (1, 2, 3, 4)):
        raise ImageError(
            f"{name}: expected a uint8 array (H, W) or (H, W, C) with C 1, 2, 3 or 4, got {array.dtype} {shape}"
        )
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name}: the image is empty ({shape[1]}x{shape[0]})")
    return Image.fromarray(np.ascontiguousarray(array))


FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_video_frames(folder: str | os.PathLike, max_frames: int | None = None) -> list[Image.Image]:
    """A video given as a folder of frame images (sorted by name), as LLaVA-Interleave reads one;
    with `max_frames`, that many frames sampled evenly, first and last included. Decoding a video
    file is left to the user's tool of choice (ffmpeg -i clip.mp4 -vf fps=1 frames/%04d.png)."""
    if not os.path.isdir(folder):
        raise ImageError(f"{os.fspath(folder)}: not a folder of video frames")
    paths = sorted(p for p in os.listdir(folder) if p.lower().endswith(FRAME_SUFFIXES))
    if not paths:
        raise ImageError(f"{os.fspath(folder)}: no frame images in it (expected {', '.join(FRAME_SUFFIXES)} files)")
    if max_frames is not None and 0 < max_frames < len(paths):
        step = (len(paths) - 1) / max(max_frames - 1, 1)
        paths = [paths[round(i * step)] for i in range(max_frames)]
    return [load_image(os.path.join(folder, p)) for p in paths]


def _checked_size(image: Image.Image, name: str) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ImageError(f"{name}: the image is empty ({image.width}x{image.height})")
    limit = max_image_pixels()
    if image.width * image.height > limit:
        raise ImageError(
            f"{name}: refusing to decode an image this large (Image size ({image.width * image.height} pixels) "
            f"exceeds limit of {limit} pixels: {image.width}x{image.height}; set {PIXELS_ENV} to allow more)"
        )
    return image


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Any mode -> RGB. Transparent pixels become white (composited, as transformers' convert_to_rgb);
    16-bit and 32-bit grey are scaled down to 8 bits.

    The scaling is a deliberate deviation: transformers converts 16-bit grey with Pillow's plain
    convert("RGB"), which clips every value above 255 and turns most such photos white.
    A mode Pillow cannot convert (La, a raw mode) is an ImageError naming it.
    """
    try:
        return _to_rgb(image)
    except (ValueError, OSError, TypeError) as e:
        raise ImageError(
            f"{name}: cannot convert a {image.mode} image to RGB ({e}); expected a mode Pillow converts "
            "(1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I, I;16, F, ...)"
        ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        lo, hi = float(values.min()), float(values.max())
        image = Image.fromarray(((values - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Pixel operations. A "pixel array" is uint8 (C, H, W) until `rescale_normalize`.


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()  # (H, W, C) -> (C, H, W)


def resize(pixels: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 (C, H, W) -> uint8 (C, height, width) through Pillow, as transformers' PIL backend."""
    return to_array(_resized(pixels, height, width, resample))


def _resized(pixels: np.ndarray, height: int, width: int, resample: int) -> Image.Image:
    """The resized PIL image; a target over the pixel limit is refused before any memory is spent on it."""
    check_pixels(height, width, f"resizing {pixels.shape[2]}x{pixels.shape[1]} to {width}x{height}")
    return Image.fromarray(pixels.transpose(1, 2, 0)).resize((width, height), resample=RESAMPLE[resample])


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """The (height, width) with the shorter side `shortest`, truncating the longer as transformers does."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop the centre; an image smaller than the crop is first centred on black (transformers' center_crop)."""
    _, h, w = pixels.shape
    if h < height or w < width:
        check_pixels(max(h, height), max(w, width), f"centring {w}x{h} on a {max(w, width)}x{max(h, height)} canvas")
        canvas_h, canvas_w = max(h, height), max(w, width)
        canvas = np.zeros((pixels.shape[0], canvas_h, canvas_w), dtype=pixels.dtype)
        top, left = -(-(canvas_h - h) // 2), -(-(canvas_w - w) // 2)  # ceil: the extra row goes on top
        canvas[:, top : top + h, left : left + w] = pixels
        pixels, h, w = canvas, canvas_h, canvas_w
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[:, top : top + height, left : left + width]


def pad_to_square(pixels: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    """Centre on a square of `color` (the original LLaVA's expand2square)."""
    c, h, w = pixels.shape
    if h == w:
        return pixels
    side = max(h, w)
    check_pixels(side, side, f"padding {w}x{h} to a square")
    square = np.empty((c, side, side), dtype=pixels.dtype)
    square[:] = np.asarray(color, dtype=pixels.dtype)[:, None, None]
    top, left = (side - h) // 2, (side - w) // 2
    square[:, top : top + h, left : left + w] = pixels
    return square


def rescale_normalize(pixels: np.ndarray, config: "ImageConfig") -> np.ndarray:
    """uint8 (C, H, W) -> float32 (C, H, W): rescaled in float64 then stored as float32, normalised in float32."""
    out = pixels
    if config.do_rescale:
        out = (out.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
        out = (out.astype(np.float32) - mean) / std
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The checkpoint's preprocessing settings


@dataclass(frozen=True)
class ImageConfig:
    """preprocessor_config.json, as the image processors read it."""

    processor_type: str
    resample: int = 3
    do_resize: bool = True
    size: tuple[tuple[str, int], ...] = (("shortest_edge", 224),)  # a frozen dict
    do_center_crop: bool = False
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    pad_to_square: bool = False  # LLaVA-1.5's do_pad: centre on a square of the mean colour first
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT
    do_image_splitting: bool = False  # Idefics3
    max_image_size: int = 364  # Idefics3: the tile side

    @property
    def size_dict(self) -> dict[str, int]:
        return dict(self.size)

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "preprocessor_config.json") -> "ImageConfig":
        kind = str(d.get("image_processor_type", "")).removesuffix("Fast").removesuffix("Pil")
        defaults = PROCESSOR_DEFAULTS.get(kind)
        if defaults is None:
            raise ImageError(
                f"{source}: image_processor_type {kind!r} is not supported; minivlm knows {sorted(PROCESSOR_DEFAULTS)}"
            )
        d = {**defaults, **{k: v for k, v in d.items() if v is not None}}
        crop = d.get("crop_size") or {}
        crop = (crop["height"], crop["width"]) if "height" in crop else (crop.get("shortest_edge", 224),) * 2
        if len(d["image_mean"]) != 3 or len(d["image_std"]) != 3:
            raise ImageError(f"{source}: image_mean and image_std need 3 values each")
        return cls(
            processor_type=kind,
            resample=int(d["resample"]),
            do_resize=bool(d["do_resize"]),
            size=tuple(sorted((k, int(v)) for k, v in d["size"].items())),
            do_center_crop=bool(d.get("do_center_crop", False)),
            crop_size=crop,
            do_rescale=bool(d["do_rescale"]),
            rescale_factor=float(d["rescale_factor"]),
            do_normalize=bool(d["do_normalize"]),
            image_mean=tuple(float(x) for x in d["image_mean"]),
            image_std=tuple(float(x) for x in d["image_std"]),
            pad_to_square=kind == "LlavaImageProcessor" and bool(d.get("do_pad", False)),
            image_grid_pinpoints=tuple((int(h), int(w)) for h, w in d.get("image_grid_pinpoints") or ()),
            do_image_splitting=bool(d.get("do_image_splitting", False)),
            max_image_size=int((d.get("max_image_size") or {}).get("longest_edge", 364)),
        )


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# Each processor class's own defaults, for the fields a preprocessor_config.json leaves out.
PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(
        resample=3,
        do_resize=True,
        size={"shortest_edge": 224},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ),
    "LlavaImageProcessor": dict(
        resample=3,
        do_resize=True,
        size={"shortest_edge": 224},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_pad=False,
    ),
    "SiglipImageProcessor": dict(
        resample=3,
        do_resize=True,
        size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=(0.5,) * 3,
        image_std=(0.5,) * 3,
    ),
    "LlavaNextImageProcessor": dict(
        resample=3,
        do_resize=True,
        size={"shortest_edge": 224},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_pad=True,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    ),
    "Idefics3ImageProcessor": dict(
        resample=1,
        do_resize=True,
        size={"longest_edge": 4 * 364},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=(0.5,) * 3,
        image_std=(0.5,) * 3,
        do_pad=True,
        do_image_splitting=True,
        max_image_size={"longest_edge": 364},
    ),
}


def preprocess_single(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """CLIP, SigLIP and LLaVA-1.5: one RGB image -> float32 (3, H, W)."""
    return preprocess_pixels(to_array(image), config)


def preprocess_pixels(pixels: np.ndarray, config: ImageConfig) -> np.ndarray:
    """uint8 (3, H, W) -> float32 (3, H', W'): pad to square, resize, crop, rescale, normalise, as configured."""
    if config.pad_to_square:
        pixels = pad_to_square(pixels, tuple(int(m * 255) for m in config.image_mean))
    if config.do_resize:
        size = config.size_dict
        if "shortest_edge" in size:
            height, width = shortest_edge_size(pixels.shape[1], pixels.shape[2], size["shortest_edge"])
        else:
            height, width = size["height"], size["width"]
        image = _resized(pixels, height, width, config.resample)
        crop_h, crop_w = config.crop_size
        if config.do_center_crop and image.height >= crop_h and image.width >= crop_w:
            # Crop before leaving Pillow: the same pixels as center_crop, without copying a long strip.
            top, left = (image.height - crop_h) // 2, (image.width - crop_w) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h))
        pixels = to_array(image)
    if config.do_center_crop:
        pixels = center_crop(pixels, *config.crop_size)
    return rescale_normalize(pixels, config)
