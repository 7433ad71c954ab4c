"""A checkpoint folder's tokenizer: which file, which pipeline.

transformers reads tokenizer.json when there is one and tokenizer.model otherwise; tokenizer_config.json
adds the rest (added tokens, BOS/EOS flags, the SentencePiece prefix rules, the chat template).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..files import read_json
from .base import Tokenizer, TokenizerError, added_token
from .bytelevel import BPETokenizer
from .sentencepiece import SentencePieceTokenizer

# The tokenizer classes whose SentencePiece pipeline SentencePieceTokenizer reproduces.
LLAMA_TOKENIZER_CLASSES = {None, "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}

# Qwen2Tokenizer's pre-tokenizer pattern (transformers' models/qwen2/tokenization_qwen2.py).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def byte_level_pipeline(spec: dict, config: dict) -> dict:
    """tokenizer.json as transformers 5 runs it. A tokenizer class with a constructor of its own
    keeps only the file's vocab, merges and post-processor, and sets the rest itself: the
    GPT2Tokenizer that SmolLM2 and SmolVLM name runs plain GPT-2 pre-tokenization (no digit
    split, whatever the file says), Qwen2Tokenizer its NFC and pattern; both a BPE with no
    unknown token and no ignore_merges. Any other class (PreTrainedTokenizerFast, TokenizersBackend,
    LlamaTokenizerFast over a byte-level file, a name transformers lacks) runs the file as written."""
    name = (config.get("tokenizer_class") or "").removesuffix("Fast")
    model = {**spec["model"], "ignore_merges": False, "unk_token": None, "fuse_unk": False}
    if name == "GPT2Tokenizer":
        pre = {"type": "ByteLevel", "add_prefix_space": bool(config.get("add_prefix_space")), "use_regex": True}
        return {**spec, "model": model, "normalizer": None, "pre_tokenizer": pre}
    if name == "Qwen2Tokenizer":
        pre = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": bool(config.get("add_prefix_space")), "use_regex": False},
            ],
        }
        return {**spec, "model": model, "normalizer": {"type": "NFC"}, "pre_tokenizer": pre}
    return spec


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder: tokenizer.json where there is one (what transformers
    reads first), else a SentencePiece tokenizer.model; tokenizer_config.json for the rest."""
    folder = Path(folder)
    config = read_json(folder / "tokenizer_config.json", TokenizerError)  # {} when absent
    path, model_path = folder / "tokenizer.json", folder / "tokenizer.model"
    # exists(), not is_file(): a FIFO or folder by these names is refused by name when read, not skipped
    if not path.exists() and not model_path.exists():
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")
    source = path if path.exists() else model_path
    try:
        return _load(path, model_path, config)
    except TokenizerError as e:
        raise e if str(source) in str(e) else TokenizerError(f"{source}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # a field of the wrong shape
        raise TokenizerError(f"{source}: not a tokenizer file minivlm can read ({type(e).__name__}: {e})") from None


def _load(path: Path, model_path: Path, config: dict) -> Tokenizer:
    if path.exists():
        spec = read_json(path, TokenizerError)
        model = spec.get("model") or {}
        added = {t["id"]: added_token(t["id"], t) for t in spec.get("added_tokens") or []}
        if model.get("type") == "BPE" and (
            model.get("byte_fallback") or "Metaspace" in json.dumps(spec.get("pre_tokenizer"))
        ):
            _check_llama_class(config, path)
            return SentencePieceTokenizer.from_json(spec, added, config, str(path))
        return BPETokenizer(byte_level_pipeline(spec, config), added, str(path))
    _check_llama_class(config, model_path)
    return SentencePieceTokenizer.from_model(model_path, config)


def _check_llama_class(config: dict, path: Path) -> None:
    name = config.get("tokenizer_class")
    if not isinstance(name, (str, type(None))) or name not in LLAMA_TOKENIZER_CLASSES:
        raise TokenizerError(
            f"{path}: a SentencePiece tokenizer of class {name!r}; minivlm reproduces LlamaTokenizer's pipeline "
            "(Llama-2, Vicuna, Mistral) only"
        )
