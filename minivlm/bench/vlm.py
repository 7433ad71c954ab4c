"""`python -m minivlm bench vlm`: the vision tower alone and a whole image + prompt forward pass of
a random-weight LLaVA-Interleave model, minivlm against transformers on the same weights and
inputs: the time of each and the speed-up, then how far apart the two sets of logits are.

`VLM_PRESETS` and `vlm_pair` (the checkpoint, loaded by both) serve `bench generate` too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from ..load import load_model
from .timing import time_call, transformers_or_exit

# LLaVA-Interleave configurations for `bench vlm`: "interleave-0.5b" is the real
# llava-hf/llava-interleave-qwen-0.5b-hf (SigLIP so400m with 26 layers, Qwen1.5-0.5B), random
# weights; "small" keeps its shapes (729 patches, head_dim 72 and 64) at a size a CPU runs in seconds.
VLM_PRESETS = {
    "interleave-0.5b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
        text=dict(vocab_size=151646, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16),
    ),
    # The decoder's weights (3 MB) stay in the CPU's cache: a decode step's time is mostly each
    # loop's own overhead, which is what this preset measures.
    "tiny": dict(
        vision=dict(hidden_size=144, intermediate_size=288, num_hidden_layers=2, num_attention_heads=2),
        text=dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    ),
    "small": dict(
        vision=dict(hidden_size=288, intermediate_size=1152, num_hidden_layers=6, num_attention_heads=4),
        text=dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=8),
    ),
    # SigLIP so400m + Llama-3 8B's decoder (GQA 32/8, 128k vocab): an 8B family member for CUDA.
    "llama3-8b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
        text=dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                  tie_word_embeddings=False),
    ),
}  # fmt: skip


def write_preset(preset_name: str, dtype_name: str, folder: Path):
    """The preset as a random-weight LLaVA checkpoint written to `folder` by transformers; its config."""
    transformers = transformers_or_exit()
    preset = VLM_PRESETS[preset_name]
    text = {"model_type": "qwen2", "tie_word_embeddings": True, "rope_theta": 1000000.0, **preset["text"]}
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=384, patch_size=14, **preset["vision"]),
        text_config=text,
        image_token_index=preset["text"]["vocab_size"] - 1,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    with torch.device("meta"):  # no fp32 copy of an 8B model in host memory: random values come below
        model = transformers.LlavaForConditionalGeneration(config)
    model.to_empty(device="cpu").to(getattr(torch, dtype_name))
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.tie_weights()
    model.save_pretrained(folder)
    return config


def vlm_pair(args: argparse.Namespace):
    """The preset as a random-weight LLaVA checkpoint, loaded by minivlm and by transformers."""
    transformers = transformers_or_exit()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        config = write_preset(args.preset, args.dtype, Path(tmp))
        ours = load_model(tmp, dtype=dtype, device=args.device)
        theirs = transformers.LlavaForConditionalGeneration.from_pretrained(
            tmp, dtype=dtype, attn_implementation=args.attn
        ).to(args.device)
    theirs.eval()
    params = sum(p.numel() for p in ours.parameters())
    print(
        f"LLaVA '{args.preset}': {params / 1e6:.0f}M parameters, {args.dtype} on {args.device}; "
        f"transformers {transformers.__version__} ({args.attn} attention), torch {torch.__version__}"
    )
    return ours, theirs, config


def bench_vlm(args: argparse.Namespace) -> None:
    ours, theirs, config = vlm_pair(args)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, 384, 384, generator=g).to(args.device, dtype)
    text = torch.randint(0, 1000, (args.text_tokens,), generator=g)
    image = torch.full((729,), config.image_token_id)
    ids = torch.cat([text[:4]] + [image] * args.images + [text[4:]])[None].to(args.device)

    rows = [
        (
            "vision tower",
            lambda: ours.vision_tower(pixels, layers=(-1,)),
            lambda: theirs.model.vision_tower(pixels, output_hidden_states=-1),
        ),
        (
            f"forward {args.images} image(s) + {args.text_tokens} text tokens ({ids.shape[1]} total)",
            lambda: ours(ids, pixel_values=pixels),
            lambda: theirs(input_ids=ids, pixel_values=pixels),
        ),
    ]
    print(f"{'':<52}{'minivlm s':>11}{'transformers s':>16}{'speed-up':>10}")
    for name, fn_ours, fn_theirs in rows:
        t_ours, t_theirs = (
            time_call(fn_ours, args.repeats, args.device),
            time_call(fn_theirs, args.repeats, args.device),
        )
        print(f"{name:<52}{t_ours:>11.4f}{t_theirs:>16.4f}{t_theirs / t_ours:>10.2f}")
    with torch.inference_mode():
        a, b = ours(ids, pixel_values=pixels).float(), theirs(input_ids=ids, pixel_values=pixels).logits.float()
    print(f"max |logit diff| / max |logit|: {((a - b).abs().max() / b.abs().max()).item():.1e}")
