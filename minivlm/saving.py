"""Writing a checkpoint folder: config.json, safetensors (sharded with an index past a size), and
the source folder's other files (tokenizer, processor, chat template, generation config) copied.

The folder is written beside `output` under a hidden temporary name and renamed into place at the
end, so a failure leaves nothing half-written; an existing non-empty `output` is refused before any
work. Used by quant_save (a quantized model) and training.save (a trained one, in the hub layout).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SHARD_BYTES = 4 * 2**30  # the hub's checkpoints shard at a few GB; one file below that
WEIGHT_FILES = ("model.safetensors.index.json",)  # with every *.safetensors: never copied from the source


def check_output(source, output, error: type[Exception]) -> None:
    """Before any work: the source is a checkpoint folder, and the output a new or empty folder."""
    source = Path(source)
    if not (source / "config.json").is_file():
        raise error(f"{source}: no config.json; expected the checkpoint folder the model was loaded from")
    check_new_folder(output, error)


def check_new_folder(output, error: type[Exception]) -> None:
    """`output` is a new or empty folder that can be made where it is named."""
    output = Path(output)
    if output.is_symlink() or (output.exists() and (not output.is_dir() or any(output.iterdir()))):
        raise error(f"{output} exists and is not an empty folder; choose a new one")
    parent = Path(os.path.abspath(output)).parent
    while not parent.exists():  # the nearest folder that exists is where the new ones get made
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{parent} is not a folder")
    try:  # a trial folder: the one sure test (permissions, a read-only or virtual file system, root)
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".minivlm-write-test-"))
    except OSError as e:
        raise error(f"{output} cannot be written: {parent} does not take a new folder ({e.strerror})") from None


def write_checkpoint(
    source, output, config: dict, tensors: dict[str, torch.Tensor], error: type[Exception], extra: dict | None = None
) -> Path:
    """Write `config` as config.json and `tensors` (name -> tensor, written as they are) into a new
    folder `output`, with the source folder's other files copied and `extra` (file name -> text)
    written beside them. Returns `output`."""
    from safetensors.torch import save_file  # looked up here, so that a test can replace it

    source, output = Path(source), Path(output)
    check_output(source, output, error)

    def fill(partial: Path) -> None:
        for f in source.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in (*WEIGHT_FILES, "config.json"):
                shutil.copy2(f, partial / f.name)
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        shards = _shards(tensors)
        if len(shards) == 1:
            save_file(shards[0], str(partial / "model.safetensors"), metadata={"format": "pt"})
        else:
            where = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(partial / name), metadata={"format": "pt"})
                where.update(dict.fromkeys(shard, name))
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": size}, "weight_map": where}
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    return write_folder(output, fill, extra)


def write_folder(output: Path, fill, extra: dict | None = None) -> Path:
    """Make the new folder `output`: `fill(folder)` writes into a hidden temporary folder beside it,
    `extra` (file name -> text) is added, and the folder is renamed into place; on any failure the
    temporary folder is removed and nothing is left."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))  # never a folder of yours
    try:
        fill(partial)
        for name, text in (extra or {}).items():
            (partial / name).write_text(text, encoding="utf-8")
        # mkdtemp made the folder owner-only (0700): give it, and every file in it, the modes a plain
        # mkdir and open would have (others on the machine can read a model folder as any other)
        mask = os.umask(0)
        os.umask(mask)
        for path in partial.rglob("*"):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        partial.chmod(0o777 & ~mask)
        if output.is_dir() and not output.is_symlink():
            output.rmdir()  # empty: check_output said so
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output


def _shards(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, cut into groups of at most SHARD_BYTES (a larger tensor alone)."""
    shards, size = [{}], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def with_dtype(raw: dict, dtype: torch.dtype) -> dict:
    """config.json's dict recording `dtype` as the checkpoint's (both spellings transformers reads)."""
    name = str(dtype).removeprefix("torch.")
    raw = {**raw, "torch_dtype": name}
    if "dtype" in raw:
        raw["dtype"] = name
    for part in ("text_config", "vision_config"):  # a VLM's parts record it too
        if isinstance(raw.get(part), dict):
            raw[part] = {**raw[part], **{k: name for k in ("torch_dtype", "dtype") if k in raw[part]}}
    return raw
