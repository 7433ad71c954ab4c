"""What every tokenizer shares: added tokens, the special ids around a sequence, decoding, streaming.

transformers (through the tokenizers library) first cuts the raw text at its added tokens
(`<|im_start|>`, `<image>`, ...), hands each piece between them to the model's own pipeline, and
puts the post-processor's special ids (BOS, ...) around the result. A subclass supplies the
pipeline: `_encode_text` (text -> ids) and `token_bytes` (id -> the bytes it stands for).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Any

import regex


class TokenizerError(ValueError):
    """A tokenizer file minivlm cannot read; the message names the file and the part."""


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool
    lstrip: bool = False  # the token swallows whitespace on its left
    rstrip: bool = False  # ... and on its right
    single_word: bool = False  # matches only where no word character touches it
    normalized: bool = False  # matched in the normalized text (after NFC, ...), not the raw text


def added_token(i: int | str, entry: dict[str, Any]) -> AddedToken:
    """An added token as tokenizer.json's `added_tokens` and tokenizer_config.json's
    `added_tokens_decoder` write one."""
    flags = {name: bool(entry.get(name)) for name in ("special", "lstrip", "rstrip", "single_word")}
    if not isinstance(entry.get("content"), str) or not entry["content"]:
        raise TokenizerError(f"added token {i}: expected a non-empty 'content' string, got {entry.get('content')!r}")
    normalized = bool(entry.get("normalized", not flags["special"]))  # tokenizers' default
    return AddedToken(int(i), entry["content"], normalized=normalized, **flags)


# Rust's char::is_whitespace (Unicode White_Space), which tokenizers strips: not Python's isspace(),
# which also takes the separators \x1c-\x1f.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {
    chr(c) for c in range(0x2000, 0x200B)
}
WORD_CHAR = regex.compile(r"\w")  # Unicode \w, as the Rust regex that single_word tokens check


class AddedTokenMatcher:
    """Finds added tokens as tokenizers' AddedVocabulary does: leftmost-longest matches in the raw
    text; a single_word token only where no word character touches it; an lstrip token takes the
    whitespace on its left back to the previous match, an rstrip token the whitespace on its right."""

    def __init__(self, tokens):
        tokens = sorted(tokens, key=lambda t: -len(t.content))  # the alternation tries the longest first
        self.by_content = {t.content: t for t in tokens}
        self.regex = re.compile("|".join(re.escape(t.content) for t in tokens))

    def finditer(self, text: str, skip_special: bool = False):
        """(start, end, token) for each match, its span widened by the whitespace it strips."""
        previous_end = 0
        for m in self.regex.finditer(text):
            token = self.by_content[m.group(0)]
            start, end = m.start(), m.end()
            if skip_special and token.special:
                continue
            if token.single_word and (_word_at(text, start - 1) or _word_at(text, end)):
                continue
            if token.lstrip:
                while start > previous_end and text[start - 1] in WHITESPACE:
                    start -= 1
            if token.rstrip:
                while end < len(text) and text[end] in WHITESPACE:
                    end += 1
            yield start, end, token
            previous_end = end


def _word_at(text: str, i: int) -> bool:
    return 0 <= i < len(text) and WORD_CHAR.match(text[i]) is not None


class Tokenizer:
    """Added tokens matched in the raw text first, the text between them encoded by the subclass,
    the post-processor's ids around the sequence, and special tokens skipped on decode."""

    strip_first_space = False  # SentencePiece's decoder drops the space its encoder put in front
    padding_side = "right"  # where transformers' tokenizer class pads when the config does not say
    normalize = None  # the model's normalizer (str -> str) where it has one; set before __init__ runs

    def __init__(self, added: dict[int, AddedToken], token_to_id: dict[str, int], prefix: list[int], suffix: list[int]):
        self.added = added
        self.token_to_id = token_to_id
        self.prefix, self.suffix = prefix, suffix
        # tokenizers matches tokens flagged `normalized` in the normalized text, the others in the raw
        # text first; without a normalizer the two are one.
        raw = [t for t in added.values() if not (t.normalized and self.normalize)]
        normalized = [t for t in added.values() if t.normalized and self.normalize]
        self._added = AddedTokenMatcher(raw) if raw else None
        self._added_normalized = AddedTokenMatcher(normalized) if normalized else None

    @property
    def vocab_size(self) -> int:
        return max(self.token_to_id.values()) + 1

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Text -> ids: added tokens matched first, the text between them encoded by the model.
        `split_special_tokens` (transformers' flag of that name) leaves special tokens unmatched, so
        that "<|im_end|>" typed by a user is text, not a control token; other added tokens still match."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: no bytes to tokenize (transformers raises too)
            raise ValueError(
                f"the text holds {text[e.start]!r} at position {e.start}, which is not a character "
                "UTF-8 can encode (a lone surrogate)"
            ) from None
        ids: list[int] = []
        for start, segment, added in self._split_added(text, split_special_tokens):
            if added is not None:
                ids.append(added)
            elif segment:
                ids.extend(self._encode_text(segment, at_start=start == 0))
        return self.prefix + ids + self.suffix if add_special_tokens else ids

    def _split_added(self, text: str, skip_special: bool = False):
        """(offset, text, None) and (offset, "", added id) pieces, left to right; with a normalizer
        the text pieces come normalized, the normalized added tokens matched in them."""
        for offset, piece, added in _split(text, self._added, skip_special):
            if added is not None or self.normalize is None:
                yield offset, piece, added
            else:
                for inner, sub, sub_added in _split(self.normalize(piece), self._added_normalized, skip_special):
                    yield offset + inner, sub, sub_added  # the offset only tells the first piece (0) apart

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text. An id the tokenizer does not have (an embedding row past the vocabulary, as
        in llava-1.5's 32,064 or Qwen's 151,936) decodes to nothing, as transformers decodes it.
        No clean-up of spaces: transformers 5 ignores clean_up_tokenization_spaces for BPE models,
        and every tokenizer here is one."""
        skip = {i for i, t in self.added.items() if t.special} if skip_special_tokens else set()
        return self._decode_tokens([int(i) for i in ids if int(i) not in skip])

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        raise NotImplementedError

    def _decode_tokens(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, i: int) -> bytes:
        """The bytes one id stands for (b"" for an id the tokenizer lacks), for streaming."""
        raise NotImplementedError


def _split(text: str, matcher: AddedTokenMatcher | None, skip_special: bool = False):
    """(offset, text, None) and (offset, "", added id) pieces of `text`, left to right."""
    start = 0
    for m_start, m_end, token in matcher.finditer(text, skip_special) if matcher else ():
        if m_start > start:
            yield start, text[start:m_start], None
        yield m_start, "", token.id
        start = max(start, m_end)  # an rstrip token's whitespace may reach into the next match
    if start < len(text):
        yield start, text[start:], None


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


def post_processor_ids(spec: dict | None, token_to_id: dict[str, int], source: str) -> tuple[list[int], list[int]]:
    """The special ids tokenizer.json's post-processor puts before and after a single sequence."""
    if spec is None or spec.get("type") == "ByteLevel":
        return [], []
    if spec.get("type") == "Sequence":
        prefix, suffix = [], []
        for sub in spec["processors"]:
            p, s = post_processor_ids(sub, token_to_id, source)
            prefix, suffix = prefix + p, s + suffix
        return prefix, suffix
    if spec.get("type") != "TemplateProcessing":
        raise TokenizerError(
            f"{source}: post-processor {spec.get('type')!r} is not supported (TemplateProcessing, ByteLevel)"
        )
    prefix, suffix, seen_a = [], [], False
    for item in spec["single"]:
        if "Sequence" in item:
            seen_a = True
            continue
        name = item["SpecialToken"]["id"]
        ids = spec["special_tokens"][name]["ids"]
        (suffix if seen_a else prefix).extend(ids)
    return prefix, suffix
