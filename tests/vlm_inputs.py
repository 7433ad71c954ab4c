"""Model inputs for the tiny VLMs, shaped as transformers' processors shape them.

Image-token counts come from transformers' own models (its get_image_features), so a prompt
always holds exactly as many image tokens as transformers expects.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN = 200


def llava_pixels(hf, n: int, g: torch.Generator) -> dict:
    size = hf.config.vision_config.image_size
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g)}


def next_pixels(hf, sizes: list[tuple[int, int]], g: torch.Generator) -> dict:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    tile = hf.config.vision_config.image_size
    tiles = [image_size_to_num_patches((h, w), hf.config.image_grid_pinpoints, tile) for h, w in sizes]
    pixel_values = torch.zeros(len(sizes), max(tiles), 3, tile, tile)
    for i, k in enumerate(tiles):
        pixel_values[i, :k] = torch.randn(k, 3, tile, tile, generator=g)
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes)}


def idefics3_pixels(hf, rows: list[list[tuple[int, int]]], g: torch.Generator) -> dict:
    """rows: per batch row, the (height, width) of real pixels of each tile; tiles are padded to
    the tower's image size with zeros (and a 0 mask), rows to the longest with all-zero images."""
    size = hf.config.vision_config.image_size
    k = max(len(r) for r in rows)
    pixel_values = torch.zeros(len(rows), k, 3, size, size)
    mask = torch.zeros(len(rows), k, size, size, dtype=torch.long)
    for b, tiles in enumerate(rows):
        for i, (h, w) in enumerate(tiles):
            pixel_values[b, i, :, :h, :w] = torch.randn(3, h, w, generator=g)
            mask[b, i, :h, :w] = 1
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask}


def hf_feature_counts(hf, image_inputs: dict) -> list[int]:
    """How many image tokens transformers expects, per image (per batch row for Idefics3)."""
    with torch.no_grad():
        out = hf.model.get_image_features(**image_inputs)
    return [len(f) for f in out.pooler_output]


def prompt_with_images(counts: list[int], text_lengths: list[int], g: torch.Generator) -> torch.Tensor:
    """Text tokens with a run of image tokens before each text piece: len(text_lengths) == len(counts) + 1."""
    pieces = [torch.randint(0, IMAGE_TOKEN, (text_lengths[0],), generator=g)]
    for count, length in zip(counts, text_lengths[1:]):
        pieces += [torch.full((count,), IMAGE_TOKEN), torch.randint(0, IMAGE_TOKEN, (length,), generator=g)]
    return torch.cat(pieces)
