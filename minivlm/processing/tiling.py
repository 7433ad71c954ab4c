"""Tilings: how a family cuts a batch of images into the model's pixel inputs, and the text each
image token becomes (as many image tokens as the model's image_features gives that image, with
the family's markers around them). One class each, chosen by name through TILINGS, as connectors
are through connector.CONNECTORS; the arithmetic of each cut is in geometry.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ConnectorConfig
from ..connector import connector_tokens
from .geometry import SliceConfig, anyres_tiles, anyres_token_count, idefics3_tiles, llama3v_placeholder, llama3v_slices
from .image import check_pixels
from .pixels import ImageConfig, preprocess_single


@dataclass(frozen=True)
class ImageTokens:
    """processor_config.json: how many tokens an image becomes."""

    image_token: str = "<image>"
    patch_size: int = 14
    num_additional_image_tokens: int = 0  # LLaVA: the CLS position the tower adds
    drop_cls: bool = True  # vision_feature_select_strategy "default"
    image_seq_len: int = 169  # Idefics3: tokens per tile
    unk_token: str = "<unk>"  # llama3v: the placeholder of one resampler output


class Tiling:
    """How images are cut, and what each cut costs in tokens. Subclasses define __call__.

    `connector`: the model's connector, when the processor was told it (Processor.connector); a
    tiling that `follows_connector` counts each view's tokens as that connector makes them. The
    others count as the family's hub checkpoints do, and refuse a connector they were told of.
    """

    follows_connector = False

    def __init__(
        self,
        config: ImageConfig,
        tokens: ImageTokens,
        slicing: SliceConfig | None = None,
        connector: ConnectorConfig | None = None,
    ):
        self.config, self.tokens, self.slicing, self.connector = config, tokens, slicing, connector

    def __call__(self, images: list, per_text: list[int]) -> tuple[dict, list[str]]:
        """RGB images (all prompts' images in order), the count of images in each prompt ->
        (the model's pixel inputs, the text each image token becomes)."""
        raise NotImplementedError


class OneView(Tiling):
    """LLaVA-1.5 / Interleave: every view is resized and cropped (or padded) to the tower's square.
    A subclass that cuts more views per image overrides `views`; each view costs the same tokens."""

    follows_connector = True

    def views(self, image) -> list[np.ndarray]:
        return [preprocess_single(image, self.config)]

    def view_tokens(self, view: np.ndarray) -> int:
        tokens = self.tokens
        patches = (view.shape[1] // tokens.patch_size) * (view.shape[2] // tokens.patch_size)
        if self.connector is not None:  # a connector that merges patches (a pixel shuffle, a pooling)
            patches = connector_tokens(self.connector, patches)
        return patches + tokens.num_additional_image_tokens - (1 if tokens.drop_cls else 0)

    def __call__(self, images: list, per_text: list[int]) -> tuple[dict, list[str]]:
        views = [self.views(image) for image in images]
        pixels = np.stack([v for image_views in views for v in image_views])  # (all views, C, H, W)
        counts = [sum(self.view_tokens(v) for v in image_views) for image_views in views]
        return {"pixel_values": pixels}, [self.tokens.image_token * n for n in counts]


class Anyres(Tiling):
    """LLaVA-NeXT: a base view plus the grid of tiles from the best pinpoint resolution."""

    def __call__(self, images: list, per_text: list[int]) -> tuple[dict, list[str]]:
        tokens = self.tokens
        tiled = [anyres_tiles(img, self.config) for img in images]
        most = max(len(t) for t, _ in tiled)
        pixels = np.zeros((len(tiled), most, *tiled[0][0].shape[1:]), dtype=np.float32)
        for i, (t, _) in enumerate(tiled):
            pixels[i, : len(t)] = t
        tile = tiled[0][0].shape[-1]
        counts = [
            anyres_token_count(h, w, self.config.image_grid_pinpoints, tile, tile // tokens.patch_size)
            + tokens.num_additional_image_tokens
            - (1 if tokens.drop_cls else 0)
            for _, (h, w) in tiled
        ]
        sizes = [list(size) for _, size in tiled]
        return {"pixel_values": pixels, "image_sizes": sizes}, [tokens.image_token * n for n in counts]


class Idefics3Tiles(Tiling):
    """Idefics3 / SmolVLM: each prompt's tiles (and global views) padded to one stack, with
    <row_r_col_c> before each tile's tokens and <global-img> before the global view's."""

    def __call__(self, images: list, per_text: list[int]) -> tuple[dict, list[str]]:
        tokens = self.tokens
        tiled = [idefics3_tiles(img, self.config) for img in images]
        groups, start = [], 0  # the tiles of each prompt, its images in order
        for n in per_text:
            groups.append([t for tiles, _, _ in tiled[start : start + n] for t in tiles])
            start += n
        most = max(len(g) for g in groups)
        height = max(t.shape[1] for g in groups for t in g)
        width = max(t.shape[2] for g in groups for t in g)
        padded = [padded_stack(group, most, height, width) for group in groups]  # each prompt's tiles, padded
        pixels, mask = np.stack([p for p, _ in padded]), np.stack([m for _, m in padded])
        image, fake, glob = tokens.image_token, "<fake_token_around_image>", "<global-img>"
        run = image * tokens.image_seq_len
        replacements = []
        for _, rows, cols in tiled:
            if rows == 0 and cols == 0:
                replacements.append(f"{fake}{glob}{run}{fake}")
                continue
            grid = "".join(
                "".join(f"{fake}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n" for r in range(rows)
            )
            replacements.append(f"{grid}\n{fake}{glob}{run}{fake}")
        return {"pixel_values": pixels, "pixel_attention_mask": mask}, replacements


class Llama3VSlices(Tiling):
    """llama3v: every image's overview and slices as one list of slices of different sizes,
    zero-padded at the bottom and right to the largest, with a mask of their real pixels."""

    def __call__(self, images: list, per_text: list[int]) -> tuple[dict, list[str]]:
        sliced = [llama3v_slices(img, self.slicing, self.config) for img in images]
        flat = [s for slices, _ in sliced for s in slices]
        height, width = max(s.shape[1] for s in flat), max(s.shape[2] for s in flat)
        pixels, mask = padded_stack(flat, len(flat), height, width)
        replacements = [llama3v_placeholder(grid, self.slicing.query_num, self.tokens.unk_token) for _, grid in sliced]
        return {"pixel_values": pixels, "pixel_attention_mask": mask}, replacements


def padded_stack(images: list[np.ndarray], count: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` slots of float32 (3, height, width) zeros with the images written into the first
    ones at the top left, and an int64 (count, height, width) mask of their real pixels."""
    check_pixels(height, width, f"padding {count} tiles to {width}x{height}", count)
    pixels = np.zeros((count, 3, height, width), dtype=np.float32)
    mask = np.zeros((count, height, width), dtype=np.int64)
    for i, image in enumerate(images):
        pixels[i, :, : image.shape[1], : image.shape[2]] = image
        mask[i, : image.shape[1], : image.shape[2]] = 1
    return pixels, mask


TILINGS: dict[str, type[Tiling]] = {
    "one_view": OneView,
    "anyres": Anyres,
    "idefics3": Idefics3Tiles,
    "llama3v_slices": Llama3VSlices,
}


def build_tiling(
    name: str,
    config: ImageConfig,
    tokens: ImageTokens,
    slicing: SliceConfig | None = None,
    connector: ConnectorConfig | None = None,
) -> Tiling:
    if name not in TILINGS:
        raise KeyError(f"unknown tiling {name!r}; minivlm has {sorted(TILINGS)}")
    return TILINGS[name](config, tokens, slicing, connector)
