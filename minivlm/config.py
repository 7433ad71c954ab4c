"""Model configuration: frozen dataclasses built once from a checkpoint's config.json.

`config.json` comes in two dialects. Hub checkpoints (and transformers 4) write `rope_theta` and
`rope_scaling` at the top level and `torch_dtype`; transformers 5's `save_pretrained` nests them
as `rope_parameters` and writes `dtype`. `from_hf` reads both, validates once, and the result is
never mutated afterwards.

Validation is also a guard: config.json is data from the internet, and the module tree is built
from its sizes before a byte of the weights is read. Every size must be a positive integer (a float
only when it is a whole number: `2048.0`, not `1e3` of a string nor `0.5`), and no larger than
`SIZE_LIMITS`, far above any released checkpoint, so that `num_hidden_layers: 1e8` is one clear
ConfigError instead of a build that runs until memory is gone. Set MINIVLM_TRUST_CONFIG=1 to lift
the upper limits (the integer and positivity checks stay).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .processing.files import read_json


class ConfigError(ValueError):
    """A config.json that minivlm cannot build a model from; the message names the field."""


# Plausibility bounds on config.json's sizes. The largest released checkpoints stay well inside:
# 126 layers (Llama-3.1-405B), hidden 16384, vocab 262144 (Gemma 3), intermediate 53248,
# 128 heads, head_dim 256, a 10M-token context. MINIVLM_TRUST_CONFIG=1 lifts them.
SIZE_LIMITS: dict[str, int] = {
    "num_hidden_layers": 1024, "hidden_size": 65536, "intermediate_size": 262144, "vocab_size": 4_194_304,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
    "max_position_embeddings": 1 << 26, "original_max_position_embeddings": 1 << 26, "sliding_window": 1 << 26,
    "max_window_layers": 1024, "image_size": 16384, "patch_size": 1024, "num_channels": 64, "scale_factor": 64,
    "query_num": 65536, "image_grid_pinpoints": 65536,
}  # fmt: skip
TRUST_CONFIG_ENV = "MINIVLM_TRUST_CONFIG"


def trusting_config() -> bool:
    """Whether MINIVLM_TRUST_CONFIG=1 lifts SIZE_LIMITS."""
    return os.environ.get(TRUST_CONFIG_ENV, "") not in ("", "0")


def size(value: Any, key: str, source: str, minimum: int = 1) -> int:
    """`value` (config.json's `key`) as an int of at least `minimum` and at most SIZE_LIMITS[key]."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)  # 2048.0: some tools write whole numbers as floats
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: {key} is {value!r}; expected an integer")
    if value < minimum:
        raise ConfigError(f"{source}: {key} is {value}; expected an integer of at least {minimum}")
    limit = SIZE_LIMITS.get(key)
    if limit is not None and value > limit and not trusting_config():
        raise ConfigError(
            f"{source}: {key} is {value}, implausibly large (expected at most {limit:,}); "
            f"if the checkpoint really is that size, set {TRUST_CONFIG_ENV}=1"
        )
    return value


def number(value: Any, key: str, source: str, positive: bool = False) -> float:
    """`value` (config.json's `key`) as a finite float (> 0 when `positive`, else >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source}: {key} is {value!r}; expected a finite number")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{source}: {key} is {value}; expected a {'positive' if positive else 'non-negative'} number")
    return float(value)


def token_id(value: Any, key: str, source: str, minimum: int = 0) -> int | None:
    """A token id: None or an integer of at least `minimum` (older Llama configs write pad -1)."""
    return None if value is None else size(value, key, source, minimum=minimum)


# model_type -> what is specific to that family. Everything else is shared Llama-family structure.
#   qkv_bias / o_bias: which attention projections carry a bias (Qwen2: q, k, v only).
#   max_positions: transformers' default when config.json leaves `max_position_embeddings` out.
TEXT_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": None, "o_bias": None, "max_positions": 2048},  # None: read `attention_bias`
    "mistral": {"qkv_bias": False, "o_bias": False, "max_positions": 4096 * 32},
    "qwen2": {"qkv_bias": True, "o_bias": False, "max_positions": 32768},
}

# transformers' config-class defaults, for the sub-configs of VLM checkpoints: the hub's
# llava-1.5 config.json, for one, gives only a handful of text_config fields and leans on
# LlamaConfig's defaults for the rest. (tests/test_config.py checks these against transformers.)
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6,
                    max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=32768),
}  # fmt: skip

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0  # linear and llama3: how much longer the context became
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_positions: int = 8192  # llama3 only: the pretraining context length


@dataclass(frozen=True)
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_positions: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    # Per layer: the sliding-window size, or None for full causal attention.
    sliding_windows: tuple[int | None, ...]
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str | None = None  # the dtype the checkpoint was saved in, if it says

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json", fill_defaults: bool = False) -> "TextConfig":
        """Build from a decoder's config dict (a text checkpoint's config.json, or a VLM's text_config).

        fill_defaults: take fields the dict leaves out from transformers' config class, as
        transformers does for a VLM's text_config. A text checkpoint's own config.json must carry
        its sizes: there a missing size is a broken file, not a default.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of the decoder's settings, got {d!r:.80}")
        model_type = d.get("model_type")
        if not isinstance(model_type, (str, type(None))):
            raise ConfigError(f"{source}: model_type is {model_type!r:.80}; expected a string")
        if fill_defaults and model_type in TEXT_DEFAULTS:
            d = {**TEXT_DEFAULTS[model_type], **d}
        if model_type is None:
            raise ConfigError(f"{source}: no 'model_type'; expected one of {sorted(TEXT_FAMILIES)}")
        if model_type not in TEXT_FAMILIES:
            raise ConfigError(
                f"{source}: unknown text model_type {model_type!r}; minivlm supports {sorted(TEXT_FAMILIES)}"
            )
        family = TEXT_FAMILIES[model_type]

        def need(key: str) -> Any:
            if d.get(key) is None:
                raise ConfigError(f"{source}: missing required field {key!r} for model_type {model_type!r}")
            return d[key]

        def need_size(key: str) -> int:
            return size(need(key), key, source)

        hidden_size, num_heads = need_size("hidden_size"), need_size("num_attention_heads")
        num_layers = need_size("num_hidden_layers")
        vocab_size, intermediate_size = need_size("vocab_size"), need_size("intermediate_size")
        kv = d.get("num_key_value_heads")
        num_kv_heads = num_heads if kv is None else size(kv, "num_key_value_heads", source)
        head_dim = d.get("head_dim")
        if head_dim is not None:
            head_dim = size(head_dim, "head_dim", source)
        else:
            if hidden_size % num_heads:
                raise ConfigError(
                    f"{source}: hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} "
                    "and no 'head_dim' is given"
                )
            head_dim = hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported; Llama-family decoders use 'silu'")

        attention_bias = bool(d.get("attention_bias", False))
        qkv_bias = attention_bias if family["qkv_bias"] is None else family["qkv_bias"]
        o_bias = attention_bias if family["o_bias"] is None else family["o_bias"]
        max_positions = d.get("max_position_embeddings")
        max_positions = (
            family["max_positions"] if max_positions is None else size(max_positions, "max_position_embeddings", source)
        )

        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        eos = tuple(token_id(i, "eos_token_id", source) for i in eos)

        return cls(
            model_type=model_type,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=number(d.get("rms_norm_eps", 1e-6), "rms_norm_eps", source),
            rope=_rope_from_hf(d, max_positions, source),
            max_positions=max_positions,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_windows=_sliding_windows(d, model_type, num_layers, source),
            bos_token_id=token_id(d.get("bos_token_id"), "bos_token_id", source),
            eos_token_id=eos,
            pad_token_id=token_id(d.get("pad_token_id"), "pad_token_id", source, minimum=-1),
            dtype=d.get("dtype") or d.get("torch_dtype"),
        )


def _rope_from_hf(d: dict[str, Any], max_positions: int, source: str) -> RopeConfig:
    # transformers 5 nests everything in `rope_parameters`; the hub's files keep `rope_theta` at the
    # top and the scaling (if any) in `rope_scaling`, whose type key was once called "type".
    params = dict(d.get("rope_scaling") or {})
    params.update(d.get("rope_parameters") or {})
    theta = number(params.get("rope_theta", d.get("rope_theta", 10000.0)), "rope_theta", source, positive=True)
    kind = params.get("rope_type", params.get("type", "default"))
    if not isinstance(kind, str) or kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {kind!r} is not supported; minivlm supports {list(ROPE_TYPES)}")
    if kind == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise ConfigError(f"{source}: rope type {kind!r} needs a 'factor' in rope_scaling / rope_parameters")
    if kind == "linear":
        return RopeConfig(theta=theta, kind=kind, factor=number(params["factor"], "rope factor", source, positive=True))
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise ConfigError(f"{source}: rope type 'llama3' needs {key!r} in rope_scaling / rope_parameters")
    original = params.get("original_max_position_embeddings")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=number(params["factor"], "rope factor", source, positive=True),
        low_freq_factor=number(params["low_freq_factor"], "low_freq_factor", source, positive=True),
        high_freq_factor=number(params["high_freq_factor"], "high_freq_factor", source, positive=True),
        # As transformers: fall back to max_position_embeddings when the original length is absent.
        original_max_positions=max_positions
        if original is None
        else size(original, "original_max_position_embeddings", source),
    )


