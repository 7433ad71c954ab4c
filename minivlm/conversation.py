"""A multi-turn chat that keeps its KV cache: each turn runs only its new tokens through the model.

The chat template is rendered for the whole conversation every turn, as transformers renders it;
when the new rendering begins with the text whose tokens are already in the cache (the usual case:
templates append turns), only the rest is tokenized and prefilled. When it does not (a template
that rewrites earlier turns), the conversation is prefilled again from the start, so the answer is
always the one the model gives to the full rendered conversation.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .decoder import KVCache
from .generation import stream


class Conversation:
    def __init__(self, model: nn.Module, processor, system: str | None = None, **generation):
        """generation: stream()'s keywords (max_new_tokens, temperature, top_p, top_k, seed, stop, ...)."""
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
        """The answer to one user turn (with its images), streamed as text pieces."""
        images = list(images or [])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.images += images
        rendered = self.processor.apply_chat_template(self.messages, add_generation_prompt=True)
        if self.cache is not None and rendered.startswith(self.cached_text):
            delta, first, delta_images = rendered[len(self.cached_text) :], False, images
        else:  # from the start: the whole conversation and all its images
            self.cache, self.token_ids = None, []
            delta, first, delta_images = rendered, True, self.images
        inputs = self.processor(text=delta, images=delta_images or None, add_special_tokens=first)
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        past = self.cache.length if self.cache is not None else 0
        if self.cache is None:
            self.cache = self.model.new_cache(1, inputs["input_ids"].shape[1] + self.generation.get("max_new_tokens", 64))
        inputs["attention_mask"] = torch.ones(1, past + inputs["input_ids"].shape[1], dtype=torch.long, device=device)
        self.prefilled = inputs["input_ids"].shape[1]
        answer_ids: list[int] = []
        pieces = []
        for piece in stream(self.model, self.processor, cache=self.cache, on_token=answer_ids.append,
                            **self.generation, **inputs):  # fmt: skip
            pieces.append(piece)
            yield piece
        # The cache now holds the prompt and every answer token but the last one sampled (the EOS,
        # or the token at the length limit), which was never fed back.
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        self.cached_text = rendered + self.processor.decode(answer_ids[:-1])
        self.token_ids += inputs["input_ids"][0].tolist() + answer_ids[:-1]
