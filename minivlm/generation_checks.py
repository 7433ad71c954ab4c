"""What generation checks before it runs, so that a bad argument is one clear GenerationError
and not a traceback from deep in the loop: the arguments (new tokens, seed, device), the
attention mask, the context window, and whether the KV cache fits in the memory the device has
left (a cache too big for the machine would otherwise fail inside torch, or get the process
killed by the OS).
"""

from __future__ import annotations

import numbers
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from .decoder import KVCache

if TYPE_CHECKING:
    from .generation import GenerationDefaults


class GenerationError(ValueError):
    """Generation arguments that cannot work; the message says which and what was expected."""


def check_max_new_tokens(max_new_tokens, name: str = "max_new_tokens") -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"{name} {max_new_tokens!r}: expected a positive number of tokens")


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def check_seed(seed, name: str = "seed") -> None:
    """None (a fresh random seed) or an integer torch can seed a generator with."""
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise GenerationError(f"{name} {seed!r}: expected a whole number")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise GenerationError(f"{name} {seed}: expected a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}")


def available_devices() -> list[str]:
    """The devices this machine can run on: cpu, each CUDA GPU, mps."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device, name: str = "device") -> torch.device:
    """A device this machine has (cpu, cuda, cuda:N, mps), or a GenerationError naming those it has.
    "meta" holds no values, so nothing can run on it."""
    here = available_devices()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise GenerationError(f"{name} {device!r}: not a device name; this machine has {', '.join(here)}") from None
    label = str(d) if d.index is not None or d.type in ("cpu", "mps") else f"{d.type}:0"
    if d.type == "cpu":
        return d
    if label not in here:
        raise GenerationError(f"{name} {device!r}: this machine has no such device; it has {', '.join(here)}")
    return d


def check_context(prompt_len: int, max_new_tokens: int, defaults: GenerationDefaults, past: int = 0) -> int:
    """max_new_tokens cut to what the context leaves after the cached tokens and the prompt."""
    check_max_new_tokens(max_new_tokens)
    context = defaults.max_positions
    if context is None:
        return max_new_tokens
    if past + prompt_len >= context:
        what = f"the prompt is {prompt_len} tokens"
        if past:
            what = f"the conversation is {past + prompt_len} tokens ({past} earlier, {prompt_len} new)"
        raise GenerationError(
            f"{what}; the model's context is {context} (max_position_embeddings), so no token is left to generate"
        )
    return min(max_new_tokens, context - past - prompt_len)


def check_prompt(input_ids, max_new_tokens: int, defaults: GenerationDefaults, past: int = 0) -> int:
    """input_ids a (batch > 0, length > 0) tensor; returns max_new_tokens cut to the context (check_context)."""
    check_max_new_tokens(max_new_tokens)
    if not isinstance(input_ids, torch.Tensor):
        raise GenerationError(
            f"input_ids is a {type(input_ids).__name__}; expected a tensor of token ids (batch, length)"
        )
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise GenerationError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch > 0, prompt length > 0)")
    return check_context(input_ids.shape[1], max_new_tokens, defaults, past)


def check_mask(attention_mask: torch.Tensor, shape: tuple[int, int]) -> None:
    """A generation mask: (batch, cached + prompt) of 0 and 1, padding (0) only on the left."""
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise GenerationError(f"attention_mask is {got}; expected a tensor of shape (batch, cached + prompt) = {shape}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise GenerationError("attention_mask holds values other than 0 and 1; expected 1 for a token, 0 for padding")
    if not bool(attention_mask[:, -1].all()):
        raise GenerationError(
            "the batch is padded on the right, so its shorter rows would continue from padding; "
            "pad on the left (processor(..., padding_side='left'))"
        )
    steps = attention_mask[:, 1:].long() - attention_mask[:, :-1].long()  # -1 where a 1 is followed by a 0
    if bool((steps < 0).any()):
        row = int((steps < 0).any(dim=1).nonzero()[0])
        raise GenerationError(
            f"attention_mask row {row} has a 0 between 1s: a hole in a prompt is not padding; "
            "expected 0s only on the left (left padding), then 1s"
        )


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on device (None where it cannot be told): CUDA's free
    memory plus what torch's allocator holds unused; on the CPU, the least of the machine's
    MemAvailable, the process's address-space limit and the container's memory limit."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        limits = [_machine_available(), _address_space_left(), _cgroup_left()]
        known = [n for n in limits if n is not None]
        return min(known) if known else None
    return None


def _machine_available() -> int | None:
    """/proc/meminfo's MemAvailable, else the free pages the C library reports."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> int | None:
    """What this process's address-space limit (ulimit -v, prlimit --as) leaves it."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return max(soft - used, 0)
    except (ImportError, OSError, ValueError):
        return None


def _cgroup_left() -> int | None:
    """What the container's memory limit (cgroup v2 memory.max) leaves."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(int(limit) - int(f.read()), 0)
    except (OSError, ValueError):
        return None


def cache_bytes(model: nn.Module, batch: int, slots: int) -> tuple[int, torch.device]:
    """The bytes of a KV cache of batch rows of slots tokens for model, and the device it goes on."""
    lm = getattr(model, "language_model", model)
    config = lm.config
    weight = lm.model.embed_tokens.weight  # never quantized: the model's dtype and device
    per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * weight.element_size()
    return batch * slots * per_slot, weight.device


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def check_cache_memory(model: nn.Module, batch: int, slots: int, what: str = "") -> None:
    """Refuse a KV cache that does not fit in the memory the device has left, before allocating it
    (torch would fail with a traceback, or the OS kill the process). Skipped where the model has
    no `lm_head` or the device cannot tell its free memory."""
    try:
        need, device = cache_bytes(model, batch, slots)
    except AttributeError:  # a model without the decoder's layout (a test's scripted model)
        return
    have = available_memory(device)
    if have is not None and need > have:
        raise GenerationError(
            f"the KV cache for {batch} row(s) of {slots} tokens{what} needs {_gib(need)}, and {device} has "
            f"{_gib(have)} available; ask for fewer new tokens or a smaller batch "
            "(check_memory=False skips this check)"
        )


def new_cache(model: nn.Module, batch: int, slots: int, check_memory: bool = True, what: str = "") -> KVCache:
    """model.new_cache(batch, slots), its size checked against the free memory first."""
    if check_memory:
        check_cache_memory(model, batch, slots, what)
    try:
        return model.new_cache(batch, slots)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # the check could not see every limit
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "alloc" not in str(e):
            raise
        need, device = cache_bytes(model, batch, slots)
        raise GenerationError(
            f"the KV cache for {batch} row(s) of {slots} tokens{what} ({_gib(need)}) could not be "
            f"allocated on {device}; ask for fewer new tokens or a smaller batch"
        ) from None