def _sliding_windows(d: dict[str, Any], model_type: str, num_layers: int, source: str) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None  # Qwen2 configs carry a window size that is only used when switched on
    layer_types = d.get("layer_types")
    if layer_types is None:
        if model_type == "qwen2" and window is not None:
            # transformers' Qwen2Config: layers from `max_window_layers` on use the window.
            first = size(d.get("max_window_layers", 28), "max_window_layers", source, minimum=0)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            layer_types = ["sliding_attention" if window is not None else "full_attention"] * num_layers
    if window is not None:
        window = size(window, "sliding_window", source)
    if not isinstance(layer_types, list):
        raise ConfigError(f"{source}: layer_types is {layer_types!r}; expected a list of {num_layers} layer types")
    if len(layer_types) != num_layers:
        raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries, num_hidden_layers is {num_layers}")
    windows = []
    for kind in layer_types:
        if kind == "full_attention":
            windows.append(None)
        elif kind == "sliding_attention":
            windows.append(window)
        else:
            raise ConfigError(f"{source}: layer type {kind!r} is not supported (full_attention, sliding_attention)")
    return tuple(windows)


# vision_config model_type -> the tower's structure, and transformers' defaults for its fields.
VISION_FAMILIES: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(class_token=True, pre_norm=True, patch_bias=False, variable_size=False, defaults=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)),
    "siglip_vision_model": dict(class_token=False, pre_norm=False, patch_bias=True, variable_size=False, defaults=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=16, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)),
    "idefics3_vision": dict(class_token=False, pre_norm=False, patch_bias=True, variable_size=True, defaults=dict(
        hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16, image_size=224,
        patch_size=32, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)),
}  # fmt: skip

ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu", "silu")


