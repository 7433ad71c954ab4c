"""Tokenizers read from a checkpoint's own files, without transformers or the tokenizers library.

`BPETokenizer`: byte-level BPE from `tokenizer.json` (Llama-3, Qwen2, SmolLM2, GPT-2 style), with
tiktoken doing the merges. What tokenizer.json spells as a pipeline (normalizer, pre-tokenizer
steps, added tokens, post-processor template, ByteLevel decoder) is read into the few pieces of
data each step needs.
"""

from __future__ import annotations

import codecs
import heapq
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

from .files import read_json

# GPT-2's pre-tokenizer pattern: what a ByteLevel pre-tokenizer with use_regex=true applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(ValueError):
    """A tokenizer file minivlm cannot read; the message names the file and the part."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table that byte-level vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool
    lstrip: bool = False  # the token swallows whitespace on its left
    rstrip: bool = False  # ... and on its right


class Tokenizer:
    """What every tokenizer here shares: added tokens matched in the raw text before the model sees
    it, the post-processor's special ids around a sequence, and special tokens skipped on decode.
    A subclass turns the text between added tokens into ids (`_encode_text`) and ids back into
    text (`_decode_tokens`)."""

    strip_first_space = False  # SentencePiece's decoder drops the space its encoder put in front
    padding_side = "right"  # where transformers' tokenizer class pads when the config does not say

    def __init__(self, added: dict[int, AddedToken], token_to_id: dict[str, int], prefix: list[int],
                 suffix: list[int], config: dict[str, Any]):  # fmt: skip
        self.added = added
        self.token_to_id = token_to_id
        self.prefix, self.suffix = prefix, suffix
        self._added = AddedTokenMatcher(added.values()) if added else None
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))

    @property
    def vocab_size(self) -> int:
        return max(self.token_to_id.values()) + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids: added tokens matched first, the text between them encoded by the model."""
        ids: list[int] = []
        for start, segment, added in self._split_added(text):
            if added is not None:
                ids.append(added)
            elif segment:
                ids.extend(self._encode_text(segment, at_start=start == 0))
        return self.prefix + ids + self.suffix if add_special_tokens else ids

    def _split_added(self, text: str):
        """(offset, text, None) and (offset, "", added id) pieces, left to right."""
        start = 0
        for m_start, m_end, token in self._added.finditer(text) if self._added else ():
            if m_start < start:  # inside whitespace a previous rstrip token already took
                continue
            if m_start > start:
                yield start, text[start:m_start], None
            yield m_start, "", token.id
            start = m_end
        if start < len(text):
            yield start, text[start:], None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        skip = {i for i, t in self.added.items() if t.special} if skip_special_tokens else set()
        text = self._decode_tokens([int(i) for i in ids if int(i) not in skip])
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        raise NotImplementedError

    def _decode_tokens(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, i: int) -> bytes:
        """The bytes one id stands for, for decoding a stream piece by piece."""
        raise NotImplementedError


