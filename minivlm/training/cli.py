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
    if args.save_adapter and args.train != "lora":
        raise TrainError("--save-adapter saves LoRA weights; it goes with --train lora")
    lora = LoraConfig(
        args.lora_rank, args.lora_alpha, args.lora_dropout, tuple(t.strip() for t in args.lora_targets.split(","))
    )
    output = Path(args.output)
    state_dir = args.state_dir or (str(output) + ".state" if args.save_every else None)
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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # under torchrun: this process's own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    world = join_world(device)
    try:
        from ..hub import resolve_checkpoint

        source = resolve_checkpoint(args.model)
        check_output(source, output, SaveError)  # before minutes of loading and training, not after
        examples = read_llava_json(args.data, args.images)
        train_set, eval_set = split(examples, args.eval_fraction, args.seed)
        model = load_model(source, dtype=parse_dtype(args.dtype), device=device)
        processor = load_processor(source)
        if world.main:
            print(
                f"minivlm: training {args.train} on {len(train_set)} examples ({len(eval_set)} held out), "
                f"{world.size} process(es)",
                file=sys.stderr,
            )
        state = train(model, processor, train_set, config, eval_set, resume=args.resume)
        if world.main:
            if args.save_adapter:
                family, _, _ = read_family_config(source)
                save_adapter(model, lora, output, family.hf_decoder, base_model=str(args.model))
            else:
                merge_lora(model)
                save_checkpoint(model, source, output)
            log = "".join(json.dumps(r) + "\n" for r in state.history)
            (output / "training_log.jsonl").write_text(log, encoding="utf-8")
            last = state.history[-1] if state.history else {}
            print(
                f"minivlm: wrote {output} (step {state.step}, loss {last.get('loss', float('nan')):.4f})",
                file=sys.stderr,
            )
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
