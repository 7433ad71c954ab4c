"""How each family cuts an image, and how many tokens the cuts cost: pure arithmetic on sizes and
the cuts themselves (LLaVA-NeXT's anyres tiles, Idefics3's tiles, llama3v's slices).

Shared by the processors (which cut the pixels, through the tilings in tiling.py) and the models
(which stitch the tiles' features back together): both must agree to the token, so both call this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .image import ImageError
from .pixels import ImageConfig, preprocess_pixels, rescale_normalize, resize, to_array


def _positive(height, width, what: str = "image size") -> None:
    """Sizes come from images, or from a caller's image_sizes: a side of 0 would divide by zero below."""
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in (height, width)):
        raise ImageError(f"{what} ({height}, {width}): expected a (height, width) of whole numbers, each at least 1")


def select_best_resolution(height: int, width: int, candidates) -> tuple[int, int]:
    """LLaVA-NeXT anyres: the (height, width) among `candidates` that keeps the most of the image
    once it is scaled to fit, and among equals wastes the least padding.

    As transformers' `select_best_resolution` (image_processing_utils.py), including its int()
    truncation of the scaled size, which decides ties.
    """
    _positive(height, width)
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_h, cand_w in candidates:
        scale = min(cand_w / width, cand_h / height)
        scaled_w, scaled_h = int(width * scale), int(height * scale)
        effective = min(scaled_w * scaled_h, width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_h, cand_w), effective, wasted
    return best


