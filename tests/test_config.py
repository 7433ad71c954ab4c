"""config.json in both dialects (hub / transformers 5) -> the same TextConfig, equal to what transformers reads."""

from __future__ import annotations

import json

import pytest
import transformers

from minivlm.bench.tiny.models import TEXT_CONFIGS, build_text_model, hub_config
from minivlm.config import TextConfig
from minivlm.load import config_from_hf


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_both_dialects_give_one_config(name, tmp_path):
    hf = build_text_model(name)
    hf.save_pretrained(tmp_path)
    v5 = json.loads((tmp_path / "config.json").read_text())
    ours_v5 = TextConfig.from_hf(v5)
    ours_hub = TextConfig.from_hf(hub_config(v5))
    assert ours_v5 == ours_hub

    c = hf.config
    assert ours_v5.head_dim == hf.model.layers[0].self_attn.head_dim  # Qwen2Config has no head_dim field
    assert ours_v5.num_kv_heads == c.num_key_value_heads
    assert ours_v5.tie_word_embeddings == c.tie_word_embeddings
    assert ours_v5.rope.theta == c.rope_parameters["rope_theta"]
    assert ours_v5.rope.kind == c.rope_parameters["rope_type"]
    # Which layers slide, and by how much, as transformers' attention modules see it.
    windows = tuple(getattr(layer.self_attn, "sliding_window", None) for layer in hf.model.layers)
    if c.model_type == "mistral":
        windows = (c.sliding_window,) * c.num_hidden_layers  # Mistral slides in every layer
    assert ours_v5.sliding_windows == windows


def test_qwen2_window_is_off_unless_switched_on():
    d = {
        "model_type": "qwen2",
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "sliding_window": 32768,
        "max_window_layers": 1,
        "use_sliding_window": False,
    }
    assert TextConfig.from_hf(d).sliding_windows == (None, None, None)
    assert TextConfig.from_hf({**d, "use_sliding_window": True}).sliding_windows == (None, 32768, 32768)


def test_old_rope_scaling_key_type_is_read():
    # Llama-3.1 configs written by transformers 4.43 used "type" before "rope_type".
    d = {
        "model_type": "llama",
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    rope = TextConfig.from_hf(d).rope
    assert (rope.kind, rope.factor, rope.original_max_positions) == ("llama3", 8.0, 8192)


def test_text_defaults_are_transformers_defaults():
    from minivlm.config import TEXT_DEFAULTS

    for model_type, defaults in TEXT_DEFAULTS.items():
        hf = transformers.AutoConfig.for_model(model_type)
        for key, value in defaults.items():
            assert getattr(hf, key) == value, (model_type, key)


def test_vision_defaults_are_transformers_defaults():
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    from minivlm.config import VISION_FAMILIES

    classes = {
        "clip_vision_model": transformers.CLIPVisionConfig,
        "siglip_vision_model": transformers.SiglipVisionConfig,
        "idefics3_vision": Idefics3VisionConfig,
    }
    for model_type, family in VISION_FAMILIES.items():
        hf = classes[model_type]()
        for key, value in family["defaults"].items():
            assert getattr(hf, key) == value, (model_type, key)


def test_minimal_hub_llava_config_resolves_as_transformers_does():
    # llava-hf/llava-1.5-7b-hf's config.json gives only these fields; the rest are class defaults.
    d = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }
    ours = config_from_hf(d)
    hf = transformers.LlavaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "torch_dtype")})
    t, v = hf.text_config, hf.vision_config
    assert (ours.text.hidden_size, ours.text.num_layers, ours.text.num_heads, ours.text.num_kv_heads) == (
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_key_value_heads,
    )
    assert (ours.text.intermediate_size, ours.text.vocab_size, ours.text.rms_norm_eps) == (
        t.intermediate_size,
        t.vocab_size,
        t.rms_norm_eps,
    )
    assert (ours.vision.hidden_act, ours.vision.layer_norm_eps, ours.vision.grid) == (
        v.hidden_act,
        v.layer_norm_eps,
        v.image_size // v.patch_size,
    )
    assert ours.image_token_id == hf.image_token_id and ours.feature_layers == (hf.vision_feature_layer,)
    assert ours.connector.in_dim == v.hidden_size and ours.connector.out_dim == t.hidden_size
