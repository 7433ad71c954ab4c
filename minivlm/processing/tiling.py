"""How an image is cut into tiles, and how many tokens each family spends on it.

Pure arithmetic on sizes, shared by the processors (which cut the pixels) and the models (which
stitch the tiles' features back together): both must agree to the token, so both call this.
"""

from __future__ import annotations


def select_best_resolution(height: int, width: int, candidates) -> tuple[int, int]:
    """LLaVA-NeXT anyres: the (height, width) among `candidates` that keeps the most of the image
    once it is scaled to fit, and among equals wastes the least padding.

    As transformers' `select_best_resolution` (image_processing_utils.py), including its int()
    truncation of the scaled size, which decides ties.
    """
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
    if width / height > grid_w / grid_h:  # wider than the canvas: padded above and below
        new_h = int(round(height * (grid_w / width), 7))
        pad = (grid_h - new_h) // 2
        return grid_h - 2 * pad, grid_w
    new_w = int(round(width * (grid_h / height), 7))
    pad = (grid_w - new_w) // 2
    return grid_h, grid_w - 2 * pad
