"""Checkpoint folder (config.json + safetensors, sharded or not) -> a model with its weights.

Each family's key table maps the checkpoint's names onto the module tree's. The model is built on
the meta device (no memory), each tensor is read from disk (checkpoint.py) straight into its final
buffer, cast and moved one at a time, and then assigned to the module tree without a copy: peak
host memory stays near one copy of the checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import SAFETENSORS_DTYPES, CheckpointError, TensorEntry, find_tensors, read_as
from .quant import QuantConfig, quant_targets, quantize_weight, swap_in

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
    quant: QuantConfig | None = None,
    prequantized: bool = False,
    slices: dict[str, tuple[int, int, int, int]] | None = None,
) -> nn.Module:
    """Build the module tree on the meta device, then fill it from the folder's safetensors.

    Floating-point tensors are cast to `dtype`; integer buffers keep theirs. Every parameter must
    come from the file with its exact shape; tied parameters (the same Parameter reachable under
    two names) need only one of their names in the file.

    quant: quantize the linear layers of `quant.parts` (quant.py). prequantized False: the files
    hold full-precision weights, each quantized as it is read (only one full-precision tensor is in
    memory at a time); True: the files hold the quantized layout (save_quantized).

    slices: tensor parallelism (parallel.py): {module name: (dim, start, stop, full size)}, the
    tensors of which this rank reads only [start, stop) along dim.
    """
    with torch.device("meta"), skip_init():
        model = build()
        targets = quant_targets(model, quant.parts, check=True, keep=quant.keep) if quant is not None else []
        if prequantized:  # the files hold the quantized layout: expect it
            swap_in(model, targets, quant, dtype)
    expected = model.state_dict(keep_vars=True)  # name -> meta tensor; tied names share one object
    tied_groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        tied_groups.setdefault(id(tensor), []).append(name)

    # Plan from the headers alone: every name, shape and dtype is checked before any data is read,
    # and the parameter count config.json describes against what the files hold.
    tensors = find_tensors(folder)
    if slices:
        tensors = slice_entries(tensors, table, slices)
    plan = plan_tensors(expected, tied_groups, tensors, table, folder)
    quantize_at_read = {} if prequantized else {f"{t}.weight": t for t in targets}
    if quantize_at_read:
        with torch.device("meta"):
            swap_in(model, targets, quant, dtype)

    loaded: dict[str, torch.Tensor] = {}
    for names in tied_groups.values():
        stored = [n for n in names if n in plan]
        for n in (n for n in names if n in quantize_at_read):  # read in fp32, kept only quantized
            parts = quantize_weight(read_as(plan[n if n in plan else stored[0]], torch.float32, CPU), quant, dtype)
            loaded.update({f"{quantize_at_read[n]}.{k}": v.to(device) for k, v in parts.items()})
            release_freed_memory()
        names = [n for n in names if n not in quantize_at_read]
        if not names:
            continue
        present = [n for n in names if n in plan] or stored[:1]  # an untied name may take a quantized one's tensor
        tensors = {n: read_as(plan[n], dtype, device) for n in present}
        first = tensors[present[0]]
        if all(_same_values(t, first) for t in tensors.values()):
            loaded.update({n: first for n in names})  # one tensor serves the whole tied group
        else:
            # As transformers 5: a tied pair stored with different values is loaded untied (and warned about).
            warnings.warn(
                f"{folder}: {present} are tied in config.json but differ in the checkpoint; loading them untied"
            )
            loaded.update({n: tensors.get(n, first) for n in names})

    model.load_state_dict(loaded, strict=True, assign=True)
    # assign=True made a new Parameter under each name: tie again the names that share a tensor.
    for group in tied_groups.values():
        kept = [n for n in group if n not in quantize_at_read]
        for n in kept[1:]:
            first = kept[0]
            if loaded[n] is loaded[first]:
                owner, _, attr = n.rpartition(".")
                setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    # Parameters are in place already; this moves the derived buffers (RoPE's inv_freq) along.
    return model.to(device).eval()


CPU = torch.device("cpu")


def slice_entries(
    tensors: dict[str, TensorEntry], table: KeyTable, slices: dict[str, tuple[int, int, int, int]]
) -> dict[str, TensorEntry]:
    """The entries of `slices` (by module name) narrowed to this rank's slice, each checked first to
    have the full size along the split dimension."""
    out = {}
    for key, entry in tensors.items():
        spec = slices.get(table.model_key(key) or "")
        if spec is not None:
            dim, start, stop, full = spec
            if len(entry.shape) <= dim or entry.shape[dim] != full:
                raise CheckpointError(
                    f"{entry.file}: tensor {key!r} has shape {list(entry.shape)}; tensor parallelism "
                    f"expects {full} along dimension {dim}"
                )
            entry = entry.sliced(dim, start, stop)
        out[key] = entry
    return out


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    Quantizing while loading frees a full-precision tensor and its temporaries after each weight.
    glibc keeps such blocks for reuse once its mmap threshold has risen past their size, and the
    next tensors do not fit the holes, so without this the resident peak of a load grew by
    hundreds of MiB (int4 with the output projection, interleave-0.5b: 3493 MiB against 2676 MiB
    with the threshold pinned)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


@dataclass
class Mismatch:
    """What differs between the model config.json describes and the tensors the files hold."""

    unexpected: list[TensorEntry]  # in the files, fitting no part of the model
    missing: list[str]  # model names (one per tied group) that no file holds
    wrong_shape: list[tuple[TensorEntry, tuple[int, ...]]]  # (entry, the shape the model wants)
    wrong_dtype: list[tuple[TensorEntry, str]]  # (entry, what the model wants): an integer tensor where it
    # has a floating one, or a quantized weight of another integer type
    duplicates: list[tuple[TensorEntry, TensorEntry, str]]  # two tensors loading into one name
    want_params: int  # elements the model has (tied tensors once)
    have_params: int  # elements of the tensors that load into it


def compare_tensors(
    expected: dict[str, torch.Tensor],
    tied_groups: dict[int, list[str]],
    tensors: dict[str, TensorEntry],
    table: KeyTable,
) -> tuple[dict[str, TensorEntry], Mismatch]:
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
            bad.wrong_dtype.append((entry, "a floating-point dtype (F32, F16, BF16)"))
        elif not expected[name].dtype.is_floating_point and entry.dtype != expected[name].dtype:
            bad.wrong_dtype.append((entry, dtype_name(expected[name].dtype)))  # a quantized weight's storage
        plan[name] = entry
    bad.missing = [names[0] for names in tied_groups.values() if not any(n in plan for n in names)]
    bad.have_params -= sum(math.prod(plan[n].shape) for names in tied_groups.values() for n in names[1:] if n in plan)
    return plan, bad


def plan_tensors(
    expected: dict[str, torch.Tensor],
    tied_groups: dict[int, list[str]],
    tensors: dict[str, TensorEntry],
    table: KeyTable,
    folder: Path,
) -> dict[str, TensorEntry]:
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
        entry, want = bad.wrong_dtype[0]
        raise CheckpointError(
            f"{entry.file}: tensor {entry.key!r} is stored as {dtype_name(entry.dtype)}; expected {want}"
        )
    return plan


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype: torch.int32 -> 'I32'."""
    return next((k for k, v in SAFETENSORS_DTYPES.items() if v == dtype), str(dtype))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN equal to NaN (a tied pair of NaN weights is still one tensor)."""
    return torch.equal(a, b) or (a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all()))


@contextlib.contextmanager
def skip_init():
    """Make torch.nn.init's initialisers no-ops while the module tree is built on the meta device.

    Every parameter is about to be replaced by the checkpoint's, so initialising is wasted work;
    worse, the first initialiser run on a meta tensor imports torch's meta-kernel registry, which
    costs about 150 MB of resident memory and a second, whatever the checkpoint's size.
    """
    names = [
        "uniform_",
        "normal_",
        "trunc_normal_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "constant_",
        "zeros_",
        "ones_",
    ]
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
