"""Reading a checkpoint folder's weights: which files the folder may make minivlm read, and the
safetensors headers and tensors in them.

The safetensors format is read here rather than through `safetensors.safe_open`: its mmap keeps
every touched page of the file resident beside the copy handed to torch, and checking the header
ourselves lets a truncated or corrupt file fail with a message that names it.
Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data; offsets are relative to it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .processing.files import open_regular

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------
# Reading safetensors files


@dataclass(frozen=True)
class TensorEntry:
    key: str  # the name in the file
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int
    # Tensor parallelism: read only [start, stop) along dim (0 or 1), rows past the end zeros
    # (a padded vocabulary); `shape` is then the slice's. None: the whole tensor.
    part: tuple[int, int, int] | None = None
    stored: tuple[int, ...] | None = None  # the whole tensor's shape, where `part` is set

    def sliced(self, dim: int, start: int, stop: int) -> "TensorEntry":
        """This entry read as [start, stop) along dim."""
        shape = list(self.shape)
        shape[dim] = stop - start
        return dataclasses.replace(self, shape=tuple(shape), part=(dim, start, stop), stored=self.shape)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds, checked against the file's size and each other.

    Refused with a CheckpointError naming the file: not a regular file (a FIFO, folder, device),
    a header length beyond the file, a header that is not a JSON object, an entry whose dtype,
    shape or offsets are malformed, whose byte length disagrees with its dtype and shape, which
    ends past the file, or whose bytes overlap another tensor's.
    """
    with open_regular(path, CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, file has {size})"
                )
            raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None

    data_start = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape, offsets = info["shape"], info["data_offsets"]
            if not (_naturals(shape) and _naturals(offsets) and len(offsets) == 2):
                raise ValueError
            shape, (begin, end) = tuple(shape), offsets
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: corrupt header entry for tensor {name!r}: {info!r:.200} (expected a dtype of "
                f"{sorted(SAFETENSORS_DTYPES)}, a shape of non-negative integers and two data_offsets)"
            ) from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {list(shape)} {info['dtype']} needs {nbytes} bytes, "
                f"header gives offsets {begin}..{end}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size} bytes"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
    # Two tensors sharing bytes would load one's data as the other's, silently. (Gaps are harmless.)
    previous = None
    for entry in sorted((e for e in entries.values() if e.end > e.begin), key=lambda e: e.begin):
        if previous is not None and entry.begin < previous.end:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: the bytes of tensor {entry.key!r} "
                f"({entry.begin - data_start}..{entry.end - data_start}) overlap those of {previous.key!r} "
                f"({previous.begin - data_start}..{previous.end - data_start}); expected each tensor in its own bytes"
            )
        previous = max(previous, entry, key=lambda e: e.end) if previous is not None else entry
    return entries


def _naturals(value) -> bool:
    """Whether `value` is a JSON list of non-negative integers."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One tensor, read straight from disk into a fresh CPU buffer (no mmap, no second copy)."""
    if entry.part is not None:
        return read_part(entry)
    out = torch.empty(entry.shape, dtype=entry.dtype)
    with open_regular(entry.file, CheckpointError) as f:
        _read_into(f, entry, 0, out)
    return out


def _read_into(f, entry: TensorEntry, offset: int, target: torch.Tensor) -> None:
    """Fill `target` (contiguous) in place with the bytes at `offset` into the entry's data."""
    # A uint8 view of the buffer; `readinto` fills it in place.
    buf = memoryview(target.view(-1).view(torch.uint8).numpy()) if target.numel() else memoryview(b"")
    f.seek(entry.begin + offset)
    if f.readinto(buf) != len(buf):
        raise CheckpointError(f"{entry.file}: truncated while reading its tensors")


def read_part(entry: TensorEntry) -> torch.Tensor:
    """The slice `entry.part` of a tensor, reading its bytes only: along dim 0 one run of whole
    rows, along dim 1 (a matrix) one run per row. Rows past the stored ones are zeros."""
    dim, start, stop = entry.part
    stored = entry.stored
    item = torch.empty((), dtype=entry.dtype).element_size()
    out = torch.zeros(entry.shape, dtype=entry.dtype)
    row_bytes = item * math.prod(stored[1:])  # one index of dim 0
    with open_regular(entry.file, CheckpointError) as f:
        if dim == 0:
            have = max(0, min(stop, stored[0]) - start)
            if have:
                _read_into(f, entry, start * row_bytes, out[:have])
        elif dim == 1 and len(stored) == 2:
            for r in range(stored[0]):
                _read_into(f, entry, r * row_bytes + start * item, out[r])
        else:
            raise CheckpointError(f"{entry.file}: {entry.key!r}: cannot read a slice along dim {dim} of {list(stored)}")
    return out


