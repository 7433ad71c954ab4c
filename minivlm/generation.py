"""Generation: a prefill of the prompt (images included), then one token at a time against the KV
cache, each row of a batch stopping on its own.

    new_ids = minivlm.generate(model, **inputs, max_new_tokens=64)        # (batch, new) token ids
    for piece in minivlm.stream(model, processor, **inputs):               # text as it is decoded
        print(piece, end="", flush=True)

Sampling follows transformers' definitions and order: repetition penalty on the raw logits, then
temperature, top-k, top-p; temperature 0 is greedy. A finished row is fed padding (its output is
padded with pad_token_id, as transformers pads it) until every row is done, so a left-padded
batch gives each row exactly the tokens it gets alone.

The loop keeps tokens on the device. The host asks whether every row is done only every
`check_every` steps (generate: every 8, so a finished batch runs at most 7 steps too many, whose
tokens are cut off), and reads a token only where streaming or a stop string needs the text. The
steps themselves (prefill, decode_step, sample) are in steps.py; `compile=True` compiles the
decode step there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .decoder import KVCache
from .generation_checks import GenerationError, check_cache_memory, check_mask, check_prompt, check_seed, new_cache
from .parallel import check_same_call, shared_seed
from .processing.tokenizer import StreamDecoder, Tokenizer
from .steps import (  # noqa: F401  (Sampling and its parts are part of this module's surface)
    DecodeStep,
    Sampling,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    check_compile,
    prefill,
    sample,
)


@dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint says about generation: generation_config.json, else config.json."""

    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    max_positions: int | None = None  # the decoder's context length

    @classmethod
    def read(cls, folder: Path, text_config) -> "GenerationDefaults":
        path = Path(folder) / "generation_config.json"
        d = {}
        if path.is_file():
            try:
                d = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise GenerationError(f"{path}: not valid JSON ({e})") from None
        eos = d.get("eos_token_id", list(text_config.eos_token_id))
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        pad = d.get("pad_token_id", text_config.pad_token_id)
        return cls(eos, pad, text_config.max_positions)


def defaults_of(model: nn.Module) -> GenerationDefaults:
    """The model's GenerationDefaults (set by load_model), or those of its config alone."""
    found = getattr(model, "generation_defaults", None)
    if found is not None:
        return found
    text = getattr(model.config, "text", model.config)
    return GenerationDefaults(tuple(text.eos_token_id), text.pad_token_id, text.max_positions)


# -- stopping ----------------------------------------------------------------------------------


@dataclass
class StopRules:
    """When a row is done: an end token (the checkpoint's EOS, or ids given as stops), or a stop
    string that the text generated so far ends in, however the tokens split it."""

    token_ids: set[int] = field(default_factory=set)
    strings: list[str] = field(default_factory=list)
    tokenizer: Tokenizer | None = None

    @classmethod
    def build(cls, stop, eos_token_ids: Sequence[int], tokenizer: Tokenizer | None) -> "StopRules":
        stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        strings = [s for s in stop if isinstance(s, str)]
        if any(not s for s in strings):
            raise GenerationError("an empty stop string would stop at once; give non-empty strings")
        if strings and tokenizer is None:
            raise GenerationError("stop strings need the tokenizer (pass tokenizer= or use stream())")
        ids = {int(s) for s in stop if not isinstance(s, str)}
        return cls(ids | {int(i) for i in eos_token_ids}, strings, tokenizer)


class StopText:
    """Stop strings found in text as it arrives, however the tokens split it; generate and stream
    both match with it. `push` takes the next piece of text and returns the part that can be shown
    (never what might be the start of a stop string: that is held back until it is not) and whether
    a stop string has ended the text (what it and anything after it would be is dropped)."""

    def __init__(self, strings: list[str]):
        self.strings, self.held = strings, ""

    def push(self, piece: str) -> tuple[str, bool]:
        self.held += piece
        cut = min((i for s in self.strings if (i := self.held.find(s)) >= 0), default=None)
        if cut is not None:
            shown, self.held = self.held[:cut], ""
            return shown, True
        keep = _longest_stop_prefix(self.held, self.strings)
        shown, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return shown, False

    def flush(self) -> str:
        """The text still held back, once no more comes."""
        shown, self.held = self.held, ""
        return shown


