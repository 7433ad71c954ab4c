"""Tensor parallelism over torch.distributed (Megatron's layout): the decoder is split across the
ranks of the initialised process group (gloo on the CPU, NCCL on CUDA), and each rank holds 1/N
of every split tensor, read from the checkpoint as that slice alone.

- q/k/v and gate/up are column-parallel: a rank computes its own query and KV heads and its slice
  of the MLP's width, so its KV cache holds only its KV heads. The model is built from a rank-local
  config (heads, KV heads and MLP width divided by N); attention needs no change.
- o_proj and down_proj are row-parallel: a rank multiplies its slice of the inputs, and one
  all-reduce sums the partial outputs; a bias is added once, after the sum. Two all-reduces of
  (batch, seq, hidden) per decoder layer per forward.
- embed_tokens and lm_head are split by vocabulary: a rank looks up the ids in its range (zeros for
  the rest, one all-reduce), and computes the logits of its range (all-gathered). A vocabulary that
  N does not divide is padded to a multiple of N with zero rows whose logits are cut off.
- The vision tower and the connector are replicated on every rank: they run once per image, are a
  small part of the weights next to the decoders that need splitting (SigLIP so400m is 0.4B beside
  a 34-110B decoder), and splitting them would add two all-reduces per vision layer.

Every rank computes the same logits, so greedy decoding agrees without a broadcast; sampling draws
from a seed that rank 0 chooses when none is given (`shared_seed`).

Two clocks (`join_group`): the model's collectives run in step, so a peer that has not answered
within MINIVLM_DIST_TIMEOUT seconds (20) is hung, and this rank says so instead of hanging too. Joining,
waiting for the slowest rank's load, and a chat waiting for its user are not hangs: they use the
default group, whose timeout is a week (a peer that dies still ends them at once: its sockets close).
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import TextConfig


class ParallelError(ValueError):
    """A model or a process group that tensor parallelism cannot split, or ranks that disagree."""


@dataclass(frozen=True)
class Shard:
    """This rank's place: `rank` of `world`."""

    rank: int
    world: int

    def range(self, size: int) -> tuple[int, int]:
        """The [start, stop) of a dimension of `size` (a multiple of world) that this rank holds."""
        part = size // self.world
        return self.rank * part, (self.rank + 1) * part


def current_shard() -> Shard:
    """The initialised process group's rank and size, or ParallelError when there is none."""
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError(
            "tensor_parallel=True needs an initialised process group: run under torchrun "
            "(torchrun --nproc-per-node N -m minivlm generate ...), or call "
            "torch.distributed.init_process_group first"
        )
    return Shard(dist.get_rank(), dist.get_world_size())


PATIENT = timedelta(days=7)  # the default group's timeout under join_group: waits that are not hangs
_STEPS: list = [None]  # the group of the collectives that run in step (join_group); None: the default group


