"""Pixel arrays out: resizing, rescaling, normalising, cropping, padding, as each checkpoint's
preprocessor_config.json says (ImageConfig).

The reference is transformers' PIL backend (`...ImageProcessorPil`), which resizes with Pillow as
the original LLaVA code did: pixels stay uint8 through every resize and crop, are rescaled in
float64 and stored as float32, then normalised in float32. Doing the same steps in the same
dtypes gives the same floats, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .image import RESAMPLE, ImageError, check_pixels

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