@dataclass(frozen=True)
class VisionConfig:
    """A ViT: CLIP (class token, pre-norm), SigLIP, or the NaViT-style SigLIP of Idefics3."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float
    class_token: bool  # CLIP prepends a learned CLS embedding
    pre_norm: bool  # CLIP's `pre_layrnorm` (sic) after the embeddings
    patch_bias: bool  # the patch convolution's bias (not CLIP)
    variable_size: bool  # positions bucketed onto the fixed grid per image, with a patch mask (NaViT)

    @property
    def grid(self) -> int:
        """Patches per side of a full-size image."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "VisionConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of the vision tower's settings, got {d!r:.80}")
        model_type = d.get("model_type")
        if not isinstance(model_type, (str, type(None))) or model_type not in VISION_FAMILIES:
            raise ConfigError(
                f"{source}: unknown vision_config model_type {model_type!r}; minivlm supports {sorted(VISION_FAMILIES)}"
            )
        family = VISION_FAMILIES[model_type]
        d = {**family["defaults"], **{k: v for k, v in d.items() if v is not None}}
        if not isinstance(d["hidden_act"], str) or d["hidden_act"] not in ACTIVATIONS:
            raise ConfigError(
                f"{source}: vision hidden_act {d['hidden_act']!r} is not supported; expected one of {ACTIVATIONS}"
            )
        hidden, heads = (
            size(d["hidden_size"], "hidden_size", source),
            size(d["num_attention_heads"], "num_attention_heads", source),
        )
        image_size, patch_size = (
            size(d["image_size"], "image_size", source),
            size(d["patch_size"], "patch_size", source),
        )
        if patch_size > image_size:
            raise ConfigError(f"{source}: patch_size {patch_size} is larger than image_size {image_size}")
        if hidden % heads:
            raise ConfigError(f"{source}: vision hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=size(d["intermediate_size"], "intermediate_size", source),
            num_layers=size(d["num_hidden_layers"], "num_hidden_layers", source),
            num_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            num_channels=size(d["num_channels"], "num_channels", source),
            hidden_act=d["hidden_act"],
            layer_norm_eps=number(d["layer_norm_eps"], "layer_norm_eps", source),
            class_token=family["class_token"],
            pre_norm=family["pre_norm"],
            patch_bias=family["patch_bias"],
            variable_size=family["variable_size"],
        )


@dataclass(frozen=True)
class ConnectorConfig:
    """What turns vision features into text embeddings; `kind` names a class in connector.CONNECTORS."""

    kind: str  # "mlp2x_gelu" | "pixel_shuffle" | "linear" | "resampler"
    in_dim: int  # vision hidden size (times the number of feature layers concatenated)
    out_dim: int  # text hidden size
    act: str = "gelu"
    bias: bool = True
    scale_factor: int = 1  # pixel shuffle: tokens merged per side
    num_queries: int = 0  # resampler: tokens out per image (or slice)
    num_heads: int = 0  # resampler: heads of its cross-attention


@dataclass(frozen=True)
class VLMConfig:
    model_type: str  # "llava" | "llava_next" | "idefics3" | "llama3v"
    text: TextConfig
    vision: VisionConfig
    connector: ConnectorConfig
    image_token_id: int
    # Which vision hidden states feed the connector: indices into (embeddings, layer 1, ..., layer N),
    # concatenated (LLaVA's vision_feature_layer); None: the last layer through post_layernorm.
    feature_layers: tuple[int, ...] | None
    drop_cls: bool  # LLaVA's "default" select strategy: drop the CLS position
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT anyres: (height, width) choices
    dtype: str | None = None
    # Each family's config.json is read into one by its reader in family_config.py, named in its
    # row of load.FAMILIES.


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder as a dict, with errors that name the file."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: no config.json in the checkpoint folder {folder}")
    return read_json(path, ConfigError)  # which refuses a FIFO, a folder or a device by that name