class BPETokenizer(Tokenizer):
    """Byte-level BPE from tokenizer.json, the merges done by tiktoken."""

    def __init__(self, spec: dict[str, Any], config: dict[str, Any] | None = None, source: str = "tokenizer.json"):
        config = config or {}
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{source}: model type {model.get('type')!r}; BPETokenizer reads byte-level BPE")
        added = _added_tokens(spec)
        token_to_id = _token_to_id(model["vocab"], added)
        self.id_to_bytes: dict[int, bytes] = {}
        ranks: dict[bytes, int] = {}
        for token, i in model["vocab"].items():
            if i in added:
                continue
            try:
                raw = bytes(BYTE_OF_CHAR[c] for c in token)
            except KeyError:
                raise TokenizerError(f"{source}: vocab token {token!r} is not byte-level") from None
            ranks[raw] = i
            self.id_to_bytes[i] = raw
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise TokenizerError(f"{source}: the vocab lacks {len(missing)} of the 256 single bytes (e.g. {missing[:3]})")
        self.token_to_id = token_to_id
        self._check_merge_order(model.get("merges") or [], source)

        self.normalizer = _normalizer(spec.get("normalizer"), source)
        steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"), source)
        pattern = steps.pop() if steps and steps[-1] != "digits" else r"[\s\S]+"
        self.python_steps = steps  # steps tiktoken cannot do in its one regex: done here, in order
        self.encoding = tiktoken.Encoding(name=source, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        super().__init__(added, token_to_id, *_template(spec.get("post_processor"), token_to_id, source), config)

    def _check_merge_order(self, merges: list, source: str) -> None:
        """tiktoken merges the pair whose result has the lowest id; BPE merges by its merge list.
        They agree when the merge results' ids rise along the list, as in every vocabulary trained
        by tokenizers or converted from tiktoken. Anything else is refused rather than mis-split."""
        last = -1
        for merge in merges:
            a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
            i = self.token_to_id.get(a + b)
            if i is None or i <= last:
                raise TokenizerError(
                    f"{source}: merge {a!r} + {b!r} is out of id order; tiktoken cannot reproduce this vocabulary"
                )
            last = i

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        """Normalise, pre-tokenise, merge."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        return [i for piece in _apply_steps(text, self.python_steps) for i in self.encoding.encode_ordinary(piece)]

    def token_bytes(self, i: int) -> bytes:
        token = self.added.get(i)
        return token.content.encode() if token is not None else self.id_to_bytes[i]

    def _decode_tokens(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


SPACE = "\u2581"  # "▁", SentencePiece's stand-in for a space
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece BPE with byte fallback (Llama-2, Mistral, Vicuna), as transformers 5's
    LlamaTokenizer runs it: spaces become "▁", one "▁" goes in front of the text (of the first
    segment only, unless the checkpoint asks for the legacy rule of every segment), the whole
    segment is one BPE word, and a character outside the vocab is spelled as its UTF-8 bytes
    `<0xNN>`. Merges are ranked as transformers ranks the pieces of a tokenizer.model (see
    `from_model`) or as listed in tokenizer.json.

    This is deliberately not `sentencepiece.encode`: that one also drops extra whitespace and
    prefixes "▁" after every special token, and transformers does neither."""

    strip_first_space = True
    padding_side = "left"  # LlamaTokenizer's class default

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: dict[int, AddedToken],
                 config: dict[str, Any], post_processor: dict | None, source: str):  # fmt: skip
        missing = [b for b in range(256) if f"<0x{b:02X}>" not in vocab]
        if missing:
            raise TokenizerError(
                f"{source}: the vocab lacks {len(missing)} of the 256 byte pieces <0x00>..<0xFF>; minivlm "
                "reads SentencePiece models trained with byte_fallback (as Llama-2 and Mistral are)"
            )
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.pieces = {i: p for p, i in vocab.items()}
        self.byte_of = {i: int(m.group(1), 16) for p, i in vocab.items() if (m := BYTE_PIECE.fullmatch(p)) and i not in added}
        token_to_id = _token_to_id(vocab, added)
        # transformers: add_prefix_space (default on) puts "▁" in front; legacy=false does it only
        # for the segment that starts the text, not after every added token.
        if config.get("add_prefix_space", True) is False:
            self.prepend = "never"
        else:
            self.prepend = "always" if config.get("legacy") else "first"
        self.strip_first_space = self.prepend != "never"
        if "add_bos_token" in config or "add_eos_token" in config or post_processor is None:
            # The flags rule where given; transformers' default for both is off.
            bos, eos = _token_name(config.get("bos_token", "<s>")), _token_name(config.get("eos_token", "</s>"))
            prefix = [token_to_id[bos]] if config.get("add_bos_token") and bos in token_to_id else []
            suffix = [token_to_id[eos]] if config.get("add_eos_token") and eos in token_to_id else []
        else:
            prefix, suffix = _template(post_processor, token_to_id, source)
        super().__init__(added, token_to_id, prefix, suffix, config)

    @classmethod
    def from_model(cls, path: Path, config: dict[str, Any]) -> "SentencePieceTokenizer":
        """From a tokenizer.model. transformers ranks a merge l + r (both pieces, and l + r a piece)
        by the id of l + r, then by the length of l: the generated merge list is that order."""
        pieces = read_sentencepiece_model(path)
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = sorted(
            ((piece[:k], piece[k:]) for piece in vocab for k in range(1, len(piece))
             if piece[:k] in vocab and piece[k:] in vocab),
            key=lambda pair: (vocab[pair[0] + pair[1]], len(pair[0])),
        )  # fmt: skip
        # The unknown piece (<unk>) and control pieces (<s>, </s>) are special added tokens, matched
        # whole in the text as transformers matches them; user-defined pieces plain added ones.
        added = {i: AddedToken(i, piece, kind != USER_DEFINED) for i, (piece, kind) in enumerate(pieces)
                 if kind in (UNKNOWN, CONTROL, USER_DEFINED)}  # fmt: skip
        added.update(_config_added_tokens(config, vocab))
        return cls(vocab, merges, added, config, None, str(path))

    @classmethod
    def from_json(cls, spec: dict[str, Any], config: dict[str, Any], source: str) -> "SentencePieceTokenizer":
        """From the vocab and merges of a SentencePiece-style tokenizer.json. Its normalizer and
        pre-tokenizer are not read: transformers 5's LlamaTokenizer replaces them by its own."""
        model = spec["model"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
        added = _added_tokens(spec)
        added.update(_config_added_tokens(config, model["vocab"]))
        return cls(dict(model["vocab"]), merges, added, config, spec.get("post_processor"), source)

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        text = text.replace(" ", SPACE)
        if (self.prepend == "always" or (self.prepend == "first" and at_start)) and not text.startswith(SPACE):
            text = SPACE + text
        return [self.token_to_id[p] for p in self._bpe(self._symbols(text))]

    def _symbols(self, text: str) -> list[str]:
        """One piece per character; a character outside the vocab as its UTF-8 byte pieces."""
        symbols = []
        for ch in text:
            if ch in self.token_to_id and self.token_to_id[ch] not in self.added:
                symbols.append(ch)
            else:
                symbols.extend(f"<0x{b:02X}>" for b in ch.encode())
        return symbols

    def _bpe(self, symbols: list[str]) -> list[str]:
        """Merge the adjacent pair of lowest rank, the leftmost first among equals, until none is
        left: a heap over a linked list, so a long segment costs n log n and not n^2."""
        nxt = [*range(1, len(symbols)), -1]
        prev = [*range(-1, len(symbols) - 1)]
        heap = [(r, i) for i in range(len(symbols) - 1) if (r := self.ranks.get((symbols[i], symbols[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if symbols[i] is None or j == -1 or self.ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: a neighbour has merged since this pair was queued
            symbols[i], symbols[j] = symbols[i] + symbols[j], None
            nxt[i] = nxt[j]
            if nxt[i] != -1:
                prev[nxt[i]] = i
            for left, right in ((prev[i], i), (i, nxt[i])):
                if left != -1 and right != -1 and (r := self.ranks.get((symbols[left], symbols[right]))) is not None:
                    heapq.heappush(heap, (r, left))
        return [s for s in symbols if s is not None]

    def token_bytes(self, i: int) -> bytes:
        token = self.added.get(i)
        if token is not None:
            return token.content.encode()
        return bytes([self.byte_of[i]]) if i in self.byte_of else self.pieces[i].replace(SPACE, " ").encode()

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
            piece = self.added[i].content if i in self.added else self.pieces[i]
            parts.append(piece.replace(SPACE, " "))
        parts.append(_utf8_or_replacement(run))
        text = "".join(parts)
        return text[1:] if self.strip_first_space and text.startswith(" ") else text


# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_sentencepiece_model(path: Path) -> list[tuple[str, int]]:
    """(piece, type) for every piece of a tokenizer.model, in id order. The file is a protobuf
    ModelProto whose field 1 repeats {1: piece, 2: score, 3: type}; this walks the wire format for
    just those fields, so neither sentencepiece nor protobuf is needed to read it."""
    data = Path(path).read_bytes()
    pieces = []
    try:
        for field, value in _protobuf_fields(data):
            if field != 1:
                continue
            piece, kind = None, NORMAL
            for sub, sub_value in _protobuf_fields(value):
                if sub == 1:
                    piece = sub_value.decode("utf-8")
                elif sub == 3:
                    kind = sub_value
            if piece is None:
                raise ValueError(f"piece {len(pieces)} has no text")
            pieces.append((piece, kind))
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from None
    if not pieces:
        raise TokenizerError(f"{path}: not a SentencePiece model (no pieces in it)")
    return pieces


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
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = varint(pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {pos}")
        if pos > len(data):
            raise ValueError("truncated")
        yield field, value


def _utf8_or_replacement(run: bytearray) -> str:
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def _token_name(token) -> str:
    """A special token in tokenizer_config.json: a string or an AddedToken dict."""
    return token.get("content", "") if isinstance(token, dict) else str(token or "")


def _token_to_id(vocab: dict[str, int], added: dict[int, AddedToken]) -> dict[str, int]:
    """The model's vocabulary with the added tokens' texts on top."""
    return {**vocab, **{t.content: t.id for t in added.values()}}


def _added_token(i: int, d: dict[str, Any]) -> AddedToken:
    """An added token as tokenizer.json and tokenizer_config.json write one."""
    return AddedToken(int(i), d["content"], bool(d.get("special")), bool(d.get("lstrip")), bool(d.get("rstrip")))


def _added_tokens(spec: dict[str, Any]) -> dict[int, AddedToken]:
    return {t["id"]: _added_token(t["id"], t) for t in spec.get("added_tokens") or []}


def _config_added_tokens(config: dict[str, Any], vocab: dict[str, int]) -> dict[int, AddedToken]:
    """tokenizer_config.json's added_tokens_decoder (LLaVA-1.5's <image> and <pad> live only there),
    and the named special tokens that are pieces of the vocab."""
    added = {int(i): _added_token(i, t) for i, t in (config.get("added_tokens_decoder") or {}).items()}
    for name in ("unk_token", "bos_token", "eos_token", "pad_token"):
        content = _token_name(config.get(name))
        if content in vocab and vocab[content] not in added:
            added[vocab[content]] = AddedToken(vocab[content], content, True)
    return added


class StreamDecoder:
    """Decodes ids as they arrive, holding back a character whose UTF-8 bytes are still incomplete."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False

    def push(self, token_id: int) -> str:
        token = self.tokenizer.added.get(int(token_id))
        if token is not None and token.special and self.skip:
            return ""
        text = self._utf8.decode(self.tokenizer.token_bytes(int(token_id)))
        if text and not self._started:
            self._started = True
            if self.tokenizer.strip_first_space and text.startswith(" "):
                text = text[1:]  # as decode() of the whole stream strips it
        return text

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _normalizer(spec: dict | None, source: str) -> str | None:
    if spec is None:
        return None
    if spec.get("type") in ("NFC", "NFD", "NFKC", "NFKD"):
        return spec["type"]
    if spec.get("type") == "Sequence" and not spec.get("normalizers"):
        return None
    raise TokenizerError(f"{source}: normalizer {spec.get('type')!r} is not supported (NFC, NFD, NFKC, NFKD)")


def _pre_tokenizer_steps(spec: dict | None, source: str) -> list[str]:
    """The pre-tokenizer as a list of steps: a regex (isolate its matches) or "digits" (isolate each digit)."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [step for sub in spec["pretokenizers"] for step in _pre_tokenizer_steps(sub, source)]
    if kind == "ByteLevel":
        if spec.get("add_prefix_space"):
            raise TokenizerError(f"{source}: ByteLevel add_prefix_space=true is not supported")
        return [GPT2_PATTERN] if spec.get("use_regex", True) else []
    if kind == "Split" and spec.get("behavior") == "Isolated" and not spec.get("invert"):
        pattern = spec["pattern"]
        return [pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"])]
    if kind == "Digits" and spec.get("individual_digits"):
        return ["digits"]
    raise TokenizerError(f"{source}: pre-tokenizer {kind!r} {spec} is not supported")


def _apply_steps(text: str, steps: list[str]) -> list[str]:
    pieces = [text]
    for step in steps:
        if step != "digits":
            raise TokenizerError(f"a regex pre-tokenizer step before the last one is not supported: {step!r}")
        # Isolate every character that is a number (Unicode Nd, Nl, No, as Rust's char::is_numeric).
        pieces = [p for piece in pieces for p in _split_digits(piece)]
    return pieces


def _split_digits(text: str) -> list[str]:
    out, run = [], []
    for ch in text:
        if unicodedata.category(ch) in ("Nd", "Nl", "No"):
            if run:
                out.append("".join(run))
                run = []
            out.append(ch)
        else:
            run.append(ch)
    if run:
        out.append("".join(run))
    return out


def _template(spec: dict | None, token_to_id: dict[str, int], source: str) -> tuple[list[int], list[int]]:
    """The special ids a post-processor puts before and after a single sequence."""
    if spec is None or spec.get("type") == "ByteLevel":
        return [], []
    if spec.get("type") == "Sequence":
        prefix, suffix = [], []
        for sub in spec["processors"]:
            p, s = _template(sub, token_to_id, source)
            prefix, suffix = prefix + p, s + suffix
        return prefix, suffix
    if spec.get("type") != "TemplateProcessing":
        raise TokenizerError(f"{source}: post-processor {spec.get('type')!r} is not supported")
    prefix, suffix, seen_a = [], [], False
    for item in spec["single"]:
        if "Sequence" in item:
            seen_a = True
            continue
        name = item["SpecialToken"]["id"]
        ids = spec["special_tokens"][name]["ids"]
        (suffix if seen_a else prefix).extend(ids)
    return prefix, suffix


class AddedTokenMatcher:
    """Finds added tokens left to right, the longest at each position; an lstrip/rstrip token also
    takes the whitespace beside it (as tokenizers' AddedToken)."""

    def __init__(self, tokens):
        tokens = sorted(tokens, key=lambda t: -len(t.content))  # alternation tries the longest first
        self.by_content = {t.content: t for t in tokens}
        self.regex = re.compile("|".join(re.escape(t.content) for t in tokens))

    def finditer(self, text: str):
        """(start, end, token) for each match, the span widened by its stripped whitespace."""
        for m in self.regex.finditer(text):
            token = self.by_content[m.group(0)]
            start, end = m.start(), m.end()
            while token.lstrip and start > 0 and text[start - 1].isspace():
                start -= 1
            while token.rstrip and end < len(text) and text[end].isspace():
                end += 1
            yield start, end, token


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(before, after)
    return text


# The tokenizer classes whose SentencePiece pipeline SentencePieceTokenizer reproduces.
LLAMA_TOKENIZER_CLASSES = {None, "LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder: tokenizer.json where there is one (what transformers
    reads first), else a SentencePiece tokenizer.model; tokenizer_config.json for the rest."""
    folder = Path(folder)
    config = read_json(folder / "tokenizer_config.json", TokenizerError)  # {} when absent
    path, model_path = folder / "tokenizer.json", folder / "tokenizer.model"
    if path.is_file():
        spec = read_json(path, TokenizerError)
        model = spec.get("model") or {}
        if model.get("type") == "BPE" and (model.get("byte_fallback") or "Metaspace" in json.dumps(spec.get("pre_tokenizer"))):
            _check_llama_class(config, path)
            return SentencePieceTokenizer.from_json(spec, config, str(path))
        return BPETokenizer(spec, config, str(path))
    if model_path.is_file():
        _check_llama_class(config, model_path)
        return SentencePieceTokenizer.from_model(model_path, config)
    raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")


def _check_llama_class(config: dict, path: Path) -> None:
    name = config.get("tokenizer_class")
    if name not in LLAMA_TOKENIZER_CLASSES:
        raise TokenizerError(
            f"{path}: a SentencePiece tokenizer of class {name!r}; minivlm reproduces LlamaTokenizer's pipeline "
            "(Llama-2, Vicuna, Mistral) only"
        )
