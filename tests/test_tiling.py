"""The tiling arithmetic against transformers' own functions, over awkward image sizes."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from minivlm.processing.geometry import anyres_grid, select_best_resolution, unpadded_size

PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PINPOINTS_384 = [[384, 384], [384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
SIDES = [1, 2, 3, 7, 335, 336, 337, 500, 671, 672, 673, 767, 1000, 1008, 3000]
SIZES = sorted(set(itertools.product(SIDES, SIDES)))


@pytest.mark.parametrize("pinpoints", [PINPOINTS_336, PINPOINTS_384], ids=["336", "384"])
def test_best_resolution_and_grid_match_transformers(pinpoints):
    tile = pinpoints[0][0] if pinpoints[0][0] == pinpoints[0][1] else 336
    for h, w in SIZES:
        assert select_best_resolution(h, w, pinpoints) == tuple(hf_select_best_resolution((h, w), pinpoints)), (h, w)
        assert anyres_grid(h, w, pinpoints, tile) == tuple(get_anyres_image_grid_shape((h, w), pinpoints, tile)), (h, w)


@pytest.mark.parametrize("grid", [(24, 48), (48, 24), (48, 48), (72, 24), (24, 72), (27, 27)])
def test_unpadded_size_matches_transformers(grid):
    feature_grid = torch.empty(1, *grid)
    for h, w in SIZES:
        assert unpadded_size(h, w, *grid) == tuple(unpad_image(feature_grid, (h, w)).shape[1:]), (h, w, grid)
