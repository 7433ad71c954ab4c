"""`load_model`: which family a checkpoint folder holds, and its config, module tree and key table."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import ops
from .config import ConfigError, ConnectorConfig, TextConfig, read_config
from .connector import CONNECTORS
from .decoder import DecoderLM
from .family_config import idefics3_config, llama3v_config, llava_config, llava_next_config
from .generation import GenerationDefaults
from .hub import resolve_checkpoint
from .parity import NO_PARITY_LLAMA3V, TEXT_PARITY, VLM_PARITY, ParityMap
from .processing.family_processors import Idefics3Processor, Llama3VProcessor, LlavaNextProcessor, LlavaProcessor
from .processing.files import open_regular, read_json
from .processing.processor import Processor, ProcessorError
from .processing.tokenizer import TokenizerError
from .quant import QuantConfig, QuantError, saved_quantization
from .quant import prepare as prepare_quantized
from .vlm import Idefics3, Llama3V, Llava, LlavaNext
from .weights import IDEFICS3_KEYS, LLAMA3V_KEYS, LLAVA_KEYS, TEXT_KEYS, KeyTable, load_weights


@dataclass(frozen=True)
class Family:
    """Everything minivlm knows of one family, by the place in the code where it lives."""

    config: Callable[[dict[str, Any], str], Any]  # (config.json dict, source name) -> frozen config
    module: Callable[..., nn.Module]  # (config, kernels=...) -> module tree (built on the meta device)
    keys: KeyTable  # checkpoint key -> module name (weights.py)
    processor: type[Processor]  # its image settings, tiling, placeholder text and token count
    parity: ParityMap  # transformers' twin and the stages `minivlm parity` compares
    hf_decoder: str = "model.language_model"  # transformers' module name of the decoder (LlamaModel): PEFT keys by it


# config.json's model_type -> family. A new family, or a variant of one, is its classes and one row here.
FAMILIES: dict[str, Family] = {
    "llama": Family(TextConfig.from_hf, DecoderLM, TEXT_KEYS, Processor, TEXT_PARITY, "model"),
    "mistral": Family(TextConfig.from_hf, DecoderLM, TEXT_KEYS, Processor, TEXT_PARITY, "model"),
    "qwen2": Family(TextConfig.from_hf, DecoderLM, TEXT_KEYS, Processor, TEXT_PARITY, "model"),
    "llava": Family(llava_config, Llava, LLAVA_KEYS, LlavaProcessor, VLM_PARITY, "model.language_model"),
    "llava_next": Family(
        llava_next_config, LlavaNext, LLAVA_KEYS, LlavaNextProcessor, VLM_PARITY, "model.language_model"
    ),
    "idefics3": Family(idefics3_config, Idefics3, IDEFICS3_KEYS, Idefics3Processor, VLM_PARITY, "model.text_model"),
    "llama3v": Family(llama3v_config, Llama3V, LLAMA3V_KEYS, Llama3VProcessor, NO_PARITY_LLAMA3V, "llm.model"),
}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def parse_dtype(dtype: torch.dtype | str | None, default: str | None = None) -> torch.dtype:
    """A torch dtype from a dtype, a name ('bf16', 'bfloat16', 'torch.float16'), or the checkpoint's default."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype} is not a floating-point type; expected one of float32, bfloat16, float16")
        return dtype
    name = dtype if dtype is not None else (default or "float32")
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(set(DTYPES))}")
    return DTYPES[name]


def family_of(folder) -> tuple[str, Family]:
    """The model_type of a checkpoint folder's config.json, and its row of FAMILIES."""
    model_type = read_config(folder).get("model_type")
    return model_type, row_of(model_type, str(folder / "config.json"))


