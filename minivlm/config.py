"""Model configuration: frozen dataclasses built once from a checkpoint's config.json.

`config.json` comes in two dialects. Hub checkpoints (and transformers 4) write `rope_theta` and
`rope_scaling` at the top level and `torch_dtype`; transformers 5's `save_pretrained` nests them
as `rope_parameters` and writes `dtype`. `from_hf` reads both, validates once, and the result is
never mutated afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .processing.files import read_json


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
    def from_hf(cls, d: dict[str, Any], source: str = "config.json", fill_defaults: bool = False) -> "TextConfig":
        """Build from a decoder's config dict (a text checkpoint's config.json, or a VLM's text_config).

        fill_defaults: take fields the dict leaves out from transformers' config class, as
        transformers does for a VLM's text_config. A text checkpoint's own config.json must carry
        its sizes: there a missing size is a broken file, not a default.
        """
        model_type = d.get("model_type")
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
        model_type = d.get("model_type")
        if model_type not in VISION_FAMILIES:
            raise ConfigError(
                f"{source}: unknown vision_config model_type {model_type!r}; minivlm supports {sorted(VISION_FAMILIES)}"
            )
        family = VISION_FAMILIES[model_type]
        d = {**family["defaults"], **{k: v for k, v in d.items() if v is not None}}
        if d["hidden_act"] not in ACTIVATIONS:
            raise ConfigError(f"{source}: vision hidden_act {d['hidden_act']!r} is not supported; expected one of {ACTIVATIONS}")
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        if hidden % heads:
            raise ConfigError(f"{source}: vision hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            image_size=int(d["image_size"]),
            patch_size=int(d["patch_size"]),
            num_channels=int(d["num_channels"]),
            hidden_act=d["hidden_act"],
            layer_norm_eps=float(d["layer_norm_eps"]),
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

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str = "config.json") -> "VLMConfig":
        model_type = d["model_type"]
        text_d = d.get("text_config") or {"model_type": "llama"}  # transformers' default sub-config
        if model_type == "idefics3":
            text_d = {"rms_norm_eps": 1e-5, **text_d}  # Idefics3Config's own default for its Llama
        text = TextConfig.from_hf(text_d, f"{source} text_config", fill_defaults=True)
        if model_type in ("llava", "llava_next"):
            # LlavaConfig's default tower: CLIP ViT-L/14 at 336.
            vision_d = d.get("vision_config") or {}
            vision_d = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                        "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16,
                        **vision_d}  # fmt: skip
            vision = VisionConfig.from_hf(vision_d, f"{source} vision_config")
            layers = d.get("vision_feature_layer", -2)
            layers = (int(layers),) if isinstance(layers, int) else tuple(int(i) for i in layers)
            for i in layers:
                if not -(vision.num_layers + 1) <= i <= vision.num_layers:
                    raise ConfigError(
                        f"{source}: vision_feature_layer {i} is out of range for {vision.num_layers} vision layers"
                    )
            strategy = d.get("vision_feature_select_strategy", "default")
            if strategy not in ("default", "full"):
                raise ConfigError(f"{source}: vision_feature_select_strategy {strategy!r}; expected 'default' or 'full'")
            act = d.get("projector_hidden_act", "gelu")
            if act not in ACTIVATIONS:
                raise ConfigError(f"{source}: projector_hidden_act {act!r} is not supported; expected one of {ACTIVATIONS}")
            connector = ConnectorConfig(
                "mlp2x_gelu", vision.hidden_size * len(layers), text.hidden_size, act=act,
                bias=bool(d.get("multimodal_projector_bias", True)),
            )  # fmt: skip
            pinpoints: tuple = ()
            if model_type == "llava_next":
                raw = d.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
                pinpoints = tuple((int(h), int(w)) for h, w in raw)
            # A VLM ties by its top-level flag; LlavaConfig alone also honours a text_config's flag
            # (older files saved it there). The decision is kept in one place: the text config.
            tie = bool(d.get("tie_word_embeddings", False)) or (model_type == "llava" and text.tie_word_embeddings)
            return cls(
                model_type=model_type, text=replace(text, tie_word_embeddings=tie), vision=vision,
                connector=connector, image_token_id=int(d.get("image_token_index", d.get("image_token_id", 32000))),
                feature_layers=layers, drop_cls=strategy == "default",
                image_grid_pinpoints=pinpoints, dtype=d.get("dtype") or d.get("torch_dtype"),
            )  # fmt: skip
        if model_type == "idefics3":
            vision = VisionConfig.from_hf({"model_type": "idefics3_vision", **(d.get("vision_config") or {})},
                                          f"{source} vision_config")  # fmt: skip
            scale = int(d.get("scale_factor", 2))
            if vision.grid % scale:
                raise ConfigError(f"{source}: scale_factor {scale} does not divide the {vision.grid}-patch grid")
            connector = ConnectorConfig(
                "pixel_shuffle", vision.hidden_size * scale**2, text.hidden_size, bias=False, scale_factor=scale
            )
            text = replace(text, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
            return cls(
                model_type=model_type, text=text, vision=vision, connector=connector,
                image_token_id=int(d.get("image_token_id", 128257)), feature_layers=None, drop_cls=False,
                dtype=d.get("dtype") or d.get("torch_dtype"),
            )  # fmt: skip
        if model_type == "llama3v":
            return _llama3v_config(d, source)
        raise ConfigError(f"{source}: {model_type!r} is not a vision-language model_type minivlm knows")


# MiniCPM-Llama3-V 2.5's vision tower (SigLIP so400m/14 as transformers' Idefics2VisionConfig),
# which llama3v's config.json leaves out: it names only `patch_size`.
LLAMA3V_VISION = dict(model_type="idefics3_vision", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16, image_size=980, patch_size=14)  # fmt: skip
LLAMA3V_UNK_ID = 128002  # `<unk>` in llama3v's Llama-3 vocabulary: the placeholder the image features replace
LLAMA3V_EOT_ID = 128009  # `<|eot_id|>`: MiniCPM-Llama3-V ends its turns with it as well as with <|end_of_text|>


def _llama3v_config(d: dict[str, Any], source: str) -> VLMConfig:
    """llama3v keeps the Llama-3 decoder's fields at the top level of config.json, beside
    `query_num`, `image_size` (the slicing scale), `patch_size` and `slice_mode`. A `vision_config`
    dict, if present, overrides the tower's defaults (tests use it for tiny towers)."""
    text = TextConfig.from_hf({**d, "model_type": "llama"}, source)
    if d.get("eos_token_id") is None or isinstance(d["eos_token_id"], int):
        eos = tuple(text.eos_token_id) + ((LLAMA3V_EOT_ID,) if text.vocab_size > LLAMA3V_EOT_ID else ())
        text = replace(text, eos_token_id=eos)
    vision_d = {**LLAMA3V_VISION, "patch_size": d.get("patch_size", 14), **(d.get("vision_config") or {})}
    vision = VisionConfig.from_hf({**vision_d, "model_type": "idefics3_vision"}, f"{source} vision_config")
    # MiniCPM-V gives its resampler one head per 128 channels of the decoder's width.
    heads = text.hidden_size // 128
    if heads < 1 or text.hidden_size % 128:
        raise ConfigError(f"{source}: hidden_size {text.hidden_size} is not a multiple of 128, the resampler's head width")
    queries = d.get("query_num", 96)
    if not isinstance(queries, int) or queries < 1:
        raise ConfigError(f"{source}: query_num {queries!r}; expected a positive integer")
    connector = ConnectorConfig("resampler", vision.hidden_size, text.hidden_size, num_queries=queries, num_heads=heads)
    return VLMConfig(
        model_type="llama3v", text=text, vision=vision, connector=connector,
        image_token_id=int(d.get("image_token_id", LLAMA3V_UNK_ID)), feature_layers=None, drop_cls=False,
        dtype=d.get("dtype") or d.get("torch_dtype"),
    )  # fmt: skip


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder as a dict, with errors that name the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json in the checkpoint folder {folder}")
    return read_json(path, ConfigError)
