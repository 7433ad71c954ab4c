"""`python -m minivlm train`: LLaVA's stages from the command line (under torchrun for several processes).

    python -m minivlm train --model PATH --data data.json --images DIR --train connector --output OUT
    torchrun --nproc-per-node 2 -m minivlm train ... (data parallel: the same run as one process
    with twice the batch)

The output is a checkpoint folder in the hub's layout (LoRA merged), or with --save-adapter a PEFT
adapter folder; either way with training_log.jsonl, the loss of every step, beside it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..hub import resolve_checkpoint
from ..load import load_model, load_processor, parse_dtype, read_family_config
from ..saving import check_output
from .data import read_llava_json, split
from .lora import PROJECTIONS, LoraConfig, merge_lora, save_adapter
from .save import SaveError, save_checkpoint
from .trainer import MODES, TrainConfig, TrainError, join_world, train


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the connector (LLaVA stage 1), LoRA or everything (stage 2)")
    p.add_argument("--model", required=True, help="the checkpoint folder (or hub id) to start from")
    p.add_argument("--data", required=True, help="LLaVA-format JSON: a list of {image, conversations}")
    p.add_argument("--images", help="the folder the data's image paths are relative to (default: the JSON's)")
    p.add_argument("--train", choices=MODES, default="connector", help="what learns (default: connector)")
    p.add_argument("--output", required=True, help="a new folder for the trained checkpoint (or adapter)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs passes over the data)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch, per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 1e-3 connector, 2e-4 lora, 2e-5 all)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of the steps of linear warmup")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    p.add_argument("--bf16", action="store_true", help="autocast the forward pass to bfloat16")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="fraction of the examples held out")
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations (and one at the end)")
    p.add_argument("--save-every", type=int, help="steps between resumable states in --state-dir")
    p.add_argument("--state-dir", help="where resumable states go (default: OUTPUT.state)")
    p.add_argument("--resume", help="a state file or a --state-dir to go on from (its latest step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", help=f"some of {','.join(PROJECTIONS)}")
    p.add_argument("--save-adapter", action="store_true", help="LoRA: write a PEFT adapter, not merged weights")
    p.add_argument("--dtype", default="float32", help="the weights' dtype while training (default float32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK when there is CUDA)")
    p.set_defaults(run=run_train)


def run_train(args) -> None:
    config, lora, output = check_args(args)
    device = train_device(args.device)
    world = join_world(device)
    finished = False
    try:
        source = resolve_checkpoint(args.model)
        check_output(source, output, SaveError)  # before minutes of loading and training, not after
        examples = read_llava_json(args.data, args.images)
        train_set, eval_set = split(examples, args.eval_fraction, args.seed)
        if args.eval_every and not eval_set:
            raise TrainError("--eval-every needs held-out examples: give --eval-fraction too")
        try:
            dtype = parse_dtype(args.dtype)
        except ValueError as e:
            raise TrainError(f"--dtype: {e}") from None
        model = load_model(source, dtype=dtype, device=device)
        processor = load_processor(source)
        if world.main:
            print(
                f"minivlm: training {args.train} on {len(train_set)} examples ({len(eval_set)} held out), "
                f"{world.size} process(es)",
                file=sys.stderr,
            )
        state = train(model, processor, train_set, config, eval_set, resume=args.resume)
        if world.main:
            log = {"training_log.jsonl": "".join(json.dumps(r) + "\n" for r in state.history)}
            if args.save_adapter:
                family, _, _ = read_family_config(source)
                base = args.model if not Path(args.model).exists() else str(source.resolve())  # a hub id, or a path
                save_adapter(model, lora, output, family.hf_decoder, base_model=base, extra=log)
            else:
                merge_lora(model)
                save_checkpoint(model, source, output, extra=log)
            last = state.history[-1] if state.history else {}
            print(
                f"minivlm: wrote {output} (step {state.step}, loss {last.get('loss', float('nan')):.4f})",
                file=sys.stderr,
            )
        finished = True
    finally:
        if world.size > 1 and dist.is_initialized():
            if finished:  # the others wait until rank 0 has written; after an error nobody waits
                dist.barrier()
            dist.destroy_process_group()


def check_args(args) -> tuple[TrainConfig, LoraConfig, Path]:
    """The settings, checked before any work: a TrainError (one line) for each bad one."""
    if args.save_adapter and args.train != "lora":
        raise TrainError("--save-adapter saves LoRA weights; it goes with --train lora")
    if args.state_dir and not args.save_every:
        raise TrainError("--state-dir is where --save-every writes: give --save-every N too")
    lora = LoraConfig(
        args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(t.strip() for t in args.lora_targets.split(","))
    )
    output = Path(args.output)
    state_dir = args.state_dir or (str(output) + ".state" if args.save_every else None)
    if state_dir and Path(os.path.abspath(state_dir)).is_relative_to(os.path.abspath(output)):
        raise TrainError(f"--state-dir {state_dir} is inside --output {output}, which must be a new folder")
    config = TrainConfig(
        train=args.train,
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        max_grad_norm=args.max_grad_norm or None,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        eval_every=args.eval_every,
        save_every=args.save_every,
        state_dir=state_dir,
        seed=args.seed,
        lora=lora,
    )
    return config, lora, output


def train_device(name: str | None) -> torch.device:
    """--device, or CUDA when there is one; under torchrun each process takes its own GPU (LOCAL_RANK)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise TrainError(f"--device {name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {name!r}: expected cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: this machine's torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device
