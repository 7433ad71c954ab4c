"""A synthetic captioning task in LLaVA's data format, small enough to learn on a CPU in a minute:
each image is a flat patch of one of four colours (its shade, size and aspect jittered), and the
answer to "What color is it?" is the colour's name. Used by the training tests and notebook 5."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
QUESTION = "What color is it?"


def color_captions(folder, n: int = 200, seed: int = 0) -> Path:
    """Write `n` examples into `folder`: images/ and data.json (LLaVA's format, image paths relative to
    the folder); returns data.json."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    data = []
    for i in range(n):
        name = rng.choice(sorted(COLORS))
        shade = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLORS[name])
        Image.new("RGB", (rng.randint(40, 90), rng.randint(40, 90)), shade).save(folder / "images" / f"{i}.png")
        turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": name}]
        data.append({"id": str(i), "image": f"images/{i}.png", "conversations": turns})
    (folder / "data.json").write_text(json.dumps(data, indent=1))
    return folder / "data.json"
