"""The running batch: rows that decode together over one KV cache, joining and leaving at decode
step boundaries (continuous batching).

The cache is laid out as a left-padded batch is: each row's tokens fill consecutive slots that end
at the shared `slot`, the slots before a row's first token are masked out (`kv_valid`), and each
row's RoPE position counts its own tokens only. A request that arrives while others decode is
prefilled alone (a batch of one, as it would be if it ran alone) and its keys and values are
copied into the slots just before the shared slot: to the decode step it is one more left-padded
row. So its greedy tokens are the ones it gets alone, and nobody waits for a batch to end.

Joining or leaving copies the cache into a new layout (rows added or dropped, columns that no row
uses any more cut from the left, room made on the right for the longest answer still to come):
one copy of the cache per join or leave, about what one decode step reads.

Both of the model's paths decode here: the fast path's `decode_step` (static shapes, the slot a
device tensor) and the reference path's forward over the filled slots with the mask.
"""

from __future__ import annotations

import torch

from ..decoder import DecoderLM
from ..generation import Sampling
from ..generation_checks import new_cache
from ..steps import on_fast_path, prefill, sample


class RunningBatch:
    """Rows decoding together. `key` is what a joining request's Job.key() must equal; `rows` are
    the requests (the engine's Jobs: `prompt_tokens`, `max_tokens` and `count` are read here)."""

    def __init__(self, model, key: tuple, sampling: Sampling, seed: int | None, context: int | None):
        self.model, self.key, self.sampling, self.context = model, key, sampling, context
        self.lm = getattr(model, "language_model", model)
        self.fast = on_fast_path(model)
        self.options = {"check_ids": False} if isinstance(self.lm, DecoderLM) else {}
        self.device = self.lm.model.embed_tokens.weight.device
        self.generator = None
        if not sampling.greedy:  # one stream for the batch; a seeded request runs alone (Job.key)
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(int(seed) if seed is not None else torch.seed())
        self.rows: list = []
        self.starts: list[int] = []  # each row's first slot (host values: the layout is the host's)
        self.slot = 0  # the slot the next step writes, shared by every row
        self.cache = None
        self.kv_valid = None  # (rows, cache slots) bool: which slots hold a row's tokens
        self.positions = None  # (rows, 1): each row's tokens so far, its next RoPE position
        self.tokens = None  # (rows,): each row's latest token, which the next step writes
        self.rope = None  # fast path: cos/sin table rows 0 .. rope_len - 1
        self.rope_len = 0

    def __len__(self) -> int:
        return len(self.rows)

    def room_for(self, jobs: list) -> bool:
        """Whether the jobs may join together now: they share the batch's key, and the cache they
        would need beside the rows stays within the context (the columns the rows use, or the
        longest joining prompt, plus the longest answer still to come)."""
        if any(j.key() != self.key for j in jobs):
            return False
        if self.context is None:
            return True
        used = self.slot - min(self.starts, default=self.slot)
        span = max(used, *(j.prompt_tokens for j in jobs))
        return span + max(self._remaining(j) for j in [*self.rows, *jobs]) <= self.context

    def join(self, jobs: list, inputs: dict) -> torch.Tensor:
        """Prefill the jobs' prompts together (inputs: the processor's, collated with left padding,
        as they would be prefilled in a batch of their own), give each a row, and return their
        first tokens (len(jobs),)."""
        mask = inputs["attention_mask"]
        cache = new_cache(self.model, len(jobs), mask.shape[1], what=f" (prompts of {mask.shape[1]})")
        images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        logits = prefill(self.model, inputs["input_ids"], mask, cache, **images)
        tokens = sample(logits, self.sampling, None, self.generator)
        self._relayout(list(range(len(self.rows))), joining=(jobs, cache, mask.bool(), tokens))
        return tokens

    def leave(self, finished: list[int]) -> None:
        """Drop the rows at these indices (finished, or their client gone)."""
        if finished:
            self._relayout([i for i in range(len(self.rows)) if i not in set(finished)])

    def step(self) -> torch.Tensor:
        """One decode step for every row: each row's latest token into the cache, the next tokens
        (rows,) out."""
        if self.fast:
            kv_valid = self.kv_valid if any(self.starts) else None  # no padding: nothing to mask
            self.cache.reach = self.slot + 1  # attend over the filled slots, not the room past them
            logits = self.lm.decode_step(self.tokens, self.positions, self.slot_t, kv_valid, self.rope, self.cache)
            self.slot_t += 1
        else:
            mask = self.kv_valid[:, : self.slot + 1].long()
            logits = self.lm(self.tokens[:, None], mask, cache=self.cache, logits_to_keep=1, **self.options)[:, -1]
        self.positions += 1
        self.slot += 1
        self.cache.length = self.slot
        self.tokens = sample(logits, self.sampling, None, self.generator)
        return self.tokens

    # -- the layout ---------------------------------------------------------------------------

    @staticmethod
    def _remaining(job) -> int:
        """Decode steps the job may still take: one a token after its first."""
        return max(0, job.max_tokens - max(job.count, 1))

    def _relayout(self, keep: list[int], joining: tuple | None = None) -> None:
        """Copy the kept rows (and the joining ones) into a cache just large enough: the columns
        left of every kept row's first slot are cut, and the shared slot moves right where the
        joining prompts need more columns than the kept rows use.

        joining: (jobs, their prefilled cache (n rows of `width` slots), its mask (n, width) bool,
        their first tokens (n,))."""
        jobs, own, own_mask, own_tokens = joining or ([], None, None, None)
        rows = [self.rows[i] for i in keep] + jobs
        if not rows:  # the batch is over; the engine starts the next one afresh
            self.rows, self.starts, self.cache = [], [], None
            return
        used = self.slot - min([self.starts[i] for i in keep], default=self.slot)  # columns the kept rows use
        width = own_mask.shape[1] if jobs else 0
        slot = max(used, width)
        shift = slot - self.slot  # old column c -> new column c + shift
        slots = slot + max(self._remaining(j) for j in rows)
        cache = new_cache(self.model, len(rows), max(slots, slot + 1), what=" (the running batch)")
        kv_valid = torch.zeros(len(rows), cache.max_len, dtype=torch.bool, device=self.device)
        kv_valid[:, slot:] = True  # every row writes every step from here on
        n, index = len(keep), torch.tensor(keep, dtype=torch.long, device=self.device)
        old, new = slice(self.slot - used, self.slot), slice(slot - used, slot)  # the kept rows' columns
        joined = slice(slot - width, slot)  # the joining rows' columns
        for name in ("keys", "values"):
            for layer, tensor in enumerate(getattr(cache, name)):  # (rows, kv_heads, slots, head_dim)
                if n:
                    tensor[:n, :, new] = getattr(self.cache, name)[layer][index, :, old]
                if jobs:
                    tensor[n:, :, joined] = getattr(own, name)[layer]
        positions, tokens = [], []
        if n:
            kv_valid[:n, new] = self.kv_valid[index][:, old]
            positions.append(self.positions[index])
            tokens.append(self.tokens[index])
        if jobs:
            kv_valid[n:, joined] = own_mask
            positions.append(own_mask.sum(dim=1, keepdim=True))
            tokens.append(own_tokens)
        self.rows = rows
        self.starts = [self.starts[i] + shift for i in keep] + [slot - j.prompt_tokens for j in jobs]
        self.cache, self.kv_valid, self.slot = cache, kv_valid, slot
        self.cache.length = slot
        self.positions, self.tokens = torch.cat(positions), torch.cat(tokens)
        self.slot_t = torch.tensor([slot], device=self.device)
        if self.fast:
            longest = max(j.prompt_tokens + j.max_tokens for j in rows)
            if longest > self.rope_len:  # positions reach prompt + max_tokens - 1 at most; grown by doubling
                self.rope_len = max(longest, 2 * self.rope_len)
                self.rope = self.lm.model.rope_table(self.rope_len, self.lm.model.embed_tokens.weight.dtype)
