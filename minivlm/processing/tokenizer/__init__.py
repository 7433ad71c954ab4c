"""Tokenizers read from a checkpoint's own files, giving transformers' ids without transformers.

base.py           added tokens, special ids around a sequence, decoding, streaming
bpe.py            tokenizers' BPE model step for step: the exact reference for every BPE vocabulary
bytelevel.py      byte-level BPE from tokenizer.json (Llama-3, Qwen2, SmolLM2), tiktoken where provably equal
sentencepiece.py  LlamaTokenizer's SentencePiece pipeline (Llama-2, Mistral), the sentencepiece library merging
loader.py         which file and which pipeline a checkpoint folder asks for
"""

from .base import AddedToken, StreamDecoder, Tokenizer, TokenizerError
from .bytelevel import BPETokenizer
from .loader import load_tokenizer
from .sentencepiece import SentencePieceTokenizer

__all__ = [
    "AddedToken",
    "BPETokenizer",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
]
