"""Each vision-language family's config.json -> a VLMConfig: one reader per family, each named in
the family's row of load.FAMILIES.

The hub's files lean on transformers' config-class defaults (LLaVA-1.5's config.json gives a
handful of text_config fields; llama3v's leaves out its whole vision tower), so each reader fills
them in as that class would. Sizes go through config.py's checks: bounded, whole, positive.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .config import ACTIVATIONS, ConfigError, ConnectorConfig, TextConfig, VisionConfig, VLMConfig, size, token_id


def _check_sub_configs(d: dict[str, Any], source: str) -> None:
    for key in ("text_config", "vision_config"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ConfigError(f"{source}: {key} is {d[key]!r:.80}; expected a JSON object")


def _vlm_text(d: dict[str, Any], source: str, **defaults: Any) -> TextConfig:
    """A VLM's text_config (transformers' default sub-config when absent), after checking that
    the sub-configs are objects; `defaults` are the VLM config class's own defaults for its decoder."""
    _check_sub_configs(d, source)
    text_d = d.get("text_config") or {"model_type": "llama"}  # transformers' default sub-config
    return TextConfig.from_hf({**defaults, **text_d}, f"{source} text_config", fill_defaults=True)


def llava_config(d: dict[str, Any], source: str) -> VLMConfig:
    """LLaVA-1.5 and LLaVA-Interleave (model_type llava); LLaVA-NeXT adds its pinpoints (below)."""
    model_type = d["model_type"]
    text = _vlm_text(d, source)
    # LlavaConfig's default tower: CLIP ViT-L/14 at 336.
    vision_d = d.get("vision_config") or {}
    vision_d = {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "patch_size": 14,
        "image_size": 336,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        **vision_d,
    }
    vision = VisionConfig.from_hf(vision_d, f"{source} vision_config")
    layers = d.get("vision_feature_layer", -2)
    layers = tuple(layers) if isinstance(layers, list) else (layers,)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -(vision.num_layers + 1) <= i <= vision.num_layers:
            raise ConfigError(
                f"{source}: vision_feature_layer {i!r} is out of range for {vision.num_layers} vision layers"
            )
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ConfigError(f"{source}: vision_feature_select_strategy {strategy!r}; expected 'default' or 'full'")
    act = d.get("projector_hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ConfigError(f"{source}: projector_hidden_act {act!r} is not supported; expected one of {ACTIVATIONS}")
    connector = ConnectorConfig(
        "mlp2x_gelu",
        vision.hidden_size * len(layers),
        text.hidden_size,
        act=act,
        bias=bool(d.get("multimodal_projector_bias", True)),
    )
    # A VLM ties by its top-level flag; LlavaConfig alone also honours a text_config's flag
    # (older files saved it there). The decision is kept in one place: the text config.
    tie = bool(d.get("tie_word_embeddings", False)) or (model_type == "llava" and text.tie_word_embeddings)
    return VLMConfig(
        model_type=model_type,
        text=replace(text, tie_word_embeddings=tie),
        vision=vision,
        connector=connector,
        image_token_id=token_id(
            d.get("image_token_index", d.get("image_token_id", 32000)), "image_token_index", source
        ),
        feature_layers=layers,
        drop_cls=strategy == "default",
        dtype=d.get("dtype") or d.get("torch_dtype"),
    )


def llava_next_config(d: dict[str, Any], source: str) -> VLMConfig:
    """LLaVA-NeXT: LLaVA's fields, and the anyres grid's (height, width) choices."""
    config = llava_config(d, source)
    raw = d.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 2 for p in raw):
        raise ConfigError(f"{source}: image_grid_pinpoints is {raw!r}; expected a list of [height, width] pairs")
    pinpoints = tuple(tuple(size(x, "image_grid_pinpoints", source) for x in p) for p in raw)
    return replace(config, image_grid_pinpoints=pinpoints)


def idefics3_config(d: dict[str, Any], source: str) -> VLMConfig:
    """Idefics3 / SmolVLM: the NaViT tower, a pixel shuffle connector."""
    text = _vlm_text(d, source, rms_norm_eps=1e-5)  # Idefics3Config's own default for its Llama
    vision = VisionConfig.from_hf(
        {"model_type": "idefics3_vision", **(d.get("vision_config") or {})}, f"{source} vision_config"
    )
    scale = size(d.get("scale_factor", 2), "scale_factor", source)
    if vision.grid % scale:
        raise ConfigError(f"{source}: scale_factor {scale} does not divide the {vision.grid}-patch grid")
    connector = ConnectorConfig(
        "pixel_shuffle", vision.hidden_size * scale**2, text.hidden_size, bias=False, scale_factor=scale
    )
    text = replace(text, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
    return VLMConfig(
        model_type=d["model_type"],
        text=text,
        vision=vision,
        connector=connector,
        image_token_id=token_id(d.get("image_token_id", 128257), "image_token_id", source),
        feature_layers=None,
        drop_cls=False,
        dtype=d.get("dtype") or d.get("torch_dtype"),
    )


# MiniCPM-Llama3-V 2.5's vision tower (SigLIP so400m/14 as transformers' Idefics2VisionConfig),
# which llama3v's config.json leaves out: it names only `patch_size`.
LLAMA3V_VISION = dict(
    model_type="idefics3_vision",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=980,
    patch_size=14,
)
LLAMA3V_UNK_ID = 128002  # `<unk>` in llama3v's Llama-3 vocabulary: the placeholder the image features replace
LLAMA3V_EOT_ID = 128009  # `<|eot_id|>`: MiniCPM-Llama3-V ends its turns with it as well as with <|end_of_text|>


def llama3v_config(d: dict[str, Any], source: str) -> VLMConfig:
    """llama3v keeps the Llama-3 decoder's fields at the top level of config.json, beside
    `query_num`, `image_size` (the slicing scale), `patch_size` and `slice_mode`. A `vision_config`
    dict, if present, overrides the tower's defaults (tests use it for tiny towers)."""
    _check_sub_configs(d, source)
    text = TextConfig.from_hf({**d, "model_type": "llama"}, source)
    if d.get("eos_token_id") is None or isinstance(d["eos_token_id"], int):
        eos = tuple(text.eos_token_id) + ((LLAMA3V_EOT_ID,) if text.vocab_size > LLAMA3V_EOT_ID else ())
        text = replace(text, eos_token_id=eos)
    vision_d = {**LLAMA3V_VISION, "patch_size": d.get("patch_size", 14), **(d.get("vision_config") or {})}
    vision = VisionConfig.from_hf({**vision_d, "model_type": "idefics3_vision"}, f"{source} vision_config")
    # MiniCPM-V gives its resampler one head per 128 channels of the decoder's width.
    heads = text.hidden_size // 128
    if heads < 1 or text.hidden_size % 128:
        raise ConfigError(
            f"{source}: hidden_size {text.hidden_size} is not a multiple of 128, the resampler's head width"
        )
    queries = size(d.get("query_num", 96), "query_num", source)
    connector = ConnectorConfig("resampler", vision.hidden_size, text.hidden_size, num_queries=queries, num_heads=heads)
    return VLMConfig(
        model_type="llama3v",
        text=text,
        vision=vision,
        connector=connector,
        image_token_id=token_id(d.get("image_token_id", LLAMA3V_UNK_ID), "image_token_id", source),
        feature_layers=None,
        drop_cls=False,
        dtype=d.get("dtype") or d.get("torch_dtype"),
    )
