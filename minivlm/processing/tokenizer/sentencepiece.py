"""SentencePiece tokenizers (Llama-2, Vicuna, Mistral) as transformers 5's LlamaTokenizer runs them.

transformers does not run SentencePiece's own encoder: it turns the pieces of a tokenizer.model into
a BPE vocabulary (every split of a piece into two pieces is a merge, ranked by the id of the merged
piece, then by the length of the left part: `generate_merges`), and runs tokenizers' BPE with byte
fallback and no unknown token, whatever the model's type (a unigram model too). Around the merges:
spaces become "▁", one "▁" goes in front of the text (of the first segment only, unless the
checkpoint asks for the legacy rule of every segment), and the whole segment is one BPE word. A
character that has no piece is spelled as its UTF-8 bytes `<0xNN>` when the model has byte pieces,
and is dropped when it has none (no unknown id: transformers gives none there).

So the sentencepiece library reads the tokenizer.model (pieces and their types) but does not merge:
its encoder ranks merges by the pieces' scores, and real models score pieces against their ids
(Mistral's "▁" and "▁▁" both score -1e9), so it splits "  leading" as "▁" "▁leading" where
transformers gives "▁▁" "leading". The merges are `bpe.BPE`, the exact reference. It is fast because
the segment is cut into words before every "▁" that follows another character: when no piece holds
a character followed by "▁" (true of every real model seen), no merge can cross such a cut, so each
word merges alone, and each word's ids are cached. (Characters the model drops go first: "▁😀▁"
becomes "▁▁", which merges.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sentencepiece

from ..files import open_regular
from .base import AddedToken, Tokenizer, TokenizerError, added_token, post_processor_ids
from .bpe import BPE

SPACE = "\u2581"  # "▁", SentencePiece's stand-in for a space
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # SentencePiece piece types (sentencepiece_model.proto)
WORD_START = re.compile(r"(?<=[^\u2581])(?=\u2581)")  # before a "▁" that follows another character


class SentencePieceTokenizer(Tokenizer):
    strip_first_space = True
    padding_side = "left"  # LlamaTokenizer's class default

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        added: dict[int, AddedToken],
        config: dict[str, Any],
        post_processor: dict | None,
        source: str,
    ):
        self.pieces = {i: p for p, i in vocab.items()}
        self.byte_of = {
            i: int(m.group(1), 16) for p, i in vocab.items() if (m := BYTE_PIECE.fullmatch(p)) and i not in added
        }
        # transformers' LlamaTokenizer: BPE(byte_fallback=True, fuse_unk=True) and no unknown token.
        self.bpe = BPE(vocab, merges, byte_fallback=True, fuse_unk=True, source=source)
        # Cut before a "▁" that follows another character, unless some piece spans such a place.
        self.cut = None if any(WORD_START.search(p) for p in vocab) else WORD_START
        self.drops_characters = None in self.bpe.byte_ids  # without every byte piece, a character may have no token
        token_to_id = {**vocab, **{t.content: t.id for t in added.values()}}
        # transformers: add_prefix_space (default on) puts "▁" in front; legacy=false does it only
        # for the segment that starts the text, not after every added token.
        if config.get("add_prefix_space", True) is False:
            self.prepend = "never"
        else:
            self.prepend = "always" if config.get("legacy") else "first"
        self.strip_first_space = self.prepend != "never"
        if post_processor is None:
            # A tokenizer.model: the config's flags rule (transformers' default for both is off).
            # A tokenizer.json's post-processor rules over them, as in transformers.
            bos, eos = token_name(config.get("bos_token", "<s>")), token_name(config.get("eos_token", "</s>"))
            prefix = [token_to_id[bos]] if config.get("add_bos_token") and bos in token_to_id else []
            suffix = [token_to_id[eos]] if config.get("add_eos_token") and eos in token_to_id else []
        else:
            prefix, suffix = post_processor_ids(post_processor, token_to_id, source)
        super().__init__(added, token_to_id, prefix, suffix)

    @property
    def fast_path(self) -> str:
        return "words" if self.cut is not None else "exact"

    @classmethod
    def from_model(cls, path: Path, config: dict[str, Any]) -> "SentencePieceTokenizer":
        """From a tokenizer.model, read by the sentencepiece library."""
        with open_regular(Path(path), TokenizerError) as f:  # a FIFO by that name must not block
            data = f.read()
        if not data:
            raise TokenizerError(f"{path}: not a SentencePiece model (the file is empty)")
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path}: not a readable SentencePiece model ({' '.join(str(e).split())})") from None
        pieces = [processor.IdToPiece(i) for i in range(processor.GetPieceSize())]
        vocab = {piece: i for i, piece in enumerate(pieces)}
        # The unknown piece (<unk>) and control pieces (<s>, </s>) are special added tokens, matched
        # whole in the text as transformers matches them; user-defined pieces plain added ones.
        kinds = piece_types(data)
        added = {
            i: AddedToken(i, piece, kinds[i] != USER_DEFINED)
            for i, piece in enumerate(pieces)
            if kinds[i] in (UNKNOWN, CONTROL, USER_DEFINED)
        }
        added.update(config_added_tokens(config, vocab))
        return cls(vocab, generate_merges(vocab), added, config, None, str(path))

    @classmethod
    def from_json(
        cls, spec: dict[str, Any], added: dict[int, AddedToken], config: dict[str, Any], source: str
    ) -> "SentencePieceTokenizer":
        """From the vocab and merges of a SentencePiece-style tokenizer.json. Its normalizer and
        pre-tokenizer are not read: transformers 5's LlamaTokenizer replaces them by its own."""
        model = spec["model"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
        added = {**added, **config_added_tokens(config, model["vocab"])}
        return cls(dict(model["vocab"]), merges, added, config, spec.get("post_processor"), source)

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        text = text.replace(" ", SPACE)
        if (self.prepend == "always" or (self.prepend == "first" and at_start)) and not text.startswith(SPACE):
            text = SPACE + text
        if self.cut is None:
            return self.bpe.merge(self.bpe.symbols(text))  # one word: too long and too rare to cache
        if self.drops_characters:  # gone before the cut, so that the "▁"s around a dropped one may merge
            text = "".join(ch for ch in text if self.bpe.symbols(ch))
        return [i for word in self.cut.split(text) if word for i in self.bpe.encode_word(word)]

    def token_bytes(self, i: int) -> bytes:
        token = self.added.get(i)
        if token is not None:
            return token.content.replace(SPACE, " ").encode()
        if i in self.byte_of:
            return bytes([self.byte_of[i]])
        return self.pieces[i].replace(SPACE, " ").encode() if i in self.pieces else b""

    def _decode_tokens(self, ids: list[int]) -> str:
        """transformers' decoder chain: "▁" -> " ", runs of byte pieces joined as UTF-8 (one U+FFFD
        per byte of a run that is not valid UTF-8), then one leading space stripped."""
        parts, run = [], bytearray()
        for i in ids:
            if i in self.byte_of:
                run.append(self.byte_of[i])
                continue
            parts.append(_utf8_or_replacement(run))
            run = bytearray()
            piece = self.added[i].content if i in self.added else self.pieces.get(i, "")
            parts.append(piece.replace(SPACE, " "))
        parts.append(_utf8_or_replacement(run))
        text = "".join(parts)
        return text[1:] if self.strip_first_space and text.startswith(" ") else text


def generate_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """transformers' merge list for a tokenizer.model (tokenization_utils_base.generate_merges):
    every split l + r of a piece into two pieces, ranked by the id of l + r, then by len(l)."""
    return sorted(
        (
            (piece[:k], piece[k:])
            for piece in vocab
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ),
        key=lambda pair: (vocab[pair[0] + pair[1]], len(pair[0])),
    )


def _utf8_or_replacement(run: bytearray) -> str:
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def token_name(token) -> str:
    """A special token in tokenizer_config.json: a string or an AddedToken dict."""
    return token.get("content", "") if isinstance(token, dict) else str(token or "")


def config_added_tokens(config: dict[str, Any], vocab: dict[str, int]) -> dict[int, AddedToken]:
    """tokenizer_config.json's added_tokens_decoder (LLaVA-1.5's <image> and <pad> live only there),
    and the named special tokens that are pieces of the vocab."""
    added = {int(i): added_token(i, t) for i, t in (config.get("added_tokens_decoder") or {}).items()}
    for name in ("unk_token", "bos_token", "eos_token", "pad_token"):
        content = token_name(config.get(name))
        if content in vocab and vocab[content] not in added:
            added[vocab[content]] = AddedToken(vocab[content], content, True)
    return added


def piece_types(data: bytes) -> list[int]:
    """The type of every piece of a tokenizer.model that sentencepiece has already parsed (its Python
    API tells control and unknown pieces, not user-defined ones). ModelProto field 1 repeats
    SentencePiece {1: piece, 2: score, 3: type (default NORMAL = 1)}; this walks the protobuf wire
    format for just that."""
    return [
        next((v for f, v in _protobuf_fields(value) if f == 3), 1)
        for field, value in _protobuf_fields(data)
        if field == 1
    ]


def _protobuf_fields(data: bytes):
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""

    def varint(pos: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    pos = 0
    while pos < len(data):
        key, pos = varint(pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(pos)
        elif wire == 2:
            size, pos = varint(pos)
            value, pos = data[pos : pos + size], pos + size
        else:  # fixed 64- or 32-bit
            value, pos = data[pos : pos + (8 if wire == 1 else 4)], pos + (8 if wire == 1 else 4)
        yield field, value
