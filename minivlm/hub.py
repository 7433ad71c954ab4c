"""A local checkpoint folder, or a hub id resolved to a folder under weights/."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .checkpoint import CheckpointError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# What a checkpoint folder needs; anything else in a hub repo (.bin, .pth, onnx, gguf) is skipped.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


def weights_dir() -> Path:
    """Where hub checkpoints are kept: $MINIVLM_WEIGHTS, else ./weights."""
    return Path(os.environ.get("MINIVLM_WEIGHTS", "weights"))


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A folder with config.json: the path itself, weights/<name> for a hub id, or a fresh download."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if not HUB_ID.fullmatch(text) or path.exists():
        raise CheckpointError(
            f"{text}: no such checkpoint folder (expected a folder with config.json, or a hub id org/name)"
        )
    local = weights_dir() / text.split("/")[1]
    if (local / "config.json").is_file():
        return local
    return download(text, local)


def download(hub_id: str, local: Path) -> Path:
    """Fetch a hub checkpoint's config, tokenizer and safetensors into `local` (resumable)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError(f"{hub_id}: not found locally and huggingface_hub is not installed") from None
    try:
        snapshot_download(hub_id, local_dir=local, allow_patterns=CHECKPOINT_FILES)
    except GatedRepoError:
        raise CheckpointError(
            f"{hub_id}: the model is gated; accept its terms on the hub and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{hub_id}: no such local folder, and no such model on the hub (or it is private)"
        ) from None
    except Exception as e:  # offline, DNS, proxy, HTTP errors: one line, not a traceback
        raise CheckpointError(
            f"{hub_id}: no such local folder, not in {local}, and the hub could not be reached "
            f"({type(e).__name__}: {' '.join(str(e).split())})"  # one line: hub errors span several
        ) from None
    return local
