"""Bad VLM inputs and configs: one clear error naming what is wrong and what was expected."""

from __future__ import annotations

import json

import pytest
import torch
from vlm_inputs import IMAGE_TOKEN, hf_feature_counts, idefics3_pixels, llava_pixels, next_pixels, prompt_with_images

import minivlm
from minivlm import ConfigError
from minivlm.bench.tiny.models import build_vlm_model, save_checkpoint
from minivlm.config import ConnectorConfig
from minivlm.connector import build_connector


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    hf = build_vlm_model("llava")
    return hf, minivlm.load_model(save_checkpoint(hf, tmp_path_factory.mktemp("llava")))


def llava_prompt(hf, images: int, tokens_per_image: int | None = None):
    g = torch.Generator().manual_seed(0)
    inputs = llava_pixels(hf, images, g)
    counts = hf_feature_counts(hf, inputs)
    if tokens_per_image is not None:
        counts = [tokens_per_image] * images
    return prompt_with_images(counts, [2] * (images + 1), g)[None], inputs


@pytest.mark.parametrize("tokens,images", [(3, 2), (5, 2), (4, 3)])
def test_image_token_count_must_match_the_features(llava, tokens, images):
    hf, model = llava
    ids, inputs = llava_prompt(hf, images, tokens_per_image=tokens)
    if tokens == 4:  # the right count per image, but one image more than the prompt holds
        ids = ids[:, : ids.tolist()[0].index(IMAGE_TOKEN) + 2 * (tokens + 2)]
    have = int((ids == IMAGE_TOKEN).sum())
    with pytest.raises(
        ValueError,
        match=rf"the prompt has {have} image tokens \(id 200\) but the {images} images give {4 * images} features",
    ):
        model(ids, **inputs)


def test_image_tokens_without_pixels(llava):
    hf, model = llava
    ids, _ = llava_prompt(hf, 1)
    with pytest.raises(ValueError, match=r"the prompt has 4 image tokens \(id 200\) but no pixel_values were given"):
        model(ids)


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 1, 28, 28), (3, 28, 28), (1, 2, 3, 28, 28)])
def test_pixel_values_of_the_wrong_size(llava, shape):
    hf, model = llava
    ids, _ = llava_prompt(hf, 1)
    with pytest.raises(ValueError, match=r"pixel_values has shape .*; expected \(images, 3, 28, 28\)"):
        model(ids, pixel_values=torch.randn(shape))


def test_next_needs_image_sizes_that_fit_its_tiles(tmp_path):
    hf = build_vlm_model("llava_next")
    model = minivlm.load_model(save_checkpoint(hf, tmp_path))
    inputs = next_pixels(hf, [(28, 80)], torch.Generator().manual_seed(0))  # a 1x3 grid: 4 tiles
    ids = prompt_with_images(hf_feature_counts(hf, inputs), [2, 2], torch.Generator())[None]
    with pytest.raises(ValueError, match=r"LLaVA-NeXT needs image_sizes"):
        model(ids, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"pixel_values has 4 tiles per image; image_sizes need \[5\]"):
        model(ids, pixel_values=inputs["pixel_values"], image_sizes=torch.tensor([[300, 300]]))


def test_idefics3_pixel_layout(tmp_path):
    hf = build_vlm_model("idefics3")
    model = minivlm.load_model(save_checkpoint(hf, tmp_path))
    inputs = idefics3_pixels(hf, [[(28, 28)]], torch.Generator().manual_seed(0))
    ids = prompt_with_images(hf_feature_counts(hf, inputs), [2, 2], torch.Generator())[None]
    with pytest.raises(ValueError, match=r"expected \(batch, images, C, H, W\)"):
        model(ids, pixel_values=inputs["pixel_values"][0])
    with pytest.raises(ValueError, match=r"pixel_values are 30x28; Idefics3 needs sides that are multiples of 7"):
        model(ids, pixel_values=torch.randn(1, 1, 3, 30, 28))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"vision_config": {"model_type": "dinov2"}}, r"unknown vision_config model_type 'dinov2'"),
        ({"projector_hidden_act": "swish"}, r"projector_hidden_act 'swish' is not supported"),
        ({"vision_feature_layer": -5}, r"vision_feature_layer -5 is out of range for 3 vision layers"),
        ({"vision_feature_select_strategy": "cls"}, r"vision_feature_select_strategy 'cls'"),
        ({"text_config": {"model_type": "gemma"}}, r"text_config: unknown text model_type 'gemma'"),
    ],
)
def test_config_errors(tmp_path, change, message):
    folder = save_checkpoint(build_vlm_model("llava"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        minivlm.load_model(folder)


def test_unknown_connector_names_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown connector 'qformer'; minivlm has \['linear', 'mlp2x_gelu', 'pixel_shuffle', 'resampler'\]",
    ):
        build_connector(ConnectorConfig("qformer", 8, 8))


@pytest.mark.parametrize("layers", [(), (5,), (-5,), (1.5,), (True,), "1", [0, 9]])
def test_vision_tower_layers_out_of_range_or_of_the_wrong_type(llava, layers):
    """The tiny CLIP tower has 3 layers: indices run from -4 to 3; anything else is named, not wrapped."""
    _, model = llava
    pixels = torch.zeros(1, 3, 28, 28)
    with pytest.raises(ValueError, match=r"layers .*(a non-empty tuple|from -4 to 3)"):
        model.vision_tower(pixels, layers=layers)


def test_vision_tower_layers_as_transformers_hidden_states(llava):
    hf, model = llava
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        for layers in (0, (-4,), (3,), (1, -1)):
            want = torch.cat([theirs[i] for i in ((layers,) if isinstance(layers, int) else layers)], dim=-1)
            torch.testing.assert_close(model.vision_tower(pixels, layers=layers), want, rtol=1e-5, atol=1e-5)
