"""The training loop: LLaVA's stage 1 (the connector alone), stage 2 with LoRA, or the connector
and decoder together, on one process or several (torchrun: data parallel over torch.distributed).

    from minivlm.training import TrainConfig, train
    state = train(model, processor, train_examples, TrainConfig(train="connector", max_steps=300), eval_examples)
    # `model` is trained in place; state.history holds every step's loss

One optimizer step takes `batch_size x grad_accum x world_size` examples, in an order drawn from
the seed. Every micro-batch's summed token loss is divided by the token count of the whole step
(over accumulation and ranks), and each rank's gradients are summed over the ranks, so a step's
gradient is that of the mean over every learned token of the step: the same as one process with
the whole batch, whatever the split. AdamW, linear warmup then cosine decay to zero, gradient
clipping by global norm, optional bf16 autocast and gradient checkpointing.

Determinism: the seed fixes the LoRA initialisation, the example order and dropout; a run resumed
from a state file (save_state) continues bit for bit as the uninterrupted run would have, on the
same machine and thread count.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..generation import defaults_of
from ..parallel import join_group, meet, steps_group
from .data import Example, check_examples, collate, encode
from .labels import IGNORE
from .lora import LoraConfig, apply_lora, lora_layers
from .loss import loss_sum

MODES = ("connector", "lora", "all")
DEFAULT_LR = {"connector": 1e-3, "lora": 2e-4, "all": 2e-5}  # LLaVA-1.5's stage 1, its LoRA and full stage 2


class TrainError(ValueError):
    """A training setting or state that cannot be used, with what was expected."""


@dataclass(frozen=True)
class TrainConfig:
    train: str = "connector"  # what learns: "connector", "lora" (the decoder's projections), "all"
    max_steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: int = 1
    batch_size: int = 1  # examples per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # None: DEFAULT_LR of the mode
    weight_decay: float = 0.0
    warmup: float = 0.03  # the fraction of the steps over which the rate rises linearly from 0
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    bf16: bool = False  # autocast the forward pass to bfloat16 (the weights stay in their dtype)
    gradient_checkpointing: bool = False
    eval_every: int | None = None  # steps between held-out evaluations (and one at the end); None: at the end
    save_every: int | None = None  # steps between resumable state files (state_dir); None: none
    state_dir: str | None = None
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: bool = True  # a progress line on stderr (rank 0)

    def __post_init__(self):
        if self.train not in MODES:
            raise TrainError(f"train={self.train!r}: expected one of {list(MODES)}")
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainError(f"{name}={value!r}: expected a whole number of at least 1")
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TrainError(f"{name}={value!r}: expected a whole number of at least 1, or None")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"lr={self.lr!r}: expected a positive finite number")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise TrainError(f"weight_decay={self.weight_decay!r}: expected a finite number of at least 0")
        if self.max_grad_norm is not None and not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise TrainError(f"max_grad_norm={self.max_grad_norm!r}: expected a positive finite number, or None")
        if not 0 <= self.warmup < 1:
            raise TrainError(f"warmup={self.warmup!r}: expected a fraction of the steps in [0, 1)")
        if self.save_every is not None and self.state_dir is None:
            raise TrainError("save_every needs state_dir: where the state files go")

    def run_fields(self) -> dict:
        """What decides the run's order and arithmetic: a resumed run must have the same."""
        fields = ("train", "max_steps", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup",
                  "max_grad_norm", "seed", "lora")  # fmt: skip
        return {f: repr(getattr(self, f)) for f in fields}

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.train]


# ---------------------------------------------------------------------------------------------
# What learns


def connector_parameters(model: nn.Module) -> list[str]:
    """The connector's parameter names: the projector, and LLaVA-NeXT's image_newline (a learned
    embedding in the connector's output space, trained with it)."""
    return [n for n, _ in model.named_parameters() if n.startswith("multi_modal_projector.") or n == "image_newline"]


