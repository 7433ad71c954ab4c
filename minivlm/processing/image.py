"""Images in: decoding a file, bytes, an array or a PIL image into RGB, video frames from a folder,
and the bound on pixels that keeps a decompression bomb or a huge resize from taking the
machine's memory. What happens to the pixels next is in pixels.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import os
import warnings
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
