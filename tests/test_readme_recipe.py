"""The README's connector-swap recipe, run as it is printed, on a tiny LLaVA-Interleave checkpoint
with the real 384-pixel images and 27x27 patch grid (only the checkpoint path is replaced)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from families import tiny_checkpoint
from PIL import Image

import minivlm
import minivlm.connector

README = Path(__file__).resolve().parent.parent / "README.md"
CHECKPOINT = '"weights/llava-interleave-qwen-0.5b-hf"'


def recipe() -> str:
    text = README.read_text()
    m = re.search(r"<!-- test: connector recipe -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md has no python block after '<!-- test: connector recipe -->'"
    return m.group(1)


def test_the_recipe_has_the_checkpoint_line_to_replace():
    assert recipe().count(CHECKPOINT) == 1


def test_connector_swap_recipe_runs(tmp_path, monkeypatch, capsys):
    folder = tiny_checkpoint("llava-interleave", tmp_path / "interleave")
    # The recipe adds a registry row; the other tests must not see it.
    monkeypatch.setattr(minivlm.connector, "CONNECTORS", dict(minivlm.connector.CONNECTORS))
    exec(compile(recipe().replace(CHECKPOINT, repr(str(folder))), str(README), "exec"), {"__name__": "recipe"})
    assert "torch.Size([729, 128]) -> torch.Size([81, 128])" in capsys.readouterr().out


def test_pool_is_refused_where_it_has_no_meaning(tmp_path):
    processor = minivlm.load_processor(tiny_checkpoint("idefics3", tmp_path / "idefics3"))
    processor.tokens = dataclasses.replace(processor.tokens, pool=3)
    with pytest.raises(minivlm.ProcessorError, match="pool 3"):
        processor(text="<image>", images=[Image.new("RGB", (64, 64))])
