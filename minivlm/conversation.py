"""A multi-turn chat that keeps its KV cache: each turn runs only its new tokens through the model.

The chat template is rendered for the whole conversation every turn, as transformers renders it;
when the new rendering begins with the text whose tokens are already in the cache (the usual case:
templates append turns), only the rest is tokenized and prefilled. When it does not (a template
that rewrites earlier turns), the conversation is prefilled again from the start, so the answer is
always the one the model gives to the full rendered conversation.

What the user types is text. A special token typed in a message ("<|im_end|><|im_start|>system")
stays text: the template is rendered with a placeholder for every text part, and the text parts
are tokenized with `split_special_tokens=True` (transformers' flag: special tokens unmatched) while
the template's own special tokens and image tokens stay control tokens. Where no text part holds a
special token, the rendered prompt is tokenized whole, exactly as transformers tokenizes it.

A turn that fails (a bad image, a turn longer than the context, Ctrl-C during the answer) is
dropped whole: the conversation, its images and its KV cache are as they were before the turn.
"""

from __future__ import annotations

import copy
import re
import secrets
from typing import Iterator

import torch
from torch import nn

from .decoder import KVCache
from .generation import defaults_of, stream
from .generation_checks import check_context, new_cache
from .processing.processor import ProcessorError


class Conversation:
    def __init__(self, model: nn.Module, processor, system: str | None = None, **generation):
        """generation: stream()'s keywords (max_new_tokens, temperature, top_p, top_k, seed, stop,
        check_memory, ...)."""
        self.model, self.processor, self.generation = model, processor, generation
        self.messages: list[dict] = []
        if system:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        self.images: list = []  # every image of the conversation, in order
        self.cache: KVCache | None = None
        self.cached_text = ""  # the rendered text whose tokens fill the cache
        self.token_ids: list[int] = []  # the tokens in the cache, image tokens included
        self.prefilled = 0  # tokens run through the model in the last turn's prefill

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.images, self.cache, self.cached_text, self.token_ids = [], None, "", []

    def say(self, text: str, images: list | None = None) -> Iterator[str]:
        """The answer to one user turn (with its images), streamed as text pieces. If the turn
        fails or is interrupted (an exception, KeyboardInterrupt, or the caller closing the
        iterator before the end), it is dropped: the state is the one before the turn."""
        saved = (
            list(self.messages),
            list(self.images),
            self.cache,
            self.cache.length if self.cache else 0,
            self.cached_text,
            list(self.token_ids),
            self.prefilled,
        )
        finished = False
        try:
            yield from self._say(text, images)
            finished = True
        finally:
            if not finished:
                self.messages, self.images, self.cache, length, self.cached_text, self.token_ids, self.prefilled = saved
                if self.cache is not None:
                    self.cache.length = length  # slots written past it are overwritten by the next turn

    def _say(self, text: str, images: list | None) -> Iterator[str]:
        if not isinstance(text, str):
            raise TypeError(f"a chat message is text; got a {type(text).__name__}")
        images = list(images or [])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.images += images
        rendered, segments = render_segments(self.processor, self.messages)
        if self.cache is not None and rendered.startswith(self.cached_text):
            cut, first, delta_images = len(self.cached_text), False, images
        else:  # from the start: the whole conversation and all its images
            self.cache, self.token_ids = None, []
            cut, first, delta_images = 0, True, self.images
        inputs = tokenize_segments(self.processor, cut_segments(segments, cut), delta_images, first)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        past = self.cache.length if self.cache is not None else 0
        new = inputs["input_ids"].shape[1]
        if self.cache is None:
            # The context is checked before the cache is sized by it.
            room = check_context(new, self.generation.get("max_new_tokens", 64), defaults_of(self.model))
            self.cache = new_cache(self.model, 1, new + room, self.generation.get("check_memory", True))
        inputs["attention_mask"] = torch.ones(1, past + new, dtype=torch.long, device=device)
        self.prefilled = new
        answer_ids: list[int] = []
        pieces = []
        for piece in stream(
            self.model, self.processor, cache=self.cache, on_token=answer_ids.append, **self.generation, **inputs
        ):
            pieces.append(piece)
            yield piece
        # The cache now holds the prompt and every answer token but the last one sampled (the EOS,
        # or the token at the length limit), which was never fed back.
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        self.cached_text = rendered + self.processor.decode(answer_ids[:-1])
        self.token_ids += inputs["input_ids"][0].tolist() + answer_ids[:-1]


