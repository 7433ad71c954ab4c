"""`minivlm doctor PATH`: every problem of a checkpoint folder, not only the first.

`load_model` and `load_processor` stop at the first thing wrong; the doctor goes on and lists them
all, one line each, then a summary:

    problem: <what> (<file or key>): <expected>

It checks the files (config.json, the safetensors shards and their index, the tokenizer, the chat
template, the processor settings, generation_config.json), the config's values and bounds, every
tensor's name, shape and dtype against the module tree the config builds (on the meta device,
with the family's key table), NaN and Inf in the weights (streamed in bounded chunks, so memory
stays small whatever the checkpoint's size), that the tokenizer and the processor load, and that
the chat template renders a one-message conversation. Exit status 1 when it found a problem, 0
when none.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, TensorEntry, checkpoint_file, read_header
from .config import ConfigError, read_config
from .generation import GenerationDefaults, GenerationError
from .hub import resolve_checkpoint
from .processing.chat import ChatTemplateError, find_chat_template, render
from .processing.files import open_regular
from .processing.image import ImageError
from .processing.processor import ProcessorError
from .processing.tokenizer import TokenizerError, load_tokenizer
from .quant import QuantError, quant_targets, saved_quantization, swap_in
from .weights import compare_tensors, dtype_name, skip_init

CHUNK_BYTES = 16 * 1024 * 1024  # NaN/Inf scan: bytes read per step
MAX_PER_KIND = 20  # of one kind of key problem (missing, unexpected, ...), listed one by one
# Errors a check may end in that are about the checkpoint, not a bug of minivlm.
CHECKPOINT_ERRORS = (
    CheckpointError,
    ConfigError,
    ProcessorError,
    TokenizerError,
    ChatTemplateError,
    ImageError,
    GenerationError,
)
# Every file the doctor may read besides the weights: when present, each must be a regular file.
KNOWN_FILES = (
    "config.json",
    "model.safetensors.index.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class Problem:
    what: str  # what is wrong
    where: str  # the file or key
    expected: str  # what was expected instead

    def __str__(self) -> str:
        return f"problem: {self.what} ({self.where}): {self.expected}"


class Doctor:
    """Runs every check on one folder, collecting problems instead of stopping at the first."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.problems: list[Problem] = []
        self.notes: list[str] = []  # what was checked, for the summary

    def add(self, what: str, where: str | Path, expected: str) -> None:
        self.problems.append(Problem(what, str(where), expected))

    def add_error(self, e: Exception | str, where: str | Path, expected: str) -> None:
        """A problem from one of minivlm's errors; its message (which names the file) is the 'what'."""
        message = " ".join(str(e).split())
        for prefix in (f"{self.folder}/", f"{self.folder}: "):
            message = message.replace(prefix, "")
        message = message.removeprefix(f"{where}: ")  # the file is named in the parentheses already
        self.add(message, where, expected)

    def run(self) -> list[Problem]:
        self.check_files()
        family, config = self.check_config()
        entries = self.check_weight_files()
        if family is not None and entries is not None:
            self.check_keys(family, config, entries)
        if entries:
            self.check_values(entries)
        self.check_generation_config(config)
        self.check_text_side()
        return self.problems

    # -- files -------------------------------------------------------------------------------

    def check_files(self) -> None:
        for name in KNOWN_FILES:
            path = self.folder / name
            if path.is_symlink() and not path.exists():
                self.add("a dangling symlink (an unfinished download?)", name, "a file, or no entry at all")
            elif path.exists():
                try:
                    open_regular(path, CheckpointError).close()
                except CheckpointError as e:
                    self.add_error(str(e).split("; expected")[0], name, "a regular file")
        if not (self.folder / "config.json").exists():
            self.add("no config.json", self.folder, "config.json, as the hub stores it beside the weights")

    def check_config(self):
        from .load import parse_dtype, read_family_config  # load imports most of minivlm

        if not (self.folder / "config.json").exists():
            return None, None
        try:
            family, config, _ = read_family_config(self.folder)
        except (ConfigError, CheckpointError) as e:
            self.add_error(e, "config.json", "a config.json minivlm can build a model from")
            return None, None
        try:
            parse_dtype(None, getattr(config, "dtype", None))
        except ValueError as e:
            self.add_error(e, "config.json torch_dtype", "float32, bfloat16 or float16")
        return family, config

    def check_weight_files(self) -> dict[str, TensorEntry] | None:
        """Every tensor of every readable weights file; None when the set of files is unknown."""
        folder = self.folder
        index_path = folder / "model.safetensors.index.json"
        weight_map: dict[str, str] = {}
        if index_path.exists():
            try:
                raw = json.loads(index_path.read_bytes().decode("utf-8")) if index_path.is_file() else None
                weight_map = raw["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError
            except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                if index_path.is_file():
                    self.add(
                        "not a valid index",
                        index_path.name,
                        "a JSON object whose 'weight_map' maps tensor names to shard files",
                    )
                return None
            names = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").exists():
            names = ["model.safetensors"]
        else:
            names = sorted(f.name for f in folder.glob("*.safetensors"))
            if not names:
                self.add("no weights found", folder, "model.safetensors, or shards with model.safetensors.index.json")
                return None
        entries: dict[str, TensorEntry] = {}
        complete = True
        for name in names:
            try:
                path = checkpoint_file(folder, name, named_by=index_path if weight_map else None)
                if not path.exists():
                    self.add("missing shard", name, f"the file that {index_path.name} names")
                    complete = False
                    continue
                header = read_header(path)
            except CheckpointError as e:
                self.add_error(e, name, "a readable safetensors file inside the checkpoint folder")
                complete = False
                continue
            for key, entry in header.items():
                if key in entries:
                    self.add(f"tensor also in {entries[key].file.name}", f"{key} in {name}", "each tensor in one file")
                    continue
                entries[key] = entry
                if weight_map and weight_map.get(key, name) != name:
                    self.add(
                        f"the index places it in {weight_map[key]}", f"{key} in {name}", "the index to name its file"
                    )
        for key, name in weight_map.items():
            if key not in entries and complete:
                self.add(
                    f"the index names it in {name}, which does not hold it", key, "a tensor the index lists to exist"
                )
        self.notes.append(f"{len(entries)} tensors in {len(names)} file(s)")
        return entries if complete else None

    # -- tensors -----------------------------------------------------------------------------

    def check_keys(self, family, config, entries: dict[str, TensorEntry]) -> None:
        try:
            with torch.device("meta"), skip_init():
                model = family.module(config, kernels="off")  # only its parameters' names and shapes count
                saved = saved_quantization(read_config(self.folder), "config.json")
                if saved is not None:  # a folder save_quantized wrote holds the quantized layout
                    swap_in(
                        model,
                        quant_targets(model, saved.parts, check=True, keep=saved.keep),
                        saved,
                        model_dtype(config),
                    )
        except QuantError as e:
            self.add(str(e), "config.json", "a minivlm_quantization entry load_model reads")
            return
        except (RuntimeError, ValueError) as e:  # the config passed validation but builds nothing
            self.add(f"cannot build the model ({type(e).__name__}: {e})", "config.json", "sizes that make a model")
            return
        expected = model.state_dict(keep_vars=True)
        tied: dict[int, list[str]] = {}
        for name, tensor in expected.items():
            tied.setdefault(id(tensor), []).append(name)
        _, bad = compare_tensors(expected, tied, entries, family.keys)
        rows = (
            [("unexpected tensor", e.key, "no such tensor in the model config.json describes") for e in bad.unexpected]
            + [("missing tensor", name, "a tensor of shape " + str(list(expected[name].shape))) for name in bad.missing]
            + [
                (f"shape {list(e.shape)}", f"{e.key} in {e.file.name}", f"shape {list(want)}")
                for e, want in bad.wrong_shape
            ]
            + [(f"dtype {dtype_name(e.dtype)}", f"{e.key} in {e.file.name}", want) for e, want in bad.wrong_dtype]
            + [
                (f"loads into {name!r} as {a.key!r} does", b.key, "one tensor per parameter")
                for a, b, name in bad.duplicates
            ]
        )
        kinds: dict[str, int] = {}
        for what, where, want in rows:
            kind = what.split(" ")[0] if not what.startswith("loads") else "duplicate"
            kinds[kind] = kinds.get(kind, 0) + 1
            if kinds[kind] <= MAX_PER_KIND:
                self.add(what, where, want)
        for kind, count in kinds.items():
            if count > MAX_PER_KIND:
                self.add(f"{count - MAX_PER_KIND} more of the kind above ({kind})", "tensors", "as above")
        if bad.want_params != bad.have_params:
            self.add(
                f"config.json describes {bad.want_params:,} parameters, the tensors hold {bad.have_params:,}",
                "config.json",
                "the config of these weights",
            )
        self.notes.append(f"{bad.want_params:,} parameters expected")

    def check_values(self, entries: dict[str, TensorEntry]) -> None:
        """NaN and Inf in floating-point tensors, read CHUNK_BYTES at a time."""
        for entry in entries.values():
            if not entry.dtype.is_floating_point or entry.end == entry.begin:
                continue
            try:
                bad = count_non_finite(entry)
            except (OSError, CheckpointError) as e:
                self.add(f"cannot read ({e})", f"{entry.key} in {entry.file.name}", "a readable tensor")
                continue
            if bad:
                self.add(f"{bad} NaN/Inf values", f"{entry.key} in {entry.file.name}", "finite weights")

    # -- the rest ----------------------------------------------------------------------------

    def check_generation_config(self, config) -> None:
        if config is None or not (self.folder / "generation_config.json").is_file():
            return
        try:
            GenerationDefaults.read(self.folder, getattr(config, "text", config))
        except (GenerationError, TypeError, ValueError) as e:
            self.add_error(e, "generation_config.json", "a JSON object as transformers writes it")

    def check_text_side(self) -> None:
        from .load import load_processor

        tokenizer_problem = None
        try:
            load_tokenizer(self.folder)
        except (TokenizerError, ProcessorError) as e:
            tokenizer_problem = " ".join(str(e).split())
            self.add_error(e, "tokenizer", "tokenizer.json or tokenizer.model that minivlm can read")
        processor = None
        try:
            processor = load_processor(self.folder)
        except CHECKPOINT_ERRORS as e:
            if " ".join(str(e).split()) != tokenizer_problem:
                self.add_error(e, "processor", "processor_config.json / preprocessor_config.json that load")
        try:
            template = find_chat_template(self.folder)
        except ChatTemplateError as e:
            self.add_error(e, "chat template", "a chat template file that reads")
            return
        if template is None:
            self.notes.append("no chat template (fine for a base model)")
            return
        specials = processor.special_tokens if processor is not None else {}
        vlm = (self.folder / "preprocessor_config.json").exists() or (self.folder / "processor_config.json").exists()
        forms = [[{"type": "text", "text": "Hello"}], "Hello"]
        errors = []
        for content in forms if vlm else forms[::-1]:
            try:
                render(template, [{"role": "user", "content": content}], add_generation_prompt=True, **specials)
                return
            except ChatTemplateError as e:
                errors.append(e)
        self.add_error(errors[0], "chat template", "a template that renders a one-message conversation")


def model_dtype(config) -> torch.dtype:
    """The dtype config.json records (the quantized layout's scales are in it), else float32."""
    from .load import DTYPES

    return DTYPES.get(str(getattr(config, "dtype", None) or "float32").removeprefix("torch."), torch.float32)


def count_non_finite(entry: TensorEntry) -> int:
    """How many NaN/Inf values a tensor holds, reading at most CHUNK_BYTES at once."""
    itemsize = entry.dtype.itemsize
    step = max(itemsize, CHUNK_BYTES // itemsize * itemsize)
    bad = 0
    with open_regular(entry.file, CheckpointError) as f:
        f.seek(entry.begin)
        left = entry.end - entry.begin
        while left > 0:
            data = f.read(min(step, left))
            if not data or len(data) % itemsize:
                raise CheckpointError(f"{entry.file}: truncated while reading tensor {entry.key!r}")
            left -= len(data)
            values = torch.frombuffer(bytearray(data), dtype=entry.dtype)
            if itemsize == 1:  # float8: isfinite is not implemented for it everywhere
                values = values.float()
            bad += int((~torch.isfinite(values)).sum())
    return bad


def diagnose(path) -> list[Problem]:
    """Every problem of the checkpoint at `path` (a folder or hub id); [] when it is healthy."""
    try:
        folder = resolve_checkpoint(path)
    except CheckpointError as e:
        return [Problem(" ".join(str(e).split()), str(path), "a checkpoint folder")]
    return Doctor(folder).run()


def run_doctor(args) -> int:
    try:
        folder = resolve_checkpoint(args.path)
    except CheckpointError as e:
        print(Problem(" ".join(str(e).split()), args.path, "a checkpoint folder"))
        print("1 problem found", file=sys.stdout)
        return 1
    doctor = Doctor(folder)
    problems = doctor.run()
    for problem in problems:
        print(problem, flush=True)
    checked = "; ".join(doctor.notes)
    if problems:
        print(
            f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found in {folder}"
            + (f" ({checked})" if checked else "")
        )
        return 1
    print(f"no problems found in {folder}" + (f" ({checked})" if checked else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor", help="check a checkpoint folder and list every problem found", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("path", help="a checkpoint folder (or a hub id already under weights/)")
    p.set_defaults(run=run_doctor)