def _longest_stop_prefix(text: str, strings: list[str]) -> int:
    """The length of the longest tail of text that is the start of a stop string."""
    best = 0
    for s in strings:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# -- the loop ----------------------------------------------------------------------------------


@torch.inference_mode()
def generate_steps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    stop: StopRules | None = None,
    seed: int | None = None,
    cache: KVCache | None = None,
    check_memory: bool = True,
    compile: bool = False,
    check_every: int = 1,
    **image_inputs,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (tokens (batch,), done (batch,) bool) for each new position, the tokens already
    padded where a row had finished before. Stops after max_new_tokens, or once every row is done:
    asked every `check_every` steps (1: at once; more: fewer host syncs, and up to check_every - 1
    steps of padding after the last row finished, which the caller cuts).

    cache: an existing KV cache whose filled slots are the context before input_ids (a chat's
    earlier turns); attention_mask then covers those slots too. None: a fresh cache.
    check_memory: refuse (GenerationError) a KV cache larger than the memory the device has
    available before allocating it; False skips the check (memory the OS would swap in, say).
    compile: run the decode step under torch.compile (steps.DecodeStep); the first steps then
    include the compile time.
    """
    defaults = defaults_of(model)
    past = cache.length if cache is not None else 0
    max_new_tokens = check_prompt(input_ids, max_new_tokens, defaults, past)
    check_seed(seed)
    if isinstance(input_ids, torch.Tensor) and (
        input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool
    ):
        raise GenerationError(f"input_ids are {input_ids.dtype}; expected integer token ids (torch.long)")
    vocab = getattr(getattr(getattr(model, "language_model", model), "config", None), "vocab_size", None)
    if vocab is not None:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise GenerationError(f"input_ids hold the id {bad}; the model's vocabulary has ids 0 to {vocab - 1}")
    if compile:
        check_compile(model)
    stop = stop or StopRules(set(defaults.eos_token_ids))
    # Tensor parallelism: ranks that called with different inputs get an error, not a backend abort.
    check_same_call(
        model, input_ids, attention_mask, past, max_new_tokens, sampling, seed,
        sorted(stop.token_ids), sorted(stop.strings), *(image_inputs[k] for k in sorted(image_inputs)),
    )  # fmt: skip
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + prompt_len, dtype=torch.long, device=device)
    check_mask(attention_mask, (batch, past + prompt_len))
    what = f" (prompt {past + prompt_len} + {max_new_tokens} new)"
    if cache is None:
        cache = new_cache(model, batch, prompt_len + max_new_tokens, check_memory, what)
    else:
        if check_memory and past + prompt_len + max_new_tokens > cache.max_len:
            check_cache_memory(model, batch, past + prompt_len + max_new_tokens, what)
        cache.reserve(past + prompt_len + max_new_tokens)
    pad = defaults.pad_token_id if defaults.pad_token_id is not None else (defaults.eos_token_ids or (0,))[0]
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device)
        seed = shared_seed(model, seed)  # tensor parallelism: every rank draws the same tokens
        generator.manual_seed(int(seed) if seed is not None else torch.seed())
    logits = prefill(model, input_ids, attention_mask, cache, **image_inputs)
    seen = None
    if sampling.repetition_penalty != 1.0:  # the tokens of each row so far, padding left out
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=device)  # (batch, vocab)
        seen.scatter_(1, input_ids.masked_fill(attention_mask[:, past:] == 0, 0), attention_mask[:, past:].bool())
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    stop_ids = torch.tensor(sorted(stop.token_ids), dtype=torch.long, device=device)
    # Each row's text as it arrives (special tokens included, as decode() writes them), for the
    # stop strings: one host sync per step, only when there are stop strings.
    texts = []
    if stop.strings:
        texts = [
            (StreamDecoder(stop.tokenizer, skip_special_tokens=False), StopText(stop.strings)) for _ in range(batch)
        ]
    step = DecodeStep(model, cache, attention_mask, compile=compile)
    for i in range(max_new_tokens):
        token = sample(logits, sampling, seen, generator)
        token = torch.where(done, torch.full_like(token, pad), token)
        done = done | torch.isin(token, stop_ids)
        if stop.strings:
            for row, t in enumerate(token.tolist()):
                if not done[row]:
                    decoder, matcher = texts[row]
                    if matcher.push(decoder.push(t))[1]:
                        done[row] = True
        yield token, done
        if i + 1 == max_new_tokens or ((i + 1) % check_every == 0 and bool(done.all())):
            return
        if seen is not None:
            seen[torch.arange(batch, device=device), token] = True
        logits = step(token)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop=None,
    tokenizer: Tokenizer | None = None,
    check_memory: bool = True,
    compile: bool = False,
    **image_inputs,
) -> torch.Tensor:
    """The new token ids (batch, new) after the prompt; rows that finished early are padded with
    the checkpoint's pad_token_id (else its first EOS), as transformers' generate pads them.

    stop: strings or token ids (besides the checkpoint's EOS) that end a row; the token that
    completes one is kept, as transformers keeps the EOS. Strings need `tokenizer`.

    Bad arguments raise GenerationError before any work: ids outside the vocabulary, an attention
    mask that is not 0/1 left padding, a sampling setting that is not a finite number in range, a
    seed that is no integer, a prompt that fills the context. check_memory (default True) refuses a
    KV cache for prompt + max_new_tokens larger than the device's available memory (CUDA's free
    memory, the CPU's MemAvailable) before allocating it; check_memory=False skips that check.

    compile: run each decode step under torch.compile (one graph, made on the first call for this
    model and cache size; see steps.py). It pays where a generation is long enough to repay the
    compile (tens of seconds on a CPU), so it is off by default.
    """
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    rules = StopRules.build(stop, defaults_of(model).eos_token_ids, tokenizer)
    steps = generate_steps(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop=rules,
        seed=seed,
        check_memory=check_memory,
        compile=compile,
        check_every=CHECK_EVERY,
        **image_inputs,
    )
    tokens, done = zip(*steps)
    # The steps after the one where every row was done (up to CHECK_EVERY - 1 of them) are padding:
    # cut them, with the one host sync this needs.
    finished = torch.stack(done).all(dim=1)  # (steps,)
    n = int(finished.nonzero()[0]) + 1 if bool(finished.any()) else len(tokens)
    return torch.stack(tokens[:n], dim=1)


CHECK_EVERY = 8  # generate(): decode steps between the host's questions "is every row done?"


def stream(
    model: nn.Module,
    processor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop=None,
    on_token=None,
    cache: KVCache | None = None,
    check_memory: bool = True,
    compile: bool = False,
    **image_inputs,
) -> Iterator[str]:
    """One prompt's answer as text pieces, as the tokens arrive: never half a UTF-8 character,
    special tokens left out, a stop string and what follows it never shown (text that might be
    the start of one is held back until it is not). on_token(id) sees every new id. An id the
    tokenizer lacks (an embedding row past its vocabulary) shows as nothing. The arguments,
    check_memory and compile are generate()'s."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] != 1:
        raise GenerationError(f"stream() takes one prompt; input_ids has {input_ids.shape[0]} rows (use generate)")
    tokenizer = getattr(processor, "tokenizer", processor)
    rules = StopRules.build(stop, defaults_of(model).eos_token_ids, tokenizer)
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
    # Stop strings are matched here, on the text shown (special tokens left out), not by generate_steps.
    matcher, rules.strings = StopText(rules.strings), []
    for token, done in generate_steps(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop=rules,
        seed=seed,
        cache=cache,
        check_memory=check_memory,
        compile=compile,
        **image_inputs,
    ):
        t = int(token[0])
        if on_token is not None:
            on_token(t)
        shown, stopped = matcher.push(decoder.push(t) if t not in rules.token_ids else "")
        if shown:
            yield shown
        if stopped:
            return
        if bool(done[0]):
            break
    shown, stopped = matcher.push(decoder.flush())
    shown += "" if stopped else matcher.flush()
    if shown:
        yield shown
