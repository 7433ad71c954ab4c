"""Model configuration: frozen dataclasses built once from a checkpoint's config.json.

`config.json` comes in two dialects. Hub checkpoints (and transformers 4) write `rope_theta` and
`rope_scaling` at the top level and `torch_dtype`; transformers 5's `save_pretrained` nests them
as `rope_parameters` and writes `dtype`. `from_hf` reads both, validates once, and the result is
never mutated afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that minivlm cannot build a model from; the message names the field."""


# model_type -> what is specific to that family. Everything else is shared Llama-family structure.
#   qkv_bias / o_bias: which attention projections carry a bias (Qwen2: q, k, v only).
#   max_positions: transformers' default when config.json leaves `max_position_embeddings` out.
TEXT_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": None, "o_bias": None, "max_positions": 2048},  # None: read `attention_bias`
    "mistral": {"qkv_bias": False, "o_bias": False, "max_positions": 4096 * 32},
    "qwen2": {"qkv_bias": True, "o_bias": False, "max_positions": 32768},
}

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"                 # "default" | "linear" | "llama3"
    factor: float = 1.0                   # linear and llama3: how much longer the context became
    low_freq_factor: float = 1.0          # llama3 only
    high_freq_factor: float = 4.0         # llama3 only
    original_max_positions: int = 8192    # llama3 only: the pretraining context length


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
    dtype: str | None = None              # the dtype the checkpoint was saved in, if it says

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "TextConfig":
        """Build from a decoder's config dict (a text checkpoint's config.json, or a VLM's text_config)."""
        model_type = d.get("model_type")
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

        hidden_size, num_heads = int(need("hidden_size")), int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        num_kv_heads = int(d.get("num_key_value_heads") or num_heads)
        head_dim = d.get("head_dim")
        if head_dim is None:
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
        max_positions = int(d.get("max_position_embeddings") or family["max_positions"])

        eos = d.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)

        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(d, max_positions, source),
            max_positions=max_positions,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_windows=_sliding_windows(d, model_type, num_layers, source),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            dtype=d.get("dtype") or d.get("torch_dtype"),
        )


def _rope_from_hf(d: dict[str, Any], max_positions: int, source: str) -> RopeConfig:
    # transformers 5 nests everything in `rope_parameters`; the hub's files keep `rope_theta` at the
    # top and the scaling (if any) in `rope_scaling`, whose type key was once called "type".
    params = dict(d.get("rope_scaling") or {})
    params.update(d.get("rope_parameters") or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {kind!r} is not supported; minivlm supports {list(ROPE_TYPES)}")
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if "factor" not in params:
        raise ConfigError(f"{source}: rope type {kind!r} needs a 'factor' in rope_scaling / rope_parameters")
    if kind == "linear":
        return RopeConfig(theta=float(theta), kind=kind, factor=float(params["factor"]))
    for key in ("low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise ConfigError(f"{source}: rope type 'llama3' needs {key!r} in rope_scaling / rope_parameters")
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        # As transformers: fall back to max_position_embeddings when the original length is absent.
        original_max_positions=int(params.get("original_max_position_embeddings", max_positions)),
    )


def _sliding_windows(d: dict[str, Any], model_type: str, num_layers: int, source: str) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None  # Qwen2 configs carry a window size that is only used when switched on
    layer_types = d.get("layer_types")
    if layer_types is None:
        if model_type == "qwen2" and window is not None:
            # transformers' Qwen2Config: layers from `max_window_layers` on use the window.
            first = int(d.get("max_window_layers", 28))
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            layer_types = ["sliding_attention" if window is not None else "full_attention"] * num_layers
    if len(layer_types) != num_layers:
        raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries, num_hidden_layers is {num_layers}")
    windows = []
    for kind in layer_types:
        if kind == "full_attention":
            windows.append(None)
        elif kind == "sliding_attention":
            windows.append(int(window) if window is not None else None)
        else:
            raise ConfigError(f"{source}: layer type {kind!r} is not supported (full_attention, sliding_attention)")
    return tuple(windows)


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder as a dict, with errors that name the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the checkpoint folder {folder}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return d