def prepare(model: nn.Module, config: TrainConfig) -> list[str]:
    """Freeze the model but for what `config.train` names (LoRA layers are added for "lora");
    returns the trainable parameters' names. "all" is LLaVA's full stage 2: the connector and
    the decoder learn, the vision tower stays frozen."""
    if getattr(model, "quantization", None) is not None:
        raise TrainError("a quantized model cannot be trained here; load it in full precision")
    if not hasattr(model, "multi_modal_projector") and config.train == "connector":
        raise TrainError("a text-only model has no connector; train it with 'lora' or 'all'")
    if config.train == "lora":
        torch.manual_seed(config.seed)  # LoRA's A matrices: the same for the same seed
        apply_lora(model, config.lora)
    for p in model.parameters():
        p.requires_grad_(False)
    if config.train == "connector":
        names = connector_parameters(model)
    elif config.train == "lora":
        names = [f"{layer}.{ab}.weight" for layer in lora_layers(model) for ab in ("lora_A", "lora_B")]
    else:
        names = [n for n, _ in model.named_parameters() if not n.startswith("vision_tower.")]
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    for module in model.modules():  # activations recomputed in the backward pass instead of kept
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = config.gradient_checkpointing
    return names


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """The learning rate's factor at `step` (0-based): linear from 0 over `warmup` steps, then a
    cosine down to 0 at `total` (transformers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup  # the first step learns at 1/warmup, not at 0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def join_world(device: torch.device) -> World:
    """The torchrun process group (parallel.join_group), joined once; one process: no group.
    A rank silent in a step makes the others fail within MINIVLM_DIST_TIMEOUT seconds (60), not
    hang; loading, checking and rank 0's writing of a state file are waited for patiently."""
    shard = join_group(device, timeout=60)
    return World() if shard is None else World(shard.rank, shard.world)


def all_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        try:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=steps_group())  # in step: a silent peer is hung
        except RuntimeError as e:  # a rank that stopped: its own error is above, this one says so
            raise TrainError(f"rank {world.rank}: another process stopped, so training cannot go on ({e})") from None
    return value


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class State:
    """What a resumed run needs: the step, the trainable weights, the optimizer's moments, the
    RNG streams (dropout) and the losses so far."""

    step: int = 0
    history: list = field(default_factory=list)  # one dict per step: step, loss, lr, grad_norm (eval_loss)