def read_as(entry: TensorEntry, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Read one tensor, cast it if floating-point, move it; the CPU staging copy dies on return."""
    tensor = read_tensor(entry)
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.to(device)


def find_tensors(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint folder: `model.safetensors`, or the shards its index names."""
    # exists(), not is_file(): a FIFO or folder by these names is refused by name, not passed over.
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = _shards_from_index(folder, checkpoint_file(folder, index.name))
    elif (folder / "model.safetensors").exists():
        files = [checkpoint_file(folder, "model.safetensors")]
    else:
        files = [checkpoint_file(folder, file.name) for file in sorted(folder.glob("*.safetensors"))]
        if not files:
            raise CheckpointError(_no_weights_message(folder))
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"{folder}: tensor {name!r} is in both {tensors[name].file.name} and {file.name}")
            tensors[name] = entry
    return tensors


def _shards_from_index(folder: Path, index: Path) -> list[Path]:
    with open_regular(index, CheckpointError) as f:
        raw = f.read()
    try:
        weight_map = json.loads(raw.decode("utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{index}: not a valid index (expected a JSON object with a 'weight_map')") from None
    shards: dict[Path, Path] = {}  # the file a shard resolves to -> its path in the folder
    for name in sorted(set(map(str, weight_map.values()))):
        path = checkpoint_file(folder, name, named_by=index)
        if not path.exists():
            raise CheckpointError(f"{index}: names shard {name!r}, which is missing from {folder}")
        shards.setdefault(path.resolve(), path)  # two spellings of one file ('a', './a') read it once
    return list(shards.values())


def _no_weights_message(folder: Path) -> str:
    """What to say of a folder without a safetensors file: convert, or finish the download."""
    found = "no model.safetensors, no model.safetensors.index.json and no *.safetensors file"
    others = sorted(f.name for pattern in ("*.bin", "*.pt", "*.pth") for f in folder.glob(pattern))
    if others:
        return (
            f"{folder}: no weights found ({found}, only {others}); "
            "minivlm reads safetensors only: convert .bin/.pt checkpoints first"
        )
    repo = hub_cache_repo(folder)
    is_model = repo is not None and repo.name.startswith("models--")
    hub_id = repo.name.removeprefix("models--").replace("--", "/") if is_model else "<hub id>"
    return (
        f"{folder}: no weights found ({found}); was the download interrupted? "
        f"Run `python -m minivlm download {hub_id}` and load the folder it prints"
    )


# ---------------------------------------------------------------------------------------------
# Which files a checkpoint folder may make us read
#
# The rule, stated once. An index is data from the internet and a folder may be full of symlinks;
# neither may make minivlm read (and echo in errors, or load as tensors) a file elsewhere on disk.
# So every weights file, named by the index or found in the folder:
#   1. lies inside the folder by its name as written: not absolute, no `..` (checked before any
#      symlink is followed, so a name cannot climb out through a symlinked folder either);
#   2. after its symlinks are resolved, lies inside the folder itself, or, when the folder is a
#      snapshot in huggingface_hub's cache, inside that same cache repo's blobs/: the cache stores
#      CACHE/models--ORG--NAME/{blobs/SHA, snapshots/COMMIT/FILE -> ../../blobs/SHA, refs/main},
#      so there every file is a symlink out of the snapshot folder, into blobs/.
# Anything else (a symlink to /etc/passwd, or to another cache repo's blobs) is refused.

HUB_CACHE_REPO = re.compile(r"(models|datasets|spaces)--.+")


def hub_cache_repo(folder: Path) -> Path | None:
    """The cache repo folder (CACHE/models--ORG--NAME) when `folder` is one of its snapshots
    (CACHE/models--ORG--NAME/snapshots/COMMIT), else None."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and HUB_CACHE_REPO.fullmatch(folder.parent.parent.name):
        return folder.parent.parent
    return None


def may_read(folder: Path, target: Path) -> bool:
    """Whether `target`, a path with every symlink resolved, is a file the checkpoint in `folder`
    may be read from: inside the folder itself, or inside the blobs/ of the hub cache repo that
    `folder` is a snapshot of."""
    roots = [folder.resolve()]
    repo = hub_cache_repo(folder)
    if repo is not None:
        roots.append((repo / "blobs").resolve())
    return any(target.is_relative_to(root) for root in roots)


def checkpoint_file(folder: Path, name: str, named_by: Path | None = None) -> Path:
    """`folder / name`, a file of the checkpoint, once the rule above allows it.

    `named_by` is the index that named the file, for the error message. The path returned is the
    unresolved one, so that later errors name the file as the user knows it, not a blob's hash.
    """
    source = f"{named_by}: shard {name!r}" if named_by is not None else f"{folder / name}"
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(
            f"{source} lies outside the checkpoint folder {folder} "
            "(an index may only name files in the folder: no absolute path, no '..')"
        )
    path = folder / name
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{source}: cannot resolve its symlinks ({e})") from None
    if not may_read(folder, target):
        where = f"the checkpoint folder {folder}"
        repo = hub_cache_repo(folder)
        if repo is not None:
            where += f" and outside its hub cache repo's {repo / 'blobs'}"
        raise CheckpointError(
            f"{source} lies outside {where}: it resolves to {target}; "
            "a checkpoint's files must be in its folder (or, for a hub cache snapshot, in that repo's blobs/)"
        )
    return path
