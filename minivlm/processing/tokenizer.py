"""Tokenizers read from a checkpoint's own files, without transformers or the tokenizers library.

`BPETokenizer`: byte-level BPE from `tokenizer.json` (Llama-3, Qwen2, SmolLM2, GPT-2 style), with
tiktoken doing the merges. What tokenizer.json spells as a pipeline (normalizer, pre-tokenizer
steps, added tokens, post-processor template, ByteLevel decoder) is read into the few pieces of
data each step needs.
"""

from __future__ import annotations

import codecs
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


class BPETokenizer:
    def __init__(self, spec: dict[str, Any], config: dict[str, Any] | None = None, source: str = "tokenizer.json"):
        config = config or {}
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise TokenizerError(f"{source}: model type {model.get('type')!r}; BPETokenizer reads byte-level BPE")
        if model.get("byte_fallback") or "Metaspace" in json.dumps(spec.get("pre_tokenizer")):
            raise TokenizerError(
                f"{source}: a SentencePiece-style tokenizer (byte fallback, '▁' for spaces), as Llama-2 and "
                "Mistral use; minivlm reads byte-level BPE only so far"
            )
        self.added = {
            t["id"]: AddedToken(t["id"], t["content"], bool(t.get("special")), bool(t.get("lstrip")), bool(t.get("rstrip")))
            for t in spec.get("added_tokens") or []
        }  # fmt: skip
        self.token_to_id = dict(model["vocab"])
        self.token_to_id.update({t.content: t.id for t in self.added.values()})
        self.id_to_bytes: dict[int, bytes] = {}
        ranks: dict[bytes, int] = {}
        for token, i in model["vocab"].items():
            if i in self.added:
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
        self._check_merge_order(model.get("merges") or [], source)

        self.normalizer = _normalizer(spec.get("normalizer"), source)
        steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"), source)
        pattern = steps.pop() if steps and steps[-1] != "digits" else r"[\s\S]+"
        self.python_steps = steps  # steps tiktoken cannot do in its one regex: done here, in order
        self.encoding = tiktoken.Encoding(name=source, pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self.prefix, self.suffix = _template(spec.get("post_processor"), self.token_to_id, source)
        self._added = AddedTokenMatcher(self.added.values()) if self.added else None
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))

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

    @property
    def vocab_size(self) -> int:
        return max(self.token_to_id.values()) + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids: added tokens matched first, the rest normalised, pre-tokenised and merged."""
        ids: list[int] = []
        for segment, added in self._split_added(text):
            if added is not None:
                ids.append(added)
                continue
            if self.normalizer:
                segment = unicodedata.normalize(self.normalizer, segment)
            for piece in _apply_steps(segment, self.python_steps):
                ids.extend(self.encoding.encode_ordinary(piece))
        return self.prefix + ids + self.suffix if add_special_tokens else ids

    def _split_added(self, text: str):
        """(text, None) and ("", added id) pieces, left to right."""
        start = 0
        for m_start, m_end, token in self._added.finditer(text) if self._added else ():
            if m_start < start:  # inside whitespace a previous rstrip token already took
                continue
            if m_start > start:
                yield text[start:m_start], None
            yield "", token.id
            start = m_end
        if start < len(text):
            yield text[start:], None

    def token_bytes(self, i: int) -> bytes:
        token = self.added.get(i)
        return token.content.encode() if token is not None else self.id_to_bytes[i]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        skip = {i for i, t in self.added.items() if t.special} if skip_special_tokens else set()
        text = b"".join(self.token_bytes(int(i)) for i in ids if int(i) not in skip).decode("utf-8", errors="replace")
        return clean_up_tokenization(text) if self.clean_up_spaces else text


class StreamDecoder:
    """Decodes ids as they arrive, holding back a character whose UTF-8 bytes are still incomplete."""

    def __init__(self, tokenizer: BPETokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        token = self.tokenizer.added.get(int(token_id))
        if token is not None and token.special and self.skip:
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(int(token_id)))

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


def load_tokenizer(folder: Path) -> BPETokenizer:
    """The tokenizer of a checkpoint folder, from tokenizer.json and tokenizer_config.json."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{folder}: no tokenizer.json (SentencePiece tokenizer.model support is not written yet)")
    spec = read_json(path, TokenizerError)
    config = read_json(folder / "tokenizer_config.json", TokenizerError)
    return BPETokenizer(spec, config, str(path))