def join_group(device: torch.device, timeout: float = 20) -> Shard | None:
    """Under torchrun (WORLD_SIZE > 1): the process group, joined once (NCCL on CUDA, each rank on
    its LOCAL_RANK's GPU; gloo on the CPU), and this rank's place; one process: None. Two groups of
    every rank: the default one, patient (PATIENT: joining, loading, a chat's user), and one for
    the collectives that run in step (`collective`), where a peer silent for MINIVLM_DIST_TIMEOUT
    seconds (default `timeout`) ends this rank with an error instead of a hang. Training joins
    through here too."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    if not dist.is_initialized():
        seconds = step_timeout(timeout)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PATIENT)
        _STEPS[0] = dist.new_group(backend=backend, timeout=timedelta(seconds=seconds))
        # Left to the interpreter's exit, gloo's threads can abort the process (SIGABRT) after
        # its work is done: leave the group first.
        atexit.register(leave_group)
    return current_shard()


def step_timeout(default: float) -> float:
    """MINIVLM_DIST_TIMEOUT in seconds (a positive number), else `default`."""
    text = os.environ.get("MINIVLM_DIST_TIMEOUT", "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= PATIENT.total_seconds()):
        raise ParallelError(
            f"MINIVLM_DIST_TIMEOUT is {text!r}; it is how many seconds a peer may stay silent during "
            f"generation before the run ends: a number above 0 and at most {PATIENT.total_seconds():.0f}"
        )
    return seconds


def steps_group():
    """The group of the collectives that run in step: join_group's, or None (the default group: a
    group the caller initialised, with its own timeout)."""
    return _STEPS[0]


def leave_group() -> None:
    """Leave the process group (what a script that initialised one should do before it exits:
    gloo's threads, left to the interpreter's exit, can abort a finished process)."""
    _STEPS[0] = None
    if dist.is_initialized():
        dist.destroy_process_group()


_ERRORS = [None]  # where this process's errors go once quiet_rank has silenced it


def quiet_rank(shard: Shard | None) -> None:
    """Rank 0 alone prints: the others' stdout and stderr go to /dev/null (their errors still
    reach the terminal, through error_stream)."""
    if shard is not None and shard.rank != 0 and _ERRORS[0] is None:
        _ERRORS[0] = sys.stderr
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)


def error_stream():
    """Where an error of this process is printed: stderr, or the real one on a silenced rank."""
    return _ERRORS[0] or sys.stderr


def rank_label() -> str:
    """ "rank N: " on a rank of torchrun's other than 0 (its errors are told apart from rank 0's),
    before the group is joined too; else nothing."""
    rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
    return f"rank {rank}: " if rank != "0" else ""


def padded_vocab(vocab: int, world: int) -> int:
    return -(-vocab // world) * world


def local_config(text: TextConfig, shard: Shard) -> TextConfig:
    """The decoder config of one rank: heads, KV heads and the MLP's width divided by the world
    size (the vocabulary stays whole here: the embedding and lm_head are swapped afterwards)."""
    for name, value in (
        ("num_attention_heads", text.num_heads),
        ("num_key_value_heads", text.num_kv_heads),
        ("intermediate_size", text.intermediate_size),
    ):
        if value % shard.world:
            raise ParallelError(
                f"tensor parallelism over {shard.world} processes splits {name} ({value}) evenly, and "
                f"{shard.world} does not divide it; use a world size that divides all of "
                f"{text.num_heads} heads, {text.num_kv_heads} KV heads and the MLP's width {text.intermediate_size}"
            )
    return dataclasses.replace(
        text,
        num_heads=text.num_heads // shard.world,
        num_kv_heads=text.num_kv_heads // shard.world,
        intermediate_size=text.intermediate_size // shard.world,
    )


# -- the split layers ---------------------------------------------------------------------------


def collective(op, *args, patient: bool = False) -> None:
    """Run a collective: in step (the steps group's timeout), or `patient` (the default group: a
    wait that is not a hang). A peer that stopped (killed, failed on its own, or silent past the
    timeout) becomes one clear error on this rank instead of the backend's traceback."""
    try:
        op(*args, group=None if patient else steps_group())
    except RuntimeError as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise ParallelError(
            "another process of the tensor-parallel group stopped, failed or stayed silent past its "
            f"timeout, so this one cannot go on ({type(e).__name__}: {first})"
        ) from None


def meet() -> None:
    """Wait for every rank (patiently): after loading, so that the slowest rank's load is not taken
    for a hang by the first collective in step."""
    collective(dist.barrier, patient=True)


class RowParallelLinear(ops.Linear):
    """A linear layer holding columns [start, stop) of the full weight: the partial products of every
    rank are summed (one all-reduce), then the bias is added once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = ops.linear(x, self.weight, None, self.kernels)
        collective(dist.all_reduce, out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + num_embeddings) of the vocabulary's embedding; ids outside the range
    look up zeros, and the all-reduce fills each position from the rank that holds its id."""

    def __init__(self, rows: int, dim: int, start: int):
        super().__init__(rows, dim)
        self.start = start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0)
        collective(dist.all_reduce, out)
        return out


class VocabParallelHead(ops.Linear):
    """lm_head rows [start, start + out_features): each rank's logits, gathered into the whole
    vocabulary's (the padding past `vocab` cut off)."""

    def __init__(self, hidden: int, rows: int, vocab: int, world: int):
        super().__init__(hidden, rows, bias=False)
        self.vocab, self.world = vocab, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = ops.linear(x, self.weight, None, self.kernels).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        collective(dist.all_gather, parts, local)
        return torch.cat(parts, dim=-1)[..., : self.vocab]


def split_decoder(lm: nn.Module, full: TextConfig, shard: Shard) -> None:
    """Swap the row-parallel and vocabulary layers into a decoder (a DecoderLM built from
    `local_config`, on the meta device); the column-parallel layers have their local shapes already."""
    rows = padded_vocab(full.vocab_size, shard.world) // shard.world
    for layer in lm.model.layers:
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            old = getattr(parent, name)
            setattr(parent, name, RowParallelLinear(old.in_features, old.out_features, bias=old.bias is not None))
    lm.model.embed_tokens = VocabParallelEmbedding(rows, full.hidden_size, shard.rank * rows)
    lm.lm_head = VocabParallelHead(full.hidden_size, rows, full.vocab_size, shard.world)
    if full.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight


