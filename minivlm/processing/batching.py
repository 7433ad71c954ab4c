"""Processor outputs of single examples (each a batch of 1) -> one batch: token rows padded,
pixel inputs concatenated. Training pads on the right (its labels beside), generation on the left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a token the loss skips (transformers' and torch's ignore_index)


def collate(items: list[dict], pad_id: int, rows_first: bool, side: str = "right") -> dict:
    """Encoded examples -> one batch: token rows padded on `side` (attention 0, label IGNORE where
    there are labels), pixel inputs concatenated, each padded with zeros to the largest in every
    dimension but the first (NeXT's tile counts, Idefics3's image counts and canvases, llama3v's
    slices: zeros are what their processors pad with). rows_first: the pixel inputs are (rows,
    images, ...) (processor.rows_first), so a row without images gets all-zero ones, which the
    model skips."""
    if side not in ("left", "right"):
        raise ValueError(f"side {side!r}: expected 'left' or 'right'")
    width = max(item["input_ids"].shape[1] for item in items)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:  # (1, n) -> (1, width)
        fill = width - t.shape[1]
        return F.pad(t, (fill, 0) if side == "left" else (0, fill), value=value)

    rows = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
    batch = {key: torch.cat([pad(it[key], value) for it in items]) for key, value in rows.items() if key in items[0]}
    keys = sorted({k for it in items for k in it} - set(rows))
    for key in keys:
        parts = [it[key] for it in items if key in it]
        shape = [max(p.shape[d] for p in parts) for d in range(parts[0].dim())]
        padded = []
        for it in items:
            if key in it:
                t = it[key]
                pads = [x for d in reversed(range(1, t.dim())) for x in (0, shape[d] - t.shape[d])]
                padded.append(F.pad(t, pads))
            elif rows_first:  # a text-only row among rows with images: all-zero images are padding
                padded.append(parts[0].new_zeros(1, *shape[1:]))
        batch[key] = torch.cat(padded)
    return batch
