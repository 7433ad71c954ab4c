"""The README's connector-swap and tiling recipes, run as they are printed, on a tiny LLaVA-Interleave
checkpoint with the real 384-pixel images and 27x27 patch grid (only the checkpoint path is replaced)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

import minivlm
import minivlm.connector
import minivlm.processing.tiling
from minivlm.bench.tiny import tiny_checkpoint
from minivlm.config import ConnectorConfig

README = Path(__file__).resolve().parent.parent / "README.md"
CHECKPOINT = '"weights/llava-interleave-qwen-0.5b-hf"'


def recipe(marker: str = "connector recipe") -> str:
    text = README.read_text()
    m = re.search(rf"<!-- test: {marker} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no python block after '<!-- test: {marker} -->'"
    return m.group(1)


@pytest.mark.parametrize("marker", ["connector recipe", "tiling recipe"])
def test_the_recipe_has_the_checkpoint_line_to_replace(marker):
    assert recipe(marker).count(CHECKPOINT) == 1


def test_connector_swap_recipe_runs(tmp_path, monkeypatch, capsys):
    folder = tiny_checkpoint("llava-interleave", tmp_path / "interleave")
    # The recipe adds a registry row; the other tests must not see it.
    monkeypatch.setattr(minivlm.connector, "CONNECTORS", dict(minivlm.connector.CONNECTORS))
    exec(compile(recipe().replace(CHECKPOINT, repr(str(folder))), str(README), "exec"), {"__name__": "recipe"})
    assert "torch.Size([729, 128]) -> torch.Size([81, 128])" in capsys.readouterr().out


def test_tiling_recipe_runs(tmp_path, monkeypatch, capsys):
    folder = tiny_checkpoint("llava-interleave", tmp_path / "interleave")
    # The recipe adds a registry row; the other tests must not see it.
    monkeypatch.setattr(minivlm.processing.tiling, "TILINGS", dict(minivlm.processing.tiling.TILINGS))
    code = recipe("tiling recipe").replace(CHECKPOINT, repr(str(folder)))
    exec(compile(code, str(README), "exec"), {"__name__": "recipe"})
    out = capsys.readouterr().out
    assert "image tokens per image: 729 -> 3645" in out
    assert "pixel_values: (1, 3, 384, 384) -> (5, 3, 384, 384)" in out


def test_a_connector_is_refused_where_the_tiling_does_not_follow_it(tmp_path):
    folder = tiny_checkpoint("idefics3", tmp_path / "idefics3")
    processor = minivlm.load_processor(folder)
    processor.connector = minivlm.load_model(folder).config.connector
    with pytest.raises(minivlm.ProcessorError, match="'pixel_shuffle'.*does not follow a connector"):
        processor(text="<image>", images=[Image.new("RGB", (64, 64))])


@pytest.mark.parametrize(
    "connector, message",
    [
        ("shuffle_mlp", "processor.connector is a str; expected the model's ConnectorConfig"),
        (ConnectorConfig("qformer", 8, 8), r"unknown connector 'qformer'; minivlm has \['linear'"),
        (ConnectorConfig("pixel_shuffle", 8, 8, scale_factor=2), "729 patches are not a square grid whose side it"),
    ],
)
def test_a_connector_the_processor_cannot_count_with_is_named(tmp_path, connector, message):
    processor = minivlm.load_processor(tiny_checkpoint("llava-interleave", tmp_path / "interleave"))
    processor.connector = connector
    with pytest.raises(minivlm.ProcessorError, match=message):
        processor(text="<image>", images=[Image.new("RGB", (64, 64))])