def decoder_slices(full: TextConfig, shard: Shard, prefix: str = "") -> dict[str, tuple[int, int, int, int]]:
    """How this rank reads each split tensor of the decoder: {module name: (dim, start, stop, full
    size along dim)}; `prefix` is the decoder's place in the model ("language_model." in a VLM)."""
    q_size, kv_size = full.num_heads * full.head_dim, full.num_kv_heads * full.head_dim
    q, kv, width = (
        (0, *shard.range(q_size), q_size),
        (0, *shard.range(kv_size), kv_size),
        (0, *shard.range(full.intermediate_size), full.intermediate_size),
    )
    slices = {}
    for i in range(full.num_layers):
        at = f"{prefix}model.layers.{i}."
        for name, spec, bias in (
            ("self_attn.q_proj", q, full.qkv_bias),
            ("self_attn.k_proj", kv, full.qkv_bias),
            ("self_attn.v_proj", kv, full.qkv_bias),
            ("mlp.gate_proj", width, full.mlp_bias),
            ("mlp.up_proj", width, full.mlp_bias),
        ):
            slices[f"{at}{name}.weight"] = spec
            if bias:
                slices[f"{at}{name}.bias"] = spec
        slices[f"{at}self_attn.o_proj.weight"] = (1, *q[1:])  # row-parallel: split along the inputs
        slices[f"{at}mlp.down_proj.weight"] = (1, *width[1:])
    rows = padded_vocab(full.vocab_size, shard.world) // shard.world
    vocab = (0, shard.rank * rows, (shard.rank + 1) * rows, full.vocab_size)
    slices[f"{prefix}model.embed_tokens.weight"] = vocab
    slices[f"{prefix}lm_head.weight"] = vocab
    return slices


# -- agreeing ------------------------------------------------------------------------------------


def fingerprint(folder: Path) -> str:
    """What every rank must agree on: the bytes of the files minivlm reads beside the weights
    (config.json, the tokenizer, the chat template, generation_config.json, the preprocessor's
    config, ...) and every tensor's name, shape and dtype. (Not the weights' bytes: gigabytes.)"""
    from .checkpoint import find_tensors

    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".jinja", ".model", ".txt", ".tiktoken"):
            digest.update(f"{path.name}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    headers = sorted((e.key, list(e.shape), str(e.dtype)) for e in find_tensors(folder).values())
    digest.update(json.dumps(headers).encode())
    return digest.hexdigest()


def check_same_checkpoint(folder: Path, shard: Shard) -> None:
    """Refuse ranks that opened different checkpoints (a path that names other files on another
    machine), by name, on every rank."""
    mine = fingerprint(folder)
    theirs: list = [None] * shard.world
    collective(dist.all_gather_object, theirs, (str(folder), mine), patient=True)
    if len({f for _, f in theirs}) > 1:
        listing = "; ".join(f"rank {r}: {path} ({f[:12]})" for r, (path, f) in enumerate(theirs))
        raise ParallelError(
            "the ranks opened different checkpoints (their config, tokenizer, template or other files, "
            f"or their tensors' names, shapes or dtypes differ): {listing}"
        )


def check_same_call(model: nn.Module, *inputs) -> None:
    """Under tensor parallelism every rank must make the same call with the same inputs (tensors,
    settings): ranks that do not would pair unrelated collectives and abort in the backend. One
    exchange of digests per call says so instead. Elsewhere nothing."""
    shard = getattr(model, "tensor_parallel", None)
    if shard is None:
        return
    digest = hashlib.sha256()
    for value in inputs:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    theirs: list = [None] * shard.world
    collective(dist.all_gather_object, theirs, digest.hexdigest(), patient=True)
    if len(set(theirs)) > 1:
        groups = {}
        for rank, d in enumerate(theirs):
            groups.setdefault(d, []).append(rank)
        alike = "; ".join("rank" + ("s " if len(r) > 1 else " ") + ", ".join(map(str, r)) for r in groups.values())
        raise ParallelError(
            f"the ranks called generate with different inputs or settings (alike: {alike}): under tensor "
            "parallelism every rank makes the same call, with the same prompt, images and settings, and reads "
            "a stream to the same point"
        )


def shared_seed(model: nn.Module, seed: int | None) -> int | None:
    """Under tensor parallelism every rank must draw the same tokens: without a seed, rank 0's
    fresh one is broadcast. Elsewhere the seed as given."""
    if seed is not None or getattr(model, "tensor_parallel", None) is None:
        return seed
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([torch.seed() % 2**62 if dist.get_rank() == 0 else 0], dtype=torch.long, device=device)
    collective(dist.broadcast, value, 0)
    return int(value)


def from_rank0(model: nn.Module, read):
    """`read()` on rank 0, its value (or the exception it raised) sent to every rank: a chat's typed
    line and its images, which only rank 0's terminal and disk are sure to have. Patient: the user
    may take their time. One process: read() as it is."""
    shard = getattr(model, "tensor_parallel", None)
    if shard is None:
        return read()
    box: list = [None]
    if shard.rank == 0:
        try:
            box = [(True, read())]
        except Exception as e:  # every rank raises it (a bad image path is the chat's to report)
            box = [(False, e)]
    collective(dist.broadcast_object_list, box, 0, patient=True)
    ok, value = box[0]
    if not ok:
        raise value
    return value
