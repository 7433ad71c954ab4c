"""The named steps of generation, as gpt-fast names them: `prefill` runs the prompt (images
included) into the KV cache and gives the last position's logits, `DecodeStep` runs one token per
row against the cache, `sample` chooses the next tokens from logits. generation.py's loop strings
them together and decides when to stop.

A decode step takes one of two paths, as the model's kernel choice says (ops.py):
- the fast path ("auto", "on"): `DecoderLM.decode_step`, with static shapes and no host value that
  changes from step to step (the cache slot and each row's position are device tensors the step
  advances in place, cos/sin are rows of a table made once). `compile=True` wraps it in
  torch.compile: inductor on the CPU, CUDA graphs (mode "reduce-overhead") on CUDA, one graph for
  every step;
- the reference path ("off"): the model's forward over the filled slots, transformers'
  arithmetic, which parity is measured on. It stays eager.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from .decoder import DecoderLM, KVCache
from .generation_checks import GenerationError

# -- choosing the next token -------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the last logits. temperature 0: greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise GenerationError(f"{name} {value!r}: expected a finite number")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise GenerationError(f"top_k {self.top_k!r}: expected a whole number (0 is off)")
        if self.temperature < 0:
            raise GenerationError(f"temperature {self.temperature}: expected 0 (greedy) or more")
        if self.top_k < 0:
            raise GenerationError(f"top_k {self.top_k}: expected 0 (off) or a positive count")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p {self.top_p}: expected a probability mass in (0, 1]")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty {self.repetition_penalty}: expected more than 0 (1 is off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (batch, vocab); seen (batch, vocab) bool: tokens already in the row. A seen token's
    logit is divided by the penalty if positive and multiplied by it if negative (CTRL's rule)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (all that tie with the k-th too); the rest -> -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities sum to at least p (at least one token);
    the rest -> -inf. As transformers: drop, from the least likely up, while the mass dropped
    stays at or below 1 - p."""
    ascending, order = torch.sort(logits, dim=-1)
    dropped_mass = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = dropped_mass <= 1 - p
    drop[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, sampling: Sampling, seen: torch.Tensor | None, generator) -> torch.Tensor:
    """The `sample` step: logits (batch, vocab) of the last position -> (batch,) token ids. seen
    (batch, vocab) bool: the tokens of each row so far, for the repetition penalty."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        logits = apply_top_k(logits, sampling.top_k)
    if sampling.top_p < 1.0:
        logits = apply_top_p(logits, sampling.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# -- prefill and decode -----------------------------------------------------------------------


def prefill(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache, **image_inputs
) -> torch.Tensor:
    """The `prefill` step: the prompt (and its images) into the cache -> the last position's logits
    (batch, vocab). Refuses logits that hold NaN or +inf (-inf is a masked token, not a fault):
    checked here once, so no decode step has to sync the host for it."""
    logits = model(input_ids, attention_mask, cache=cache, logits_to_keep=1, **image_inputs)[:, -1]
    if bool((logits.isnan() | logits.isposinf()).any()):
        raise GenerationError(
            "the model's logits for the prompt hold NaN or +inf: its weights or inputs do "
            "(python -m minivlm doctor PATH lists NaN/Inf weights)"
        )
    return logits


class DecodeStep:
    """The `decode_step`: the new token of every row in (batch,), the next logits out (batch, vocab),
    the cache one slot fuller. A VLM decodes with its language model alone: a generated token is
    text, even one that happens to be the image token's id (as in transformers).

    attention_mask (batch, cached): the mask of everything in the cache after the prefill; every
    token the steps add is real. compile: wrap the fast path's step in torch.compile.
    """

    def __init__(self, model: nn.Module, cache: KVCache, attention_mask: torch.Tensor, compile: bool = False):
        self.model, self.cache = getattr(model, "language_model", model), cache
        # Without padding the mask says nothing that positions 0, 1, 2, ... do not: leave it out,
        # and each step is spared applying it (one host sync here, not one a step).
        padded = not bool(attention_mask.all())
        self.fast = on_fast_path(model)
        if compile:
            check_compile(model)
        if not self.fast:  # the reference: the model's forward, its mask grown by a column a step
            self.mask = attention_mask if padded else None
            # Sampled ids are rows of lm_head, so inside the vocabulary: skip the check (a host sync).
            self.options = {"check_ids": False} if isinstance(self.model, DecoderLM) else {}
            return
        batch, device = attention_mask.shape[0], attention_mask.device
        self.kv_valid = None  # (batch, max_len): which slots hold real tokens
        if padded:
            self.kv_valid = torch.ones(batch, cache.max_len, dtype=torch.bool, device=device)
            self.kv_valid[:, : attention_mask.shape[1]] = attention_mask.bool()
        self.positions = attention_mask.sum(dim=1, keepdim=True)  # (batch, 1): real tokens so far
        self.slot = torch.tensor([cache.length], device=device)  # (1,): where the next token goes
        self.rope = self.model.model.rope_table(cache.max_len, self.model.model.embed_tokens.weight.dtype)
        self.step, self.compiled = self.model.decode_step, compile
        if compile:
            cache.reach = None  # the whole cache: one shape for every step
            self.step = compiled_decode_step(self.model)
            if device.type == "cuda":  # CUDA graphs read these in place instead of copying them every replay
                for t in (*cache.keys, *cache.values, *self.rope, *([self.kv_valid] if padded else [])):
                    torch._dynamo.mark_static_address(t)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            if self.mask is None:
                return self.model(token[:, None], cache=self.cache, logits_to_keep=1, **self.options)[:, -1]
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            return self.model(token[:, None], self.mask, cache=self.cache, logits_to_keep=1, **self.options)[:, -1]
        if not self.compiled:  # eager: attend over the filled slots only (a compiled step keeps its shapes)
            self.cache.reach = self.cache.length + 1
        logits = self.step(token, self.positions, self.slot, self.kv_valid, self.rope, self.cache)
        self.positions += 1
        self.slot += 1
        self.cache.length += 1  # the host's count: known without asking the device
        return logits


def on_fast_path(model: nn.Module) -> bool:
    """Whether the model decodes on the fast path (its kernel choice is not "off")."""
    lm = getattr(model, "language_model", model)
    return isinstance(lm, DecoderLM) and lm.kernels != "off"


def check_compile(model: nn.Module) -> None:
    """compile=True needs the fast path: say so before the prefill, not after. Nor does inductor
    (torch 2.13) compile torch's CPU int8 kernel fed activations it rounds to bf16 itself: int8 on
    the CPU compiles in bfloat16 only."""
    if not on_fast_path(model):
        raise GenerationError(
            "compile=True compiles the fast path's decode step; this model runs the reference path "
            "(kernels='off' or MINIVLM_KERNELS=0), which stays eager: load it with kernels='auto'"
        )
    from .quant import QuantLinear, model_dtype

    int8_on_cpu = any(
        isinstance(m, QuantLinear) and m.scheme == "int8" and m.cpu_kernel_fits and m.scales.device.type == "cpu"
        for m in getattr(model, "language_model", model).modules()
    )
    if int8_on_cpu and model_dtype(model) != torch.bfloat16:
        raise GenerationError(
            f"compile=True with int8 weights on the CPU needs dtype=bfloat16 (this model is {model_dtype(model)}): "
            "torch's compiler cannot compile its int8 kernel after the rounding of the activations to bf16; "
            "load in bfloat16, or leave compile off"
        )


def compiled_decode_step(model: DecoderLM):
    """model.decode_step under torch.compile, made once per model and kept on it: inductor on the
    CPU, CUDA graphs on CUDA. The whole step is one graph (fullgraph=True: a graph break is an
    error, not a silent slowdown); static shapes, so a new cache size compiles again."""
    compiled = model.__dict__.get("_compiled_decode_step")
    if compiled is None:
        mode = "reduce-overhead" if model.model.embed_tokens.weight.is_cuda else None
        compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)
        model.__dict__["_compiled_decode_step"] = compiled
    return compiled
