"""A conversation -> the model's inputs and the labels it learns from: only the assistant's turns.

LLaVA trains on the assistant's answers alone (its `preprocess_v1`): the system prompt, every user
turn with its image tokens, and the template's "ASSISTANT:" are masked with -100, and each answer
is learned with the end-of-sequence token that closes it, so the model learns to stop. The chat
templates' `{% generation %}` blocks mark the same text.

How the learned text is found, for any chat template: the conversation is rendered up to each
assistant turn with the generation prompt, and again through that turn; the turn's text is what
the second adds to the first. Trailing whitespace is the template's layout, not the answer. A
turn that does not end in a special token (LLaVA-1.5's template writes "ASSISTANT: answer ") gets
the tokenizer's end-of-sequence token in place of its trailing whitespace, as LLaVA's "</s>".

How the text becomes tokens: the whole conversation is tokenized once, as the processor does at
inference, and each turn's start and end is the length of its prefix's tokens. A boundary that
falls inside a token (a template that glues the answer to the word before it) is refused by name,
never silently shifted.
"""

from __future__ import annotations

import numpy as np
import torch

from ..processing.batching import IGNORE  # the label of a token the loss skips (torch's ignore_index)
from ..processing.chat import ChatTemplateError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class LabelError(ValueError):
    """A conversation that cannot be turned into labels, with what is wrong in it."""


def llava_messages(conversations, image_token: str = "<image>", where: str = "the conversation") -> list[dict]:
    """LLaVA's turns ({"from": "human" | "gpt" | "system", "value": text}) -> transformers' chat
    messages, each "<image>" in a value an image part at its place."""
    if not isinstance(conversations, list) or not conversations:
        raise LabelError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise LabelError(
                f"{where}, turn {i}: expected {{'from': one of {sorted(ROLES)}, 'value': text}}, got {turn!r}"[:300]
            )
        parts = []
        for k, text in enumerate(turn["value"].split(image_token)):
            if k:
                parts.append({"type": "image"})
            if text.strip("\n"):
                parts.append({"type": "text", "text": text.strip("\n")})
        messages.append({"role": ROLES[turn["from"]], "content": parts})
    if not any(m["role"] == "assistant" for m in messages):
        raise LabelError(f"{where}: no assistant ('gpt') turn, so nothing to learn")
    return messages


def learned_pieces(processor, messages: list[dict], eos_token: str | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, learned) pieces, in order: the assistant turns are
    learned, everything between them is not. eos_token: what closes a turn the template leaves
    open; None: the tokenizer config's eos_token."""
    render = processor.apply_chat_template
    full = render(messages)
    closers = closing_tokens(processor)
    eos = eos_token or processor.special_tokens.get("eos_token")
    pieces, done = [], 0  # `done`: the characters of `full` placed in pieces so far
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = render(messages[:i], add_generation_prompt=True), render(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(before)) or len(before) < done:
            raise LabelError(
                f"the chat template does not render the conversation turn by turn (message {i}, the "
                "assistant's): rendering it up to that turn is not a prefix of rendering it whole, so the "
                "turn's text cannot be found"
            )
        answer, closed = _answer(through[len(before) :], message, closers)
        if not answer.strip():
            raise LabelError(f"message {i}, the assistant's, renders as no text: nothing to learn")
        if not full.startswith(answer, len(before)):
            raise LabelError(
                f"message {i}: the chat template renders the assistant's turn one way when it ends the "
                "conversation and another way before a later turn (as templates that drop earlier turns' "
                "reasoning do), so the turn's text cannot be found; train on conversations that end there"
            )
        pieces.append((full[done : len(before)], False))
        done = len(before) + len(answer)
        if closed:
            pieces.append((answer, True))
        else:  # the template does not close the turn: LLaVA's "</s>" does, in place of the layout's space
            if eos is None:
                raise LabelError(
                    "the chat template closes no assistant turn and the tokenizer config names no eos_token "
                    "(pass eos_token=)"
                )
            pieces.append((answer + eos, True))
            done += len(full[done:]) - len(full[done:].lstrip())
    pieces.append((full[done:], False))
    return [(text, learned) for text, learned in pieces if text]