def row_of(model_type, source: str) -> Family:
    """FAMILIES[model_type], or a ConfigError naming the model_types minivlm loads."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        what = f"model_type {model_type!r}" if model_type else "no model_type"
        raise ConfigError(f"{source}: {what}; minivlm loads {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> Any:
    """A config.json's dict -> its family's validated, frozen config (TextConfig or VLMConfig).

    Sizes beyond config.SIZE_LIMITS are refused unless MINIVLM_TRUST_CONFIG=1; a field of the
    wrong type anywhere is a ConfigError naming the file, never a traceback.
    """
    family = row_of(raw.get("model_type"), source)
    try:
        config = family.config(raw, source)
        if CONNECTOR_KEY in raw:  # a connector swapped and trained by minivlm: its row replaces the family's
            config = dataclasses.replace(config, connector=swapped_connector(raw[CONNECTOR_KEY], source))
        return config
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:  # a field of the wrong shape
        raise ConfigError(
            f"{source}: a field has a value of the wrong type or shape ({type(e).__name__}: {e}); "
            "expected a config.json as transformers writes it"
        ) from None


# config.json's row of a connector swapped in by minivlm (training.save writes it): the fields of
# config.ConnectorConfig, its `kind` a name in connector.CONNECTORS (registered before loading).
CONNECTOR_KEY = "minivlm_connector"


def swapped_connector(row, source: str) -> ConnectorConfig:
    fields = {f.name for f in dataclasses.fields(ConnectorConfig)}
    if not isinstance(row, dict) or not {"kind", "in_dim", "out_dim"} <= set(row) or not set(row) <= fields:
        raise ConfigError(f"{source}: {CONNECTOR_KEY} must be a dict of ConnectorConfig's fields {sorted(fields)}")
    if row["kind"] not in CONNECTORS:
        raise ConfigError(
            f"{source}: the connector {row['kind']!r} is not registered; minivlm has {sorted(CONNECTORS)} "
            "(register its class in minivlm.connector.CONNECTORS before loading)"
        )
    return ConnectorConfig(**row)


def read_family_config(folder) -> tuple[Family, Any, dict[str, Any]]:
    """The family, the validated config and the raw dict of a checkpoint folder's config.json."""
    raw = read_config(folder)
    config = config_from_hf(raw, str(folder / "config.json"))
    return FAMILIES[raw["model_type"]], config, raw


def load_model(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    kernels: str | bool | None = None,
    quantize: str | QuantConfig | None = None,
    group_size: int | None = None,
    quantize_parts: Sequence[str] | str | None = None,
    quantize_keep: Sequence[str] | str | None = None,
    tensor_parallel: bool = False,
) -> nn.Module:
    """Load a checkpoint folder (or hub id) as the hub stores it, in eval mode.

    dtype None keeps the dtype config.json records (transformers' `dtype="auto"`), else float32.
    kernels: the path (ops.py). "auto", the fast path: the Triton kernels on CUDA when triton
    imports, torch's SDPA attention elsewhere; "off" (False), the reference: ops.py's definitions
    of transformers' arithmetic, which parity is measured on; "on" (True): the Triton kernels
    forced. None reads the environment variable MINIVLM_KERNELS (auto, on/1, off/0), here, once.
    config.json's sizes are bounded (config.SIZE_LIMITS; MINIVLM_TRUST_CONFIG=1 lifts the bounds),
    and every tensor's name, shape and dtype is checked against the model from the headers alone,
    before any memory is allocated for weights. `python -m minivlm doctor PATH` lists every problem.

    quantize: "int8" or "int4" quantizes the weights of the linear layers as they are read (quant.py):
    those of `quantize_parts` ("decoder", the default, "lm_head", "vision", "connector"), int4 in
    groups of `group_size` inputs (32, 64 (the default) or 128), round-to-nearest (a
    quant.QuantConfig given as `quantize` sets every choice, search=True among them: each group's
    range searched for the least error). quantize_keep: names of linear layers of those parts left in
    full precision (`model.named_modules()`'s names; quant_sensitivity.rank finds the layers whose
    quantization moves the output most). A checkpoint saved quantized
    (quant_save.save_quantized) loads as it was saved, and takes no quantize argument.

    tensor_parallel: split the decoder across the ranks of the initialised torch.distributed
    process group (parallel.py); each rank reads only its slices of the files. Every rank calls
    this with the same checkpoint, and then generate/stream as it would alone.
    """
    folder = resolve_checkpoint(path_or_id)
    family, config, raw = read_family_config(folder)
    dtype = parse_dtype(dtype, getattr(config, "dtype", None))
    kernels = ops.kernels_choice(kernels)
    ops.check_kernels_device(kernels, torch.device(device))
    quant = QuantConfig.parse(quantize, group_size, quantize_parts, keep=quantize_keep)
    saved = saved_quantization(raw, f"{folder}/config.json")
    if saved is not None and quant is not None:
        raise QuantError(f"{folder} is saved quantized ({saved.scheme}); load it without quantize=")
    build, slices, shard = (lambda: family.module(config, kernels)), None, None
    if tensor_parallel:
        build, slices, shard = parallel_build(folder, family, config, kernels, saved or quant)
    model = load_weights(
        build,
        folder,
        family.keys,
        dtype,
        torch.device(device),
        quant=saved or quant,
        prequantized=saved is not None,
        slices=slices,
    )
    model.tensor_parallel = shard
    if shard is not None:
        from .parallel import meet

        meet()  # every rank has loaded (the slowest may take minutes): from here collectives run in step
    prepare_quantized(model)
    model.quantization = saved or quant
    model.generation_defaults = GenerationDefaults.read(folder, getattr(config, "text", config))
    return model


