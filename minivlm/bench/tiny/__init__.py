"""A complete tiny checkpoint folder of every family at the real image geometry.

The folders hold what a hub repository holds: tokenizer, processor settings, chat template,
generation config and random weights in the hub's key layout. Widths and depths are tiny, so a
forward pass takes a moment on a CPU, but image sizes, patch sizes, tile grids, NeXT's pinpoints
and llama3v's slicing are the real ones: the image-token counts are the real counts.

Used by the tests (the parity tests, the README's recipes, the real-vocabulary tests) and by the
notebooks when weights/ holds no real checkpoint. Built with transformers (the test extra), like
every test checkpoint; the parts are in this package:
- models.py: the tiny configs, random weights, and saving in the hub's layout;
- vocab.py: tokenizers trained here in seconds with each family's pipeline;
- processors.py: transformers' processors of each family, with its real image sizes;
- llama3v.py: llama3v, which transformers has no class for, from reference parts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

try:
    import transformers
except ImportError:
    raise ImportError(
        'minivlm.bench.tiny builds its checkpoints with transformers: pip install "minivlm[test]"'
    ) from None

from .llama3v import llama3v_checkpoint
from .models import CLIP, SIGLIP, randomize_, save_checkpoint
from .processors import PROCESSORS
from .vocab import SPECIALS, build_llava15, train_bpe

transformers.utils.logging.disable_progress_bar()  # save_pretrained's bar would fill notebook outputs

CLIP_L = dict(CLIP, image_size=336)  # the tests' tiny CLIP (head_dim 64) on CLIP-L-336's 577 tokens
SIGLIP_384 = dict(SIGLIP, image_size=384)  # the tests' tiny SigLIP (head_dim 72) on so400m's 729 tokens
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's

# family -> (its tokenizer, its processor in processors.py)
TINY_FAMILIES = {
    "llava-1.5": ("sentencepiece", "llava15"),
    "llava-next": ("qwen2", "next"),
    "llava-interleave": ("qwen2", "interleave"),
    "idefics3": ("smollm2", "idefics3"),
    "llama3v": ("llama3v", None),
    "qwen2-text": ("qwen2", None),  # a text-only decoder
}


def _text_config(tok, **extra) -> dict:
    """The tiny decoder's sizes; `extra` adds to them or changes them."""
    sizes = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return {**sizes, **extra}


def vlm_config(family: str, tok, text: dict | None = None) -> transformers.PretrainedConfig:
    """text: sizes of the decoder to change (tensor parallelism's tests need heads that 4 divides)."""
    image = tok.convert_tokens_to_ids("<image>")

    def text_config(tok, **extra) -> dict:
        return _text_config(tok, **{**extra, **(text or {})})

    if family == "llava-1.5":
        return transformers.LlavaConfig(
            vision_config=CLIP_L,
            text_config=dict(model_type="llama", **text_config(tok)),
            image_token_index=image,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if family == "llava-next":
        return transformers.LlavaNextConfig(
            vision_config=CLIP_L,
            text_config=dict(model_type="mistral", **text_config(tok)),
            image_token_index=image,
            image_grid_pinpoints=NEXT_PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if family == "llava-interleave":
        return transformers.LlavaConfig(
            vision_config=SIGLIP_384,
            text_config=dict(model_type="qwen2", tie_word_embeddings=True, **text_config(tok)),
            image_token_index=image,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    if family == "idefics3":  # Idefics3-8B's 364-pixel tiles of 26x26 patches, shuffled by 2: 169 tokens a tile
        vision = dict(
            hidden_size=128,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=364,
            patch_size=14,
        )
        # 4096 positions: a 17-tile photo takes 2,873 image tokens
        decoder = dict(model_type="llama", **text_config(tok, max_position_embeddings=4096))
        return transformers.Idefics3Config(
            vision_config=vision, text_config=decoder, image_token_id=image, scale_factor=2
        )
    raise ValueError(f"unknown family {family!r}; expected one of {sorted(TINY_FAMILIES)}")


def real_tokenizer(family: str, source: Path, folder: Path) -> None:
    """The real vocabulary in `source` (a tokenizer folder, such as tests/real_files.py fetches) as
    `family`'s tokenizer: its files copied, then the family's image tokens added by transformers, as
    the checkpoint's authors did."""
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (source / name).is_file():
            (folder / name).write_bytes((source / name).read_bytes())
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    specials = {"llava-1.5": ["<image>", "<pad>"], "idefics3": SPECIALS["smollm2"][3:]}.get(
        family, ["<image>", "<video>"]
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.save_pretrained(folder)


def tiny_checkpoint(family: str, folder: str | Path, vocabulary: Path | None = None, text: dict | None = None) -> Path:
    """Write the tiny checkpoint of `family` into `folder` and return the folder; with the real
    `vocabulary` folder (a real tokenizer: tests/real_files.py fetches them) as its tokenizer when
    given, else one trained here (vocab.py). text: decoder sizes to change (not for llama3v)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny checkpoint of {family!r}; there are {sorted(TINY_FAMILIES)}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        # an earlier build's files (its tokenizer.json beside a new tokenizer.model) would mix in
        raise FileExistsError(f"{folder} is not empty: a tiny checkpoint is built into a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, processor = TINY_FAMILIES[family]
    if family == "llama3v" and vocabulary is not None:
        raise ValueError("the tiny llama3v checkpoint trains its own Llama-3-style vocabulary; it takes no vocabulary")
    if family == "llama3v":  # 448-pixel slices, MiniCPM-V's 70x70 position grid and 96 queries
        vision = dict(
            hidden_size=144,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=980,
            patch_size=14,
        )
        llama3v_checkpoint(folder, image_size=448, vision=vision, queries=96)
        return folder
    if vocabulary is not None:
        real_tokenizer(family, Path(vocabulary), folder)
    elif tokenizer == "sentencepiece":
        build_llava15(folder)
    else:
        train_bpe(tokenizer, folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or "<|endoftext|>"
    torch.manual_seed(0)
    if family == "qwen2-text":
        config = transformers.Qwen2Config(**_text_config(tok, **(text or {})))
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    else:
        processor = PROCESSORS[processor](tok)
        if family == "idefics3":  # Idefics3-8B resizes the longest side to 4 x 364: up to 4x4 tiles
            processor.image_processor.size = {"longest_edge": 4 * 364}
        processor.save_pretrained(folder)
        config = vlm_config(family, tok, text)
        model = transformers.AutoModelForImageTextToText.from_config(config, attn_implementation="eager")
    save_checkpoint(randomize_(model).eval(), folder, layout="hub")
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder
