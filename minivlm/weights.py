"""Checkpoint folder (config.json + safetensors, sharded or not) -> a model with its weights.

The model is built on the meta device (no memory), each tensor is read from disk straight into its
final buffer, cast and moved one at a time, and then assigned to the module tree without a copy:
peak host memory stays near one copy of the checkpoint.

The safetensors format is read here rather than through `safetensors.safe_open`: its mmap keeps
every touched page of the file resident beside the copy handed to torch, and checking the header
ourselves lets a truncated or corrupt file fail with a message that names it.
Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the data; offsets are relative to it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

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
    out = torch.empty(entry.shape, dtype=entry.dtype)
    # A uint8 view of the buffer; `readinto` fills it in place.
    buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    with open_regular(entry.file, CheckpointError) as f:
        f.seek(entry.begin)
        if f.readinto(buf) != len(buf):
            raise CheckpointError(f"{entry.file}: truncated while reading its tensors")
    return out


def _read_as(entry: TensorEntry, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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
        return (f"{folder}: no weights found ({found}, only {others}); "
                "minivlm reads safetensors only: convert .bin/.pt checkpoints first")  # fmt: skip
    repo = hub_cache_repo(folder)
    is_model = repo is not None and repo.name.startswith("models--")
    hub_id = repo.name.removeprefix("models--").replace("--", "/") if is_model else "<hub id>"
    return (f"{folder}: no weights found ({found}); was the download interrupted? "
            f"Run `python -m minivlm download {hub_id}` and load the folder it prints")  # fmt: skip


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


# ---------------------------------------------------------------------------------------------
# Key tables: checkpoint names -> module names, one per family


@dataclass(frozen=True)
class KeyTable:
    """How one family's checkpoint keys map onto minivlm's module tree.

    `renames` are (regex, replacement) rows tried in order, the first match wins, and a key that
    matches none keeps its name. A checkpoint may be in the hub's layout or in transformers 5's
    `save_pretrained` layout; each row that differs between them is one line here. Keys matching
    `ignore` are dropped: buffers some checkpoints store but minivlm derives (RoPE's inv_freq) and
    heads it never uses.
    """

    renames: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()

    def model_key(self, key: str) -> str | None:
        if any(re.fullmatch(pattern, key) for pattern in self.ignore):
            return None
        for pattern, replacement in self.renames:
            new, n = re.subn(f"^{pattern}", replacement, key, count=1)
            if n:
                return new
        return key


# Llama/Mistral/Qwen2 text checkpoints: the hub and transformers 5 agree on the names.
TEXT_KEYS = KeyTable(ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))

# LLaVA, LLaVA-NeXT, LLaVA-Interleave. minivlm's VLM tree uses these names, so the hub's keys load
# as they are but for the vision tower's `vision_model.` level, which transformers 5's
# save_pretrained drops. The rows after it take transformers 5's in-memory names (a state_dict
# saved by hand). SigLIP's pooling head is never used by LLaVA.
LLAVA_KEYS = KeyTable(
    renames=(
        (r"vision_tower\.vision_model\.", "vision_tower."),
        (r"model\.vision_tower\.", "vision_tower."),
        (r"model\.multi_modal_projector\.", "multi_modal_projector."),
        (r"model\.language_model\.", "language_model.model."),
        (r"model\.image_newline", "image_newline"),
        (r"lm_head\.", "language_model.lm_head."),
    ),
    ignore=(r"vision_tower\.(vision_model\.)?head\..*", r".*\.rotary_emb\.inv_freq"),
)

# Idefics3 / SmolVLM: the hub and transformers 5 agree; only the top-level names differ from ours.
IDEFICS3_KEYS = KeyTable(
    renames=(
        (r"model\.vision_model\.", "vision_tower."),
        (r"model\.connector\.modality_projection\.", "multi_modal_projector."),
        (r"model\.text_model\.", "language_model.model."),
        (r"lm_head\.", "language_model.lm_head."),
    ),
    ignore=(r".*\.rotary_emb\.inv_freq",),
)

# llama3v: the decoder under `llm.`, the vision tower under `vison.` (sic), the resampler under
# `projection.`; below each prefix the names are transformers' Llama and Idefics2 ones and
# torch.nn.MultiheadAttention's, as minivlm's modules use them.
LLAMA3V_KEYS = KeyTable(
    renames=(
        (r"llm\.model\.", "language_model.model."),
        (r"llm\.lm_head\.", "language_model.lm_head."),
        (r"vison\.", "vision_tower."),
        (r"projection\.", "multi_modal_projector."),
    ),
    ignore=(r".*\.rotary_emb\.inv_freq", r"projection\.pos_embed"),
)


# ---------------------------------------------------------------------------------------------
# Building a model from a folder


def load_weights(
    build: Callable[[], nn.Module],
    folder: Path,
    table: KeyTable,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """Build the module tree on the meta device, then fill it from the folder's safetensors.

    Floating-point tensors are cast to `dtype`; integer buffers keep theirs. Every parameter must
    come from the file with its exact shape; tied parameters (the same Parameter reachable under
    two names) need only one of their names in the file.
    """
    with torch.device("meta"), _skip_init():
        model = build()
    expected = model.state_dict(keep_vars=True)  # name -> meta tensor; tied names share one object
    tied_groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        tied_groups.setdefault(id(tensor), []).append(name)

    # Plan from the headers alone: every name, shape and dtype is checked before any data is read,
    # and the parameter count config.json describes against what the files hold.
    plan = plan_tensors(expected, tied_groups, find_tensors(folder), table, folder)

    loaded: dict[str, torch.Tensor] = {}
    for names in tied_groups.values():
        present = [n for n in names if n in plan]
        tensors = {n: _read_as(plan[n], dtype, device) for n in present}
        first = tensors[present[0]]
        if all(_same_values(t, first) for t in tensors.values()):
            loaded.update({n: first for n in names})  # one tensor serves the whole tied group
        else:
            # As transformers 5: a tied pair stored with different values is loaded untied (and warned about).
            warnings.warn(f"{folder}: {present} are tied in config.json but differ in the checkpoint; loading them untied")
            loaded.update({n: tensors.get(n, first) for n in names})

    model.load_state_dict(loaded, strict=True, assign=True)
    # assign=True made a new Parameter under each name: tie again the names that share a tensor.
    for first, *others in tied_groups.values():
        for n in others:
            if loaded[n] is loaded[first]:
                owner, _, attr = n.rpartition(".")
                setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    # Parameters are in place already; this moves the derived buffers (RoPE's inv_freq) along.
    return model.to(device).eval()


@dataclass
class Mismatch:
    """What differs between the model config.json describes and the tensors the files hold."""

    unexpected: list[TensorEntry]  # in the files, fitting no part of the model
    missing: list[str]  # model names (one per tied group) that no file holds
    wrong_shape: list[tuple[TensorEntry, tuple[int, ...]]]  # (entry, the shape the model wants)
    wrong_dtype: list[TensorEntry]  # an integer or bool tensor where the model has a floating one
    duplicates: list[tuple[TensorEntry, TensorEntry, str]]  # two tensors loading into one name
    want_params: int  # elements the model has (tied tensors once)
    have_params: int  # elements of the tensors that load into it


def compare_tensors(expected: dict[str, torch.Tensor], tied_groups: dict[int, list[str]],
                    tensors: dict[str, TensorEntry], table: KeyTable) -> tuple[dict[str, TensorEntry], Mismatch]:  # fmt: skip
    """Match the files' tensors to the model's names from the headers alone (no data is read):
    the plan (model name -> entry) and every mismatch found."""
    plan: dict[str, TensorEntry] = {}
    bad = Mismatch([], [], [], [], [], sum(expected[names[0]].numel() for names in tied_groups.values()), 0)
    for entry in tensors.values():
        name = table.model_key(entry.key)
        if name is None:
            continue
        if name not in expected:
            bad.unexpected.append(entry)
            continue
        bad.have_params += math.prod(entry.shape)
        if name in plan:
            bad.duplicates.append((plan[name], entry, name))
            continue
        want = tuple(expected[name].shape)
        if entry.shape != want:
            bad.wrong_shape.append((entry, want))
        elif expected[name].dtype.is_floating_point and not entry.dtype.is_floating_point:
            bad.wrong_dtype.append(entry)
        plan[name] = entry
    bad.missing = [names[0] for names in tied_groups.values() if not any(n in plan for n in names)]
    bad.have_params -= sum(math.prod(plan[n].shape) for names in tied_groups.values() for n in names[1:] if n in plan)
    return plan, bad


def plan_tensors(expected: dict[str, torch.Tensor], tied_groups: dict[int, list[str]],
                 tensors: dict[str, TensorEntry], table: KeyTable, folder: Path) -> dict[str, TensorEntry]:  # fmt: skip
    """The plan of `compare_tensors`, or a CheckpointError for the first kind of mismatch."""
    plan, bad = compare_tensors(expected, tied_groups, tensors, table)
    counts = f"config.json describes {bad.want_params:,} parameters, the checkpoint's tensors hold {bad.have_params:,}"
    if bad.duplicates:
        first, second, name = bad.duplicates[0]
        raise CheckpointError(f"{folder}: tensors {first.key!r} and {second.key!r} both load into {name!r}")
    if bad.wrong_shape:
        entry, want = bad.wrong_shape[0]
        raise CheckpointError(
            f"{entry.file}: tensor {entry.key!r} has shape {list(entry.shape)}, the config asks for {list(want)}"
            + (f" ({counts})" if bad.want_params != bad.have_params else "")
        )
    if bad.unexpected:
        keys = [e.key for e in bad.unexpected]
        raise CheckpointError(
            f"{folder}: {len(keys)} tensors in the checkpoint fit no part of the model, e.g. {keys[:5]}; "
            f"is config.json from the same checkpoint? ({counts})"
        )
    if bad.missing:
        raise CheckpointError(
            f"{folder}: {len(bad.missing)} tensors are missing from the checkpoint, e.g. {bad.missing[:5]} ({counts})"
        )
    if bad.wrong_dtype:
        entry = bad.wrong_dtype[0]
        raise CheckpointError(
            f"{entry.file}: tensor {entry.key!r} is stored as {dtype_name(entry.dtype)}; expected a floating-point "
            "dtype (F32, F16, BF16) for a weight"
        )
    return plan


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype: torch.int32 -> 'I32'."""
    return next((k for k, v in SAFETENSORS_DTYPES.items() if v == dtype), str(dtype))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN equal to NaN (a tied pair of NaN weights is still one tensor)."""
    return torch.equal(a, b) or (a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all()))


@contextlib.contextmanager
def _skip_init():
    """Make torch.nn.init's initialisers no-ops while the module tree is built on the meta device.

    Every parameter is about to be replaced by the checkpoint's, so initialising is wasted work;
    worse, the first initialiser run on a meta tensor imports torch's meta-kernel registry, which
    costs about 150 MB of resident memory and a second, whatever the checkpoint's size.
    """
    names = ["uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_", "constant_", "zeros_", "ones_"]  # fmt: skip
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
