"""The notebooks run top to bottom, as a reader would run them, on the tiny checkpoints: no cell
raises, nothing is written to stderr (a warning there is a defect a reader would see), and the
figures render."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
# notebook -> the figures it draws
FIGURES = {
    "1_tour.ipynb": 1,
    "2_tiling.ipynb": 16,
    "3_attention.ipynb": 2,
    "4_decode_loop.ipynb": 2,
    "5_connector_swap.ipynb": 1,
}


def test_every_notebook_is_listed():
    assert sorted(p.name for p in FOLDER.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_clean(name, monkeypatch):
    monkeypatch.setenv("MINIVLM_NOTEBOOKS_TINY", "1")  # never a real checkpoint that weights/ may hold
    notebook = nbformat.read(FOLDER / name, as_version=4)
    for cell in notebook.cells:
        cell.pop("outputs", None) if cell.cell_type != "code" else cell.update(outputs=[], execution_count=None)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(FOLDER)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, stderr
    figures = sum(1 for o in outputs if {"image/png", "image/jpeg"} & set(o.get("data", {})))
    assert figures == FIGURES[name]
    assert os.environ.get("MINIVLM_NOTEBOOKS_TINY") == "1"
