"""A family variant is new classes and registry rows, no edit of minivlm: here LLaVA-Interleave
with a fixed 2x2 grid plus an overview per image, as its own model_type, on a tiny checkpoint
with the real 384-pixel geometry. The variant's overview view must give the features the plain
family gives the whole image (same tower, same connector, same weights)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

import minivlm
import minivlm.load
import minivlm.processing.tiling
from minivlm.bench.tiny import tiny_checkpoint
from minivlm.family_config import llava_config
from minivlm.load import Family
from minivlm.parity import ParityMap
from minivlm.processing.family_processors import LlavaProcessor
from minivlm.processing.pixels import preprocess_single
from minivlm.processing.tiling import OneView
from minivlm.vlm import Llava
from minivlm.weights import LLAVA_KEYS


class GridPlusOverview(OneView):
    def views(self, image):
        w, h = image.size
        quarters = [
            image.crop((c * w // 2, r * h // 2, (c + 1) * w // 2, (r + 1) * h // 2)) for r in range(2) for c in range(2)
        ]
        return [preprocess_single(view, self.config) for view in [image, *quarters]]


class LlavaGrid(Llava):
    """The same module tree as LLaVA's; its own class so that the row's choice is visible."""


class LlavaGridProcessor(LlavaProcessor):
    family, tiling, videos = "llava_grid", "grid_2x2", False


def llava_grid_config(d: dict, source: str):
    return dataclasses.replace(llava_config({**d, "model_type": "llava"}, source), model_type="llava_grid")


@pytest.fixture
def registered(monkeypatch):
    """The variant's rows, in copies of the registries that the other tests never see."""
    monkeypatch.setattr(minivlm.load, "FAMILIES", dict(minivlm.load.FAMILIES))
    monkeypatch.setattr(minivlm.processing.tiling, "TILINGS", dict(minivlm.processing.tiling.TILINGS))
    minivlm.processing.tiling.TILINGS["grid_2x2"] = GridPlusOverview
    minivlm.load.FAMILIES["llava_grid"] = Family(
        llava_grid_config,
        LlavaGrid,
        LLAVA_KEYS,
        LlavaGridProcessor,
        ParityMap(None, missing="transformers has no llava_grid"),
    )


def test_a_family_variant_is_classes_and_rows(tmp_path, registered):
    plain = tiny_checkpoint("llava-interleave", tmp_path / "interleave")
    variant = tmp_path / "grid"
    variant.mkdir()
    for f in plain.iterdir():
        (variant / f.name).write_bytes(f.read_bytes())
    config = json.loads((variant / "config.json").read_text())
    (variant / "config.json").write_text(json.dumps({**config, "model_type": "llava_grid"}))

    model, processor = minivlm.load_model(variant), minivlm.load_processor(variant)
    assert type(model) is LlavaGrid and type(processor) is LlavaGridProcessor
    assert model.config.model_type == "llava_grid"
    base_model, base_processor = minivlm.load_model(plain), minivlm.load_processor(plain)

    image = Image.linear_gradient("L").resize((500, 300)).convert("RGB")
    prompt = "Look: <image> what is it?"
    ours, base = processor(text=prompt, images=[image]), base_processor(text=prompt, images=[image])
    image_id = model.config.image_token_id
    assert int((ours["input_ids"] == image_id).sum()) == 5 * int((base["input_ids"] == image_id).sum()) == 5 * 729
    assert torch.equal(ours["pixel_values"][:1], base["pixel_values"])  # the overview is the plain view
    with torch.no_grad():
        features = model.image_features(ours["pixel_values"])
        # (equal up to float rounding: the variant's tower runs five views in one batch, the plain one)
        torch.testing.assert_close(features[0], base_model.image_features(base["pixel_values"])[0])
        logits = model(**ours)
    assert logits.shape == (1, ours["input_ids"].shape[1], model.config.text.vocab_size)
    assert minivlm.generate(model, **ours, max_new_tokens=2).shape == (1, 2)


def test_an_unknown_tiling_is_named(tmp_path):
    processor = minivlm.load_processor(tiny_checkpoint("llava-interleave", tmp_path / "interleave"))
    processor.tiling = "no_such_tiling"
    with pytest.raises(minivlm.ProcessorError, match=r"unknown tiling 'no_such_tiling'; minivlm has \['anyres'"):
        processor(text="<image>", images=[Image.new("RGB", (64, 64))])