def step_batches(examples: list[Example], config: TrainConfig, world: World, step: int, per_epoch: int):
    """The micro-batches (lists of examples) this rank takes at optimizer step `step`: the step's
    `batch_size x grad_accum x world` examples of the epoch's seeded order, micro-batch a of rank r
    being the r-th slice of the step's a-th `batch_size x world`."""
    epoch, within = divmod(step, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
    per_step = config.batch_size * config.grad_accum * world.size
    chunk = order[within * per_step : (within + 1) * per_step]
    out = []
    for a in range(config.grad_accum):
        group = chunk[a * config.batch_size * world.size : (a + 1) * config.batch_size * world.size]
        mine = group[world.rank * config.batch_size : (world.rank + 1) * config.batch_size]
        if mine:
            out.append([examples[i] for i in mine])
    return out


def train(
    model: nn.Module,
    processor,
    examples: list[Example],
    config: TrainConfig = TrainConfig(),
    eval_examples: list[Example] = (),
    resume: str | os.PathLike | None = None,
) -> State:
    """Train `model` in place on `examples` (training.data.read_llava_json) as `config` says;
    returns the state: the step reached and the loss of every step. `resume`: a state file written
    by this function (config.save_every) to go on from."""
    device = next(model.parameters()).device
    world = join_world(device)
    if not examples:
        raise TrainError("no training examples")
    names = prepare(model, config)
    params = dict(model.named_parameters())
    trainable = [params[n] for n in names]
    decay = [params[n] for n in names if params[n].dim() >= 2]  # matrices decay; biases and norms do not
    rest = [params[n] for n in names if params[n].dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    per_step = config.batch_size * config.grad_accum * world.size
    per_epoch = math.ceil(len(examples) / per_step)
    total = config.max_steps or per_epoch * config.epochs
    warmup = round(config.warmup * total)
    state = State()
    if resume is not None:
        state = load_state(resume, model, optimizer, names, config, world)
    pad_id, eos = pad_token_id(processor), end_token(model, processor)
    max_length = defaults_of(model).max_positions
    check_examples(processor, [*examples, *eval_examples], eos, max_length)  # every example, before any step
    if world.size > 1:
        meet()  # the slowest rank's loading and checking is not a hang: from here the ranks run in step
    progress = Progress(total, enabled=config.log and world.main)
    model.train()
    try:
        while state.step < total:
            rate = config.learning_rate * cosine_schedule(state.step, total, warmup)
            for group in optimizer.param_groups:
                group["lr"] = rate
            micro = step_batches(examples, config, world, state.step, per_epoch)
            batches = [
                collate([encode(processor, e, eos, max_length) for e in part], pad_id, processor.rows_first)
                for part in micro
            ]
            batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
            count = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            seen = sum(int(b["attention_mask"].sum()) for b in batches)
            count, seen = (int(x) for x in all_sum(torch.tensor([float(count), float(seen)]), world))
            if count == 0:
                raise TrainError(f"step {state.step}: its examples have no assistant token to learn")
            optimizer.zero_grad(set_to_none=True)
            total_loss = torch.zeros((), dtype=torch.float64)
            for batch in batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    summed, _ = loss_sum(model, **batch)
                if summed.requires_grad:  # text-only rows under "connector": nothing trainable in their path
                    (summed / count).backward()
                total_loss += summed.detach().double().cpu()
            for p in trainable:  # the gradient of the whole step's mean: summed over the ranks
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                all_sum(p.grad, world)
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
                if config.max_grad_norm is not None
                else float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable])))
            )
            optimizer.step()
            step_loss = float(all_sum(total_loss, world)) / count
            if not math.isfinite(step_loss):
                raise TrainError(
                    f"step {state.step}: the loss is {step_loss}; lower the learning rate or check the data"
                )
            state.step += 1
            record = {"step": state.step, "loss": step_loss, "lr": rate, "grad_norm": grad_norm, "tokens": seen}
            if eval_examples and (state.step == total or (config.eval_every and state.step % config.eval_every == 0)):
                record["eval_loss"] = evaluate(model, processor, eval_examples, config, world)
                model.train()
            state.history.append(record)
            progress.update(record)
            saving = config.save_every and (state.step % config.save_every == 0 or state.step == total)
            if saving and world.main:
                save_state(
                    Path(config.state_dir) / f"step-{state.step}.safetensors",
                    model,
                    optimizer,
                    names,
                    state,
                    config,
                    world,
                )
            if saving and world.size > 1:
                meet()  # the others wait for rank 0's writing (minutes for a large model) patiently
    finally:
        progress.close()
        model.eval()
    bad = [n for n in names if not bool(params[n].isfinite().all())]
    if bad:
        raise TrainError(f"training left non-finite weights in {bad[:3]}; lower the learning rate (nothing saved)")
    return state


@torch.no_grad()
def evaluate(model: nn.Module, processor, examples: list[Example], config: TrainConfig, world: World) -> float:
    """The mean token loss over the held-out examples (each rank takes its share)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    mine = examples[world.rank :: world.size]
    pad_id, eos, max_length = pad_token_id(processor), end_token(model, processor), defaults_of(model).max_positions
    for i in range(0, len(mine), config.batch_size):
        items = [encode(processor, e, eos, max_length) for e in mine[i : i + config.batch_size]]
        batch = collate(items, pad_id, processor.rows_first)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            summed, n = loss_sum(model, **{k: v.to(device) for k, v in batch.items()})
        total += summed.double().cpu()
        count += n
    return float(all_sum(total, world) / all_sum(count, world).clamp(min=1))


def end_token(model: nn.Module, processor) -> str | None:
    """What closes an answer the chat template leaves open: the tokenizer config's eos_token, else
    the first end-of-sequence id of the checkpoint's generation config, as text."""
    if processor.special_tokens.get("eos_token"):
        return processor.special_tokens["eos_token"]
    ids = defaults_of(model).eos_token_ids
    return next((t for t, i in processor.tokenizer.token_to_id.items() if ids and i == ids[0]), None)


