"""config.json in both dialects (hub / transformers 5) -> the same TextConfig, equal to what transformers reads."""

from __future__ import annotations

import json

import pytest
from checkpoints import TEXT_CONFIGS, build_text_model, hub_config

from minivlm.config import TextConfig


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
    d = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 3,
         "num_attention_heads": 2, "sliding_window": 32768, "max_window_layers": 1, "use_sliding_window": False}  # fmt: skip
    assert TextConfig.from_hf(d).sliding_windows == (None, None, None)
    assert TextConfig.from_hf({**d, "use_sliding_window": True}).sliding_windows == (None, 32768, 32768)


def test_old_rope_scaling_key_type_is_read():
    # Llama-3.1 configs written by transformers 4.43 used "type" before "rope_type".
    d = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "rope_theta": 500000.0, "max_position_embeddings": 131072,
         "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}}  # fmt: skip
    rope = TextConfig.from_hf(d).rope
    assert (rope.kind, rope.factor, rope.original_max_positions) == ("llama3", 8.0, 8192)