def anyres_grid(height: int, width: int, pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of `tile`-sized tiles that LLaVA-NeXT cuts an image of this size into."""
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    return best_h // tile, best_w // tile


def unpadded_size(height: int, width: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    """The part of a (grid_h, grid_w) feature grid that holds the image, not the padding.

    The processor scaled the image to fit the padded canvas and centred it; this undoes that on
    the feature grid, as transformers' `unpad_image`: the side that was padded loses
    (padding // 2) on each end, rounding the scaled length to 7 decimals first.
    """
    _positive(height, width)
    _positive(grid_h, grid_w, "feature grid")
    if width / height > grid_w / grid_h:  # wider than the canvas: padded above and below
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return grid_h - 2 * pad, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return grid_h, grid_w - 2 * pad


# ---------------------------------------------------------------------------------------------
# Cutting the pixels. Pixel arrays are uint8 (C, H, W) until rescale_normalize (image.py).


def anyres_tiles(image, config: ImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """LLaVA-NeXT: one RGB image -> (tiles float32 (1 + rows*cols, 3, tile, tile), its (height, width)).

    The image is scaled to fit the best resolution from the pinpoints (keeping its aspect, rounding
    the scaled side up), centred on black, and cut into tiles row by row; the whole image squashed
    to one tile comes first. As transformers' LlavaNextImageProcessor.get_image_patches.
    """
    pixels = to_array(image)
    _, height, width = pixels.shape
    tile = config.crop_size[0]
    best_h, best_w = select_best_resolution(height, width, config.image_grid_pinpoints)
    scale_w, scale_h = best_w / width, best_h / height  # (the scale first: the float rounding must match)
    if scale_w < scale_h:
        new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
    scaled = resize(pixels, new_h, new_w, config.resample)
    canvas = np.zeros((3, best_h, best_w), dtype=np.uint8)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = scaled
    tiles = [canvas[:, r : r + tile, c : c + tile] for r in range(0, best_h, tile) for c in range(0, best_w, tile)]
    size = config.size_dict
    side = size.get("shortest_edge") or size["height"]
    base = resize(pixels, side, side, config.resample)
    # Each tile then takes the plain path (resize to the shortest edge and crop: a no-op at tile size).
    return np.stack([preprocess_pixels(t, config) for t in [base] + tiles]), (height, width)


def anyres_token_count(height: int, width: int, pinpoints, tile: int, patches_per_side: int) -> int:
    """Image tokens LLaVA-NeXT spends on one image: the base tile's patches, then the unpadded grid
    with one newline per row (the model side, vlm.LlavaNext, builds exactly this)."""
    rows, cols = anyres_grid(height, width, pinpoints, tile)
    keep_h, keep_w = unpadded_size(height, width, rows * patches_per_side, cols * patches_per_side)
    return patches_per_side**2 + keep_h * (keep_w + 1)


def idefics3_tiles(image, config: ImageConfig) -> tuple[list[np.ndarray], int, int]:
    """Idefics3 / SmolVLM: one RGB image -> (float32 tiles, rows, cols).

    The longest edge is scaled to size["longest_edge"] (the other side rounded to even), then up to
    whole tiles of `max_image_size`; the tiles are cut row by row and the whole image squashed to
    one tile comes last. Without splitting (or when the image fits one tile) the image is squashed
    to a single tile and rows = cols = 0. As transformers' Idefics3ImageProcessor.
    """
    pixels = to_array(image)
    tile = config.max_image_size
    if config.do_resize:
        pixels = resize(
            pixels, *_longest_edge_size(*pixels.shape[1:], config.size_dict["longest_edge"]), config.resample
        )
    if not config.do_image_splitting:
        return [rescale_normalize(resize(pixels, tile, tile, config.resample), config)], 0, 0
    height, width = pixels.shape[1:]
    if width >= height:
        new_w = math.ceil(width / tile) * tile
        new_h = math.ceil(int(new_w / (width / height)) / tile) * tile
    else:
        new_h = math.ceil(height / tile) * tile
        new_w = math.ceil(int(new_h * (width / height)) / tile) * tile
    pixels = resize(pixels, new_h, new_w, config.resample)
    if new_h <= tile and new_w <= tile:
        return [rescale_normalize(pixels, config)], 0, 0
    rows, cols = new_h // tile, new_w // tile
    tiles = [pixels[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]
    tiles.append(resize(pixels, tile, tile, config.resample))
    return [rescale_normalize(t, config) for t in tiles], rows, cols


MAX_SIDE = 4096  # transformers' Idefics3 cap on either side


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """Scale so the longest side is `longest`, the other side rounded down then up to even; then cap at MAX_SIDE."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_SIDE:
        width, height = MAX_SIDE, int(MAX_SIDE / aspect)
    elif height > width and height > MAX_SIDE:
        height, width = MAX_SIDE, int(MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


# ---------------------------------------------------------------------------------------------
# llama3v / MiniCPM-Llama3-V 2.5: LLaVA-UHD slicing


@dataclass(frozen=True)
class SliceConfig:
    """llama3v's slicing settings, from its config.json."""

    scale_resolution: int = 448  # config.json's `image_size`: each slice holds about this squared in pixels
    patch_size: int = 14
    max_slices: int = 9  # `max_slice_nums`
    query_num: int = 96  # tokens the resampler gives each slice (and the overview)
    slice_mode: bool = True  # False: every image is one overview, never sliced


def _multiple_of(length: float, unit: int) -> int:
    """The nearest multiple of `unit` (Python's round: halves go to even), at least `unit`."""
    return max(round(length / unit) * unit, unit)


def minicpm_resize(width: float, height: float, config: SliceConfig, upscale: bool) -> tuple[int, int]:
    """(width, height) scaled to about scale_resolution² pixels with the same aspect (only down,
    unless `upscale`), each side then rounded to a multiple of the patch. MiniCPM's find_best_resize."""
    scale = config.scale_resolution
    if width * height > scale * scale or upscale:
        aspect = width / height
        height = int(scale / math.sqrt(aspect))
        width = int(height * aspect)
    return _multiple_of(width, config.patch_size), _multiple_of(height, config.patch_size)


def slice_grid(width: int, height: int, config: SliceConfig) -> tuple[int, int] | None:
    """(cols, rows) of slices for an image of this size, or None when it is not sliced.

    The image needs about `area / scale_resolution²` slices (at most max_slices); among the grids
    of that many slices, one fewer and one more (never a single slice), the one whose aspect ratio
    is nearest the image's in log space wins, the first in (count, cols) order on a tie.
    MiniCPM-V's slice_image.
    """
    _positive(height, width)
    area_ratio = width * height / config.scale_resolution**2
    multiple = min(math.ceil(area_ratio), config.max_slices)
    if multiple <= 1 or not config.slice_mode:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if 1 < n <= config.max_slices]
    grids = [(cols, n // cols) for n in counts for cols in range(1, n + 1) if n % cols == 0]
    log_aspect = math.log(width / height)
    return min(grids, key=lambda grid: abs(log_aspect - math.log(grid[0] / grid[1])))


def slice_sizes(
    width: int, height: int, config: SliceConfig
) -> tuple[tuple[int, int], tuple[int, int] | None, tuple[int, int] | None]:
    """(overview (w, h), grid (cols, rows) or None, one slice's (w, h) or None) for an image of this size.

    An unsliced image is scaled (up or down) to about scale_resolution²; a sliced one's overview is
    only scaled down. The slices come from the whole image scaled to cols x rows slices, each slice
    about scale_resolution² and patch-aligned (MiniCPM's get_refine_size).
    """
    grid = slice_grid(width, height, config)
    if grid is None:
        return minicpm_resize(width, height, config, upscale=True), None, None
    cols, rows = grid
    overview = minicpm_resize(width, height, config, upscale=False)
    cell_w, cell_h = _multiple_of(width, cols) / cols, _multiple_of(height, rows) / rows
    return overview, grid, minicpm_resize(cell_w, cell_h, config, upscale=True)


def llama3v_slices(
    image, config: SliceConfig, image_config: ImageConfig
) -> tuple[list[np.ndarray], tuple[int, int] | None]:
    """One RGB image -> (float32 (3, h, w) arrays: the overview, then the slices row by row; grid or None)."""
    pixels = to_array(image)
    height, width = pixels.shape[1:]
    (over_w, over_h), grid, cell = slice_sizes(width, height, config)
    out = [resize(pixels, over_h, over_w, image_config.resample)]
    if grid is not None:
        (cols, rows), (cell_w, cell_h) = grid, cell
        refined = resize(pixels, rows * cell_h, cols * cell_w, image_config.resample)
        out += [
            refined[:, r * cell_h : (r + 1) * cell_h, c * cell_w : (c + 1) * cell_w]
            for r in range(rows)
            for c in range(cols)
        ]
    return [rescale_normalize(p, image_config) for p in out], grid


def llama3v_placeholder(grid: tuple[int, int] | None, query_num: int, unk: str = "<unk>") -> str:
    """The text one image becomes: the overview as <image> + query_num <unk> + </image>, then for a
    sliced image `<slice>`, each row of slices the same way, rows joined by newlines, `</slice>`.
    Every <unk> is one resampler output: the model writes the features over them in this order."""
    one = "<image>" + unk * query_num + "</image>"
    if grid is None:
        return one
    cols, rows = grid
    return one + "<slice>" + "\n".join(one * cols for _ in range(rows)) + "</slice>"