def pad_token_id(processor) -> int:
    """The id that pads a batch's rows (their labels are IGNORE and their attention 0, so any id
    serves): the pad token, else the end-of-sequence token, else 0."""
    tokens = processor.special_tokens
    for name in ("pad_token", "eos_token"):
        if tokens.get(name) in processor.tokenizer.token_to_id:
            return processor.tokenizer.token_to_id[tokens[name]]
    return 0


# ---------------------------------------------------------------------------------------------
# Resumable state


def save_state(
    path: Path, model: nn.Module, optimizer, names: list[str], state: State, config: TrainConfig, world: World
) -> None:
    """The trainable weights, the optimizer, the RNG streams and the history in one safetensors
    file (tensors as tensors, the rest as JSON in its metadata: nothing is pickled), written whole
    or not at all (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    tensors = {f"weights.{n}": params[n].detach().cpu().contiguous() for n in names}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    optim = optimizer.state_dict()
    scalars = {}
    for index, entries in optim["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    meta = {
        "run": {**config.run_fields(), "world": world.size},
        "step": state.step,
        "history": state.history,
        "param_groups": optim["param_groups"],
        "optimizer_scalars": scalars,
        "python_rng": random.getstate(),
    }
    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(partial), metadata={"minivlm_state": json.dumps(meta)})
    partial.replace(path)


def load_state(path, model: nn.Module, optimizer, names: list[str], config: TrainConfig, world: World) -> State:
    """A state file of save_state (or a folder of them: its latest step) put back into the model,
    the optimizer and the RNG streams; the State to go on from."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():  # a state folder: its latest step
        steps = sorted(path.glob("step-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
        if not steps:
            raise TrainError(f"{path}: no step-N.safetensors state file to resume from")
        path = steps[-1]
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["minivlm_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file: say which)
        raise TrainError(f"{path}: not a training state file ({type(e).__name__}: {e})") from None
    weights = {k.removeprefix("weights."): t for k, t in tensors.items() if k.startswith("weights.")}
    if set(weights) != set(names):
        raise TrainError(f"{path}: its trainable weights are not this run's (another --train mode or model?)")
    want = {**config.run_fields(), "world": world.size}
    changed = [k for k in want if meta.get("run", {}).get(k) != want[k]]
    if changed:
        was = {k: meta.get("run", {}).get(k) for k in changed}
        raise TrainError(f"{path}: saved by a run with other settings {was}; resume with the same ones")
    params = dict(model.named_parameters())
    for n in names:
        if params[n].shape != weights[n].shape:
            raise TrainError(f"{path}: {n} has shape {list(weights[n].shape)}, this run's {list(params[n].shape)}")
    with torch.no_grad():
        for n in names:
            params[n].copy_(weights[n])
    optim_state: dict = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optim_state.setdefault(int(index), {})[name] = t
    for key, value in meta["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        optim_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return State(meta["step"], list(meta["history"]))


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One line on stderr: step, loss, learning rate, tokens/s and the time left; redrawn in place
    on a terminal, a line every 10th step (and the last) otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.start = time.monotonic()
        self.tokens = 0
        self.tty = sys.stderr.isatty()

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        self.tokens += record["tokens"]
        elapsed = time.monotonic() - self.start
        done = record["step"]
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = (
            f"step {done}/{self.total}  loss {record['loss']:.4f}"
            + (f"  eval {record['eval_loss']:.4f}" if "eval_loss" in record else "")
            + f"  lr {record['lr']:.2e}  {self.tokens / max(elapsed, 1e-9):,.0f} tok/s  eta {_clock(eta)}"
        )
        if self.tty:
            print(f"\r{line}\x1b[K", end="", file=sys.stderr, flush=True)
        elif done % 10 == 0 or done == self.total or "eval_loss" in record:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
