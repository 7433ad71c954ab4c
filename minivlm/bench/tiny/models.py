"""Tiny random-weight checkpoints, built with transformers and saved as the hub stores them.

Every test builds its own: nothing is downloaded. `save_pretrained` writes transformers 5's layout;
`save_checkpoint(..., layout="hub")` rewrites a saved folder into what users download from the hub
(config dialect, key names, extra buffers, shards with an index).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

# Tiny configs of each text family. Sizes keep the shapes that matter: head_dim 64/72/80, GQA,
# head_dim unrelated to hidden/heads (Mistral), biases (Qwen2), tied embeddings, sliding windows.
TEXT_CONFIGS = {
    "llama": dict(
        cls="LlamaConfig", vocab_size=211, hidden_size=128, intermediate_size=200, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=10000.0,
    ),
    "llama3": dict(  # Llama-3.1 rope scaling; a small original context puts frequencies in all three bands
        cls="LlamaConfig", vocab_size=211, hidden_size=128, intermediate_size=200, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ),
    "smollm2": dict(  # SmolLM2: a llama with tied embeddings and attention biases off
        cls="LlamaConfig", vocab_size=211, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=100000.0,
    ),
    "mistral": dict(  # head_dim 80 with hidden 128; a window shorter than the test prompts
        cls="MistralConfig", vocab_size=211, hidden_size=128, intermediate_size=200, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=80, sliding_window=5,
    ),
    "qwen2": dict(  # Qwen1.5-0.5B's shape family: q/k/v biases, tied embeddings, head_dim 72
        cls="Qwen2Config", vocab_size=211, hidden_size=144, intermediate_size=200, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "qwen2_window": dict(  # the second layer slides, the first does not
        cls="Qwen2Config", vocab_size=211, hidden_size=128, intermediate_size=200, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        max_window_layers=1,
    ),
}  # fmt: skip


def randomize_(model):
    """Every parameter random, norm weights and biases too (their defaults, ones and zeros, would
    let a loader that drops them pass), scaled so activations stay near unit size."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def build_text_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A transformers causal LM with every parameter random, in fp32 with eager attention."""
    kwargs = dict(TEXT_CONFIGS[name])
    config_cls = getattr(transformers, kwargs.pop("cls"))
    config = config_cls(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return randomize_(model).eval()


def hub_config(d: dict) -> dict:
    """transformers 5's config.json dialect -> the hub's (rope_theta + rope_scaling, torch_dtype)."""
    d = dict(d)
    rope = dict(d.pop("rope_parameters", None) or {})
    d["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        d["rope_scaling"] = rope
    d["torch_dtype"] = d.pop("dtype", "float32")
    d.pop("layer_types", None)  # hub files predate it
    d["transformers_version"] = "4.45.0"
    return d


def save_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Write tensors as model.safetensors, or as `shards` files with model.safetensors.index.json."""
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# Tiny VLMs of each family. Vision head dims are the real ones (CLIP-L 64, SigLIP so400m 72);
# image and patch sizes are shrunk so a test runs in a second. The NeXT pinpoints are the real
# ones scaled from 336 to the 28-pixel tile.
CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=128,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)
SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=144,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=42,
    patch_size=14,
)
VLM_CONFIGS = {
    "llava": dict(cls="LlavaConfig", vision_config=CLIP, text="llama", image_token_index=200,
                  vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "llava_interleave": dict(cls="LlavaConfig", vision_config=SIGLIP, text="qwen2", image_token_index=200,
                             vision_feature_layer=-1, vision_feature_select_strategy="full"),
    "llava_multilayer": dict(cls="LlavaConfig", vision_config=CLIP, text="llama", image_token_index=200,
                             vision_feature_layer=[-3, -1], vision_feature_select_strategy="default"),
    "llava_next": dict(cls="LlavaNextConfig", vision_config=CLIP, text="mistral", image_token_index=200,
                       image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]),
    "idefics3": dict(cls="Idefics3Config", text="llama3", image_token_id=200, scale_factor=2,
                     vision_config=dict(hidden_size=128, intermediate_size=160, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=28, patch_size=7)),
    "smolvlm": dict(cls="Idefics3Config", text="smollm2", image_token_id=200, scale_factor=4, tie_word_embeddings=True,
                    vision_config=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=4)),
}  # fmt: skip


def text_config_dict(name: str) -> dict:
    kwargs = dict(TEXT_CONFIGS[name])
    return getattr(transformers, kwargs.pop("cls"))(**kwargs).to_dict()


def build_vlm_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A transformers VLM with every parameter random, fp32, eager attention everywhere."""
    kwargs = dict(VLM_CONFIGS[name])
    config_cls = getattr(transformers, kwargs.pop("cls"))
    text = text_config_dict(kwargs.pop("text"))
    config = config_cls(text_config=text, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config, attn_implementation="eager")
    return randomize_(model).eval()


def save_checkpoint(model, folder: Path, layout: str = "hub", shards: int = 1) -> Path:
    """Save a transformers model (a causal LM or a VLM) as a checkpoint folder.

    layout "v5": exactly what transformers 5's save_pretrained writes (sharded when shards > 1).
    layout "hub": as the hub's repositories hold it: the older config dialect (for a VLM, in its
    text_config), the `rotary_emb.inv_freq` buffers older Llama checkpoints carry, and for LLaVA
    the vision tower's `vision_model.` level; resharded with an index when shards > 1.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    if layout == "v5" and shards == 1:
        return folder
    tensors = read_folder_tensors(folder)
    if layout == "hub":
        config = json.loads((folder / "config.json").read_text())
        if "text_config" in config:  # a VLM
            config["text_config"] = hub_config(config["text_config"])
            config["torch_dtype"] = config.pop("dtype", "float32")
            layers = config["text_config"]["num_hidden_layers"]
            if config["model_type"] in ("llava", "llava_next"):
                tensors = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in tensors.items()}
                prefix = "language_model.model"
            else:
                prefix = "model.text_model"
        else:
            config, layers, prefix = hub_config(config), config["num_hidden_layers"], "model"
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        for i in range(layers):
            tensors[f"{prefix}.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_sharded(folder, tensors, shards)
    return folder