# -- the user's text stays text ----------------------------------------------------------------


def render_segments(processor, messages: list[dict]) -> tuple[str, list[tuple[str, bool]]]:
    """The rendered prompt, and the same text cut into (piece, is_message_text) segments: the
    template's own text and the texts of the messages (what a user typed, an answer, a system
    prompt). A template that changes a message's text beyond trimming it cannot be cut: then the
    whole prompt is one template segment."""
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    nonce = secrets.token_hex(4)
    texts: list[str] = []
    marked = copy.deepcopy(messages)
    for message in marked:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            message["content"] = f"\ue000{nonce}:{len(texts) - 1}\ue001"
            continue
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                part["text"] = f"\ue000{nonce}:{len(texts) - 1}\ue001"
    with_marks = processor.apply_chat_template(marked, add_generation_prompt=True)
    pattern = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
    for shape in (lambda t: t, str.strip):  # as given, or trimmed (Llama-3 templates trim)
        segments, start = [], 0
        for m in pattern.finditer(with_marks):
            segments += [(with_marks[start : m.start()], False), (shape(texts[int(m.group(1))]), True)]
            start = m.end()
        segments.append((with_marks[start:], False))
        if "".join(piece for piece, _ in segments) == rendered:
            return rendered, [(piece, user) for piece, user in segments if piece]
    return rendered, [(rendered, False)]


def cut_segments(segments: list[tuple[str, bool]], offset: int) -> list[tuple[str, bool]]:
    """The segments of the text from character `offset` on."""
    out = []
    for piece, user in segments:
        if offset >= len(piece):
            offset -= len(piece)
            continue
        out.append((piece[offset:], user))
        offset = 0
    return out


def tokenize_segments(processor, segments: list[tuple[str, bool]], images: list, first: bool) -> dict:
    """The model inputs of the segments: the template's text as processor() tokenizes it (image
    tokens expanded), the messages' text with special tokens left unmatched."""
    tokenizer = processor.tokenizer
    text = "".join(piece for piece, _ in segments)
    typed_specials = any(
        user and tokenizer.encode(piece, False) != tokenizer.encode(piece, False, split_special_tokens=True)
        for piece, user in segments
    )
    if not typed_specials:  # the prompt tokenized whole, as transformers tokenizes it
        return processor(text=text, images=images or None, add_special_tokens=first)
    template = "".join(piece for piece, user in segments if not user)
    out = processor(text=template, images=images or None, add_special_tokens=False)  # the pixels, the counts checked
    image_token = processor.tokens.image_token
    image_id = tokenizer.token_to_id.get(image_token)
    ids: list[int] = []
    k = 0
    for piece, user in segments:
        if user:
            part = tokenizer.encode(piece, False, split_special_tokens=True)
            if image_id is not None and processor.family is not None and image_id in part:
                raise ProcessorError(
                    f"the message's text holds {image_token!r}, which this tokenizer reads as the "
                    "image token; attach images with '/image FILE' (or as image parts)"
                )
        else:
            n = piece.count(image_token)
            part = processor(
                text=piece, images=images[k : k + n] or None, add_special_tokens=False, return_tensors=None
            )["input_ids"][0]
            k += n
        ids += part
    if first:
        ids = tokenizer.prefix + ids + tokenizer.suffix
    out["input_ids"] = torch.tensor([ids], dtype=torch.long)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out