def parallel_build(folder, family: Family, config, kernels: str, quant):
    """Tensor parallelism's build function, the slices this rank reads, and its place."""
    from . import parallel

    shard = parallel.current_shard()
    if quant is not None:
        raise parallel.ParallelError(
            "tensor parallelism (tensor_parallel=True, or torchrun with more than one process) does not take "
            "quantized weights (quantize= / --quantize, or a checkpoint saved quantized); quantize on one "
            "device, or split the full-precision model"
        )
    parallel.check_same_checkpoint(Path(folder), shard)
    text = getattr(config, "text", config)
    local = parallel.local_config(text, shard)
    local_model = local if text is config else dataclasses.replace(config, text=local)

    def build():
        model = family.module(local_model, kernels)
        parallel.split_decoder(getattr(model, "language_model", model), text, shard)
        ops.set_kernels(model, kernels)  # the split layers swapped in take the model's path too
        return model

    prefix = "" if text is config else "language_model."
    return build, parallel.decoder_slices(text, shard, prefix), shard


def load_processor(path_or_id: str | os.PathLike) -> Processor:
    """The processor of a checkpoint folder (or hub id): its tokenizer, chat template and image settings."""
    folder = resolve_checkpoint(path_or_id)
    for name in PROCESSOR_FILES:  # a FIFO or folder by one of these names is refused, not skipped
        if (folder / name).exists():
            open_regular(folder / name, ProcessorError).close()
    try:
        processor = processor_class(folder).load(folder)
    except TokenizerError as e:
        raise ProcessorError(str(e)) from None
    try:
        raw = read_json(folder / "config.json", ProcessorError)
    except ProcessorError:  # a processor needs no config.json, nor one it can read
        raw = {}
    if processor.family is not None and CONNECTOR_KEY in raw:  # its token count follows the swapped connector
        try:
            processor.connector = swapped_connector(raw[CONNECTOR_KEY], str(folder / "config.json"))
        except ConfigError as e:
            raise ProcessorError(str(e)) from None
    return processor


def processor_class(folder) -> type[Processor]:
    """The processor class of a checkpoint folder: its family's (by config.json's model_type), or for
    a processor saved alone, the one whose `hf_name` processor_config.json's processor_class gives;
    else the text-only Processor."""
    try:
        model_type = read_json(folder / "config.json", ProcessorError).get("model_type")
    except ProcessorError:  # a processor needs no config.json, nor one it can read
        model_type = None
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type].processor
    name = read_json(folder / "processor_config.json", ProcessorError).get("processor_class")
    return next((f.processor for f in FAMILIES.values() if name and f.processor.hf_name == name), Processor)


# The files a processor may read, which must be regular files when present.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
)
