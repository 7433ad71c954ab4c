"""LLaVA's training data -> batches: the JSON list its two stages train on, read and checked up
front, each example turned into inputs and labels (labels.py), examples padded into a batch.

The format (LLaVA's `LazySupervisedDataset`): a JSON list of
    {"id": ..., "image": "file.jpg" (or a list of files, or absent for text),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}, ...]}
with image paths relative to an images folder, and one "<image>" in the turns per image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..processing.batching import collate
from .labels import LabelError, check_conversation, conversation_inputs, llava_messages

__all__ = ["DataError", "Example", "check_examples", "collate", "encode", "read_llava_json", "split"]


class DataError(ValueError):
    """Training data that cannot be used: the file, the example and what was expected."""


@dataclass(frozen=True)
class Example:
    messages: list[dict]  # transformers' chat messages
    images: tuple[Path, ...]
    where: str  # "data.json, example 12 (id 'abc')": for errors


def read_llava_json(path, images_dir=None, image_token: str = "<image>") -> list[Example]:
    """Every example of a LLaVA-format JSON file, checked before any training: each is an object
    with 'conversations' (and an assistant turn), its images exist, and the "<image>" count matches."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the training data as JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of examples, got {type(data).__name__}")
    images_dir = Path(images_dir) if images_dir is not None else path.parent
    examples = []
    for i, item in enumerate(data):
        where = f"{path}, example {i}" + (
            f" (id {item.get('id')!r})" if isinstance(item, dict) and "id" in item else ""
        )
        if not isinstance(item, dict) or "conversations" not in item:
            raise DataError(f"{where}: expected an object with 'conversations' (and 'image' where it has one)")
        files = item.get("image") or []
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise DataError(f"{where}: 'image' must be a file name or a list of them, got {item.get('image')!r}")
        try:
            messages = llava_messages(item["conversations"], image_token, where)
        except LabelError as e:
            raise DataError(str(e)) from None
        tokens = sum(str(t.get("value", "")).count(image_token) for t in item["conversations"])
        if tokens != len(files):
            raise DataError(
                f"{where}: the turns hold {tokens} {image_token!r} and the example has {len(files)} images; "
                f"expected one {image_token!r} per image, where it stands in the conversation"
            )
        paths = tuple(images_dir / f for f in files)
        for p in paths:
            if not p.is_file():
                what = "is not a file" if p.exists() else "does not exist"
                raise DataError(f"{where}: image {p} {what} (image paths are relative to {images_dir})")
        examples.append(Example(messages, paths, where))
    return examples


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held out): a fixed-seed random `eval_fraction` of the examples is held out."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval fraction {eval_fraction}: expected a number in [0, 1)")
    n_eval = round(len(examples) * eval_fraction)
    if eval_fraction and not 0 < n_eval < len(examples):
        raise DataError(f"holding out {eval_fraction:.0%} of {len(examples)} examples leaves no training or no eval")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def encode(processor, example: Example, eos_token: str | None = None, max_length: int | None = None) -> dict:
    """One example -> its model inputs and labels (batch of 1); eos_token and max_length as
    labels.conversation_inputs."""
    try:
        return conversation_inputs(
            processor, example.messages, list(example.images) or None, eos_token=eos_token, max_length=max_length
        )
    except ValueError as e:  # LabelError, and the processor's errors (an unreadable image, a prompt too long)
        raise DataError(f"{example.where}: {e}") from None


def check_examples(
    processor, examples: list[Example], eos_token: str | None = None, max_length: int | None = None
) -> None:
    """Every example's text (template, turns, token boundaries, length) and the headers of its
    images, before any training: a bad example found at step 9,000 would cost the whole run. The
    images are decoded when their example is drawn: a file whose data is cut short, or an example
    whose image tokens take it past max_length, is found then."""
    for example in examples:
        try:
            length = check_conversation(processor, example.messages, eos_token=eos_token)
        except ValueError as e:
            raise DataError(f"{example.where}: {e}") from None
        if max_length is not None and length > max_length:
            raise DataError(
                f"{example.where}: {length:,} tokens before its images are counted; the model's context holds "
                f"{max_length:,} (drop the example, or shorten it)"
            )
        for path in example.images:
            try:
                with Image.open(path) as image:
                    image.verify()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's, for a bad file
                raise DataError(f"{example.where}: {path} is not an image Pillow can read ({e})") from None