def _answer(rendered: str, message: dict, closers: list[str]) -> tuple[str, bool]:
    """What the template added for the assistant's turn, cut after the first token that closes it
    past the message's own text (a template may write the next turn's header after it), and whether
    such a token was found; else without its trailing whitespace."""
    text = rendered.rstrip()
    content = message.get("content")
    parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or [] if isinstance(p, dict)]
    last = next((p.strip() for p in reversed(parts) if isinstance(p, str) and p.strip()), "")
    at = text.find(last) if last else -1
    start = at + len(last) if at >= 0 else 0
    ends = [(text.find(t, start), -len(t)) for t in closers if text.find(t, start) >= 0]
    if not ends:
        return text, False
    pos, minus_len = min(ends)  # the first; of two at one place, the longer
    return text[: pos - minus_len], True


def closing_tokens(processor) -> list[str]:
    """The tokens that may close a turn: the special tokens the tokenizer config names and the
    tokenizer's special added tokens (<|im_end|>, <end_of_utterance>, <|eot_id|>, </s>)."""
    named = [t for t in processor.special_tokens.values() if t]
    return named + [t.content for t in processor.tokenizer.added.values() if t.special]


def conversation_inputs(
    processor,
    messages: list[dict],
    images=None,
    add_special_tokens: bool = True,
    eos_token: str | None = None,
    max_length: int | None = None,
) -> dict:
    """One conversation -> the processor's model inputs (batch of 1) plus `labels` (1, seq): the
    token ids of the assistant's turns, IGNORE everywhere else (prompt, image tokens, template).
    eos_token: as learned_pieces; max_length: the most tokens the model takes (its context)."""
    pieces = _pieces(processor, messages, eos_token)
    expanded, pixels, replacements = processor.expand("".join(p for p, _ in pieces), images)
    ids, labels = _label_ids(processor, pieces, expanded[0], replacements, add_special_tokens)
    if max_length is not None and len(ids) > max_length:
        raise LabelError(
            f"the conversation is {len(ids):,} tokens long with its image tokens; the model's context holds "
            f"{max_length:,} (drop the example, or shorten it)"
        )
    out = processor._pad([ids], "right")
    out = {key: torch.as_tensor(np.asarray(v)) for key, v in {**out, **pixels}.items()}
    out["labels"] = torch.tensor([labels])
    return out


def check_conversation(
    processor, messages: list[dict], add_special_tokens: bool = True, eos_token: str | None = None
) -> int:
    """conversation_inputs' checks on the text alone, without reading an image (a whole data set is
    checked so before training): the template, the turns, the token boundaries. Returns its token
    count with one token per image (a lower bound of its length)."""
    pieces = _pieces(processor, messages, eos_token)
    text = "".join(p for p, _ in pieces)
    token = processor.tokens.image_token
    ids, _ = _label_ids(processor, pieces, text, [token] * text.count(token), add_special_tokens)
    return len(ids)


def _pieces(processor, messages: list[dict], eos_token: str | None) -> list[tuple[str, bool]]:
    try:
        return learned_pieces(processor, messages, eos_token)
    except ChatTemplateError as e:
        raise LabelError(f"the chat template refused the conversation: {e}") from None


def _label_ids(
    processor, pieces: list[tuple[str, bool]], expanded: str, replacements: list[str], add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """(the token ids of the expanded conversation, their labels): each learned piece's tokens are
    found by the length of the tokens of the text before it."""
    # Where each piece starts in the expanded text: the image tokens before it grew by their replacements.
    token, starts, at, k = processor.tokens.image_token, [], 0, 0
    for piece, learned in pieces:
        starts.append(at)
        n = piece.count(token)
        if learned and n:
            raise LabelError(f"an assistant turn holds {n} {token!r}: images belong in the user's turns")
        at += len(piece) + sum(len(r) - len(token) for r in replacements[k : k + n])
        k += n

    tokenizer = processor.tokenizer
    ids = tokenizer.encode(expanded, add_special_tokens)
    bounds = []
    for start in starts[1:]:
        prefix = tokenizer.encode(expanded[:start], add_special_tokens)
        if tokenizer.suffix and add_special_tokens:
            prefix = prefix[: len(prefix) - len(tokenizer.suffix)]  # a post-processor's closing tokens
        if ids[: len(prefix)] != prefix:
            raise LabelError(
                "a turn's boundary falls inside a token, so its tokens cannot be told from its neighbours': "
                f"...{expanded[max(0, start - 30) : start]!r} | {expanded[start : start + 30]!r}..."
            )
        bounds.append(len(prefix))
    bounds = [0, *bounds, len(ids)]
    labels = [IGNORE] * len(ids)
    for (_, learned), lo, hi in zip(pieces, bounds, bounds[1:]):
        if learned:
            labels[lo:hi] = ids[lo:hi]
    return ids, labels
