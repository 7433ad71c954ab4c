"""Byte-level BPE from tokenizer.json (GPT-2, Llama-3, Qwen2, SmolLM2, ...): tokenizers' pipeline.

normalizer (NFC/NFKC...) -> pre-tokenizer (regex splits, digit splits, then every byte of a piece
written as one printable character, GPT-2's table) -> BPE over those characters (`bpe.BPE`) ->
ids. Decoding maps the characters back to bytes and reads them as UTF-8.

When tiktoken gives the same ids. tiktoken merges, at each step, the adjacent pair whose
concatenation is the token of lowest id, the leftmost among equals; it considers every pair whose
concatenation is a token, and takes a word that is a token whole. tokenizers merges the pair
listed first in the merge list, and only listed pairs. The two agree on a word when
  1. every single byte is a token (tiktoken cannot start otherwise);
  2. the listed pairs are exactly the pairs of tokens whose concatenation is a token (a tiktoken
     vocabulary converted to tokenizer.json lists every split of every token, as Llama-3's does:
     280,147 merges for 128,000 tokens), so both consider the same candidates;
  3. the merged tokens' ids never fall along the list, so the pair listed first is a pair of
     lowest merged id;
  4. `ignore_merges` is set, so both take a word that is a token whole;
  5. the word repeats no two-byte sequence. Under 1-4 the two can part only where two different
     candidate pairs give the same token (tiktoken takes the leftmost, tokenizers the one listed
     first, e.g. "Ġ"+"ĠĠĠ" against "ĠĠĠ"+"Ġ" in a run of spaces); both pairs then spell that token
     at two different offsets, so the word holds some two-byte sequence twice.
Vocabularies trained by tokenizers (SmolLM2, ...) and converted ones that list one split per token
(Qwen2, GPT-4o) fail 2: there tiktoken could merge a pair that is not listed, so every word takes
the exact path. `fast_path` says which one a tokenizer uses.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import regex
import tiktoken

from .base import AddedToken, Tokenizer, TokenizerError, post_processor_ids
from .bpe import BPE

# GPT-2's pre-tokenizer pattern: what a ByteLevel pre-tokenizer with use_regex=true applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


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


CHAR_OF_BYTE = _bytes_to_unicode()
BYTE_OF_CHAR = {c: b for b, c in CHAR_OF_BYTE.items()}
# str.translate table from a latin-1 reading of UTF-8 bytes to their byte-level characters.
_TO_BYTE_LEVEL = {b: c for b, c in CHAR_OF_BYTE.items()}


def to_byte_level(text: str) -> str:
    """'é' -> 'Ã©': each UTF-8 byte of the text as its printable character."""
    return text.encode("utf-8").decode("latin-1").translate(_TO_BYTE_LEVEL)


def byte_level_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token stands for; None when it is not written in the byte table."""
    try:
        return bytes(BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        return None


class BPETokenizer(Tokenizer):
    """Byte-level BPE from tokenizer.json; ids identical to transformers' for every such file."""

    def __init__(self, spec: dict[str, Any], added: dict[int, AddedToken], source: str = "tokenizer.json"):
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{source}: model type {model.get('type')!r}; BPETokenizer reads byte-level BPE")
        for name in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(name):
                raise TokenizerError(
                    f"{source}: BPE {name} {model[name]!r} is not supported in a byte-level vocabulary"
                )
        vocab: dict[str, int] = model.get("vocab") or {}
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
        self.bpe = BPE(
            vocab,
            merges,
            ignore_merges=bool(model.get("ignore_merges")),
            source=source,
            unk_token=model.get("unk_token"),
            fuse_unk=bool(model.get("fuse_unk")),
        )
        # Decoding: every vocab token's bytes; a token outside the byte table (rare) as its UTF-8.
        self.id_to_bytes = {i: byte_level_bytes(t) or t.encode() for t, i in vocab.items()}
        for i, token in added.items():  # the ByteLevel decoder maps added tokens through the table too
            self.id_to_bytes[i] = byte_level_bytes(token.content) or token.content.encode()
        self.normalizers = _normalizers(spec.get("normalizer"), source)
        self.normalize = self._normalized if self.normalizers else None
        self.steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"), source)
        self._tiktoken = self._tiktoken_core(vocab, merges, bool(model.get("ignore_merges")))
        if self._tiktoken is not None:
            self.bpe.shortcut = self._tiktoken_word
        token_to_id = {**vocab, **{t.content: t.id for t in added.values()}}
        super().__init__(added, token_to_id, *post_processor_ids(spec.get("post_processor"), token_to_id, source))

    @property
    def fast_path(self) -> str:
        return "tiktoken" if self._tiktoken is not None else "exact"

    @staticmethod
    def _tiktoken_core(vocab: dict[str, int], merges: list[tuple[str, str]], ignore_merges: bool):
        """tiktoken's BPE over this vocabulary when conditions 1-4 of the module docstring hold, else None."""
        if not ignore_merges or len(merges) < len(vocab):  # 4; and 2 needs several splits for most tokens
            return None
        ranks = {}
        for token, i in vocab.items():
            raw = byte_level_bytes(token)
            if raw is not None:
                ranks[raw] = i
        if any(bytes([b]) not in ranks for b in range(256)):  # 1
            return None
        last = -1
        for a, b in merges:  # 3
            i = vocab[a + b]
            if i < last:
                return None
            last = i
        listed = set(merges)
        splits = 0
        for token in vocab:  # 2: the listed pairs are all the splits (counted: listed ones are splits)
            for k in range(1, len(token)):
                if token[:k] in vocab and token[k:] in vocab:
                    if (token[:k], token[k:]) not in listed:
                        return None
                    splits += 1
        if splits != len(listed):
            return None
        encoding = tiktoken.Encoding(name="minivlm", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={})
        return encoding._core_bpe  # encode_single_piece: the merges of one word, no regex split

    def _normalized(self, text: str) -> str:
        for form in self.normalizers:
            text = form(text)
        return text

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        """`text` comes normalized (see Tokenizer._split_added)."""
        return [i for piece in _apply_steps(text, self.steps) for i in self.bpe.encode_word(to_byte_level(piece))]

    def _tiktoken_word(self, word: str) -> list[int] | None:
        """tiktoken's ids for a byte-level word that repeats no two-byte sequence (condition 5), else None."""
        if len(set(zip(word, word[1:]))) != len(word) - 1:
            return None
        return self._tiktoken.encode_single_piece(bytes(BYTE_OF_CHAR[c] for c in word))

    def token_bytes(self, i: int) -> bytes:
        return self.id_to_bytes.get(i, b"")

    def _decode_tokens(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")


def _normalizers(spec: dict | None, source: str) -> list:
    """tokenizer.json's normalizer as a list of str -> str functions."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [f for sub in spec.get("normalizers") or [] for f in _normalizers(sub, source)]
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return [lambda text, form=kind: unicodedata.normalize(form, text)]
    if kind == "Lowercase":
        return [str.lower]
    raise TokenizerError(
        f"{source}: normalizer {kind!r} is not supported in byte-level BPE (NFC, NFD, NFKC, NFKD, Lowercase)"
    )


# Split behaviours of tokenizers' pre-tokenizers: what happens to a match and the text around it.
BEHAVIOURS = {"Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous"}


def _pre_tokenizer_steps(spec: dict | None, source: str) -> list[tuple]:
    """The pre-tokenizer as steps, each splitting every piece further: ("split", regex, behaviour,
    invert) or ("digits", individual)."""
    if spec is None:
        return []
    kind = spec.get("type")
    if kind == "Sequence":
        return [step for sub in spec["pretokenizers"] for step in _pre_tokenizer_steps(sub, source)]
    if kind == "ByteLevel":  # the byte mapping itself happens per piece, after all steps
        if spec.get("add_prefix_space"):
            raise TokenizerError(f"{source}: ByteLevel add_prefix_space=true is not supported")
        return [("split", regex.compile(GPT2_PATTERN), "Isolated", False)] if spec.get("use_regex", True) else []
    if kind == "Split":
        pattern, behaviour = spec.get("pattern") or {}, spec.get("behavior")
        if behaviour not in BEHAVIOURS:
            raise TokenizerError(f"{source}: Split behavior {behaviour!r} is not one of {sorted(BEHAVIOURS)}")
        try:
            compiled = regex.compile(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern["String"]))
        except (KeyError, regex.error) as e:
            raise TokenizerError(f"{source}: Split pattern {pattern!r} is not a usable regex ({e})") from None
        return [("split", compiled, behaviour, bool(spec.get("invert")))]
    if kind == "Digits":
        return [("digits", bool(spec.get("individual_digits")))]
    raise TokenizerError(f"{source}: pre-tokenizer {kind!r} is not supported (Sequence, Split, Digits, ByteLevel)")


def _apply_steps(text: str, steps: list[tuple]) -> list[str]:
    pieces = [text]
    for step in steps:
        if step[0] == "split":
            _, pattern, behaviour, invert = step
            pieces = [p for piece in pieces for p in _split(piece, pattern, behaviour, invert)]
        else:
            pieces = [p for piece in pieces for p in _split_digits(piece, individual=step[1])]
    return pieces


def _split(text: str, pattern, behaviour: str, invert: bool) -> list[str]:
    """tokenizers' NormalizedString.split: the text cut into (span, is_delimiter) runs, then the
    delimiters isolated, removed, or glued to a neighbour. With `invert` the matches are the kept text."""
    runs: list[tuple[str, bool]] = []
    at = 0
    for m in pattern.finditer(text):
        if m.end() == m.start():
            continue
        if m.start() > at:
            runs.append((text[at : m.start()], invert))
        runs.append((m.group(), not invert))
        at = m.end()
    if at < len(text):
        runs.append((text[at:], invert))
    if behaviour == "Isolated":
        return [piece for piece, _ in runs]
    if behaviour == "Removed":
        return [piece for piece, is_delimiter in runs if not is_delimiter]
    out: list[str] = []
    glue_next = previous_delimiter = False
    for piece, is_delimiter in runs:
        if behaviour == "MergedWithPrevious" and is_delimiter and out:
            out[-1] += piece
        elif behaviour == "Contiguous" and is_delimiter and out and previous_delimiter:
            out[-1] += piece
        elif glue_next:
            out[-1] += piece
        else:
            out.append(piece)
        glue_next = behaviour == "MergedWithNext" and is_delimiter
        previous_delimiter = is_delimiter
    return out


def _split_digits(text: str, individual: bool) -> list[str]:
    """tokenizers' Digits: numbers (Rust's char::is_numeric: Unicode Nd, Nl, No) apart from the rest,
    each digit alone with `individual_digits`, else runs of them."""
    out: list[str] = []
    previous = None  # the kind of the last character: "digit" or "other"
    for ch in text:
        kind = "digit" if unicodedata.category(ch) in ("Nd", "Nl", "No") else "other"
        if out and kind == previous and not (kind == "digit" and individual):
            out[-1] += ch
        else:
            out.append(ch)
        previous = kind
    return out
