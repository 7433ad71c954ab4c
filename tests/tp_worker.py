"""One rank of tests/test_parallel.py, run under torchrun: loads each checkpoint split across the
ranks (load_model(tensor_parallel=True)), and writes what rank 0 computed (logits of a left-padded
batch and 32 greedy tokens) and what every rank holds (its weight bytes) for the test to compare
with one process.

    torchrun --standalone --nproc-per-node N tests/tp_worker.py OUT FOLDER [FOLDER ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import save_file

import minivlm
from minivlm.generation import StopRules, generate_steps
from minivlm.processing.batching import collate

STEPS = 32


def batch_for(folder: Path, model) -> dict:
    """Two prompts, the second shorter (left-padded); with images where the checkpoint takes them."""
    if not hasattr(model, "language_model"):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        return {"input_ids": ids, "attention_mask": mask}
    processor = minivlm.load_processor(folder)
    items = [
        processor(text="<image>\nWhat is in the picture?", images=[Image.new("RGB", (64, 48), (200, 40, 40))]),
        processor(text="<image>\nColour?", images=[Image.new("RGB", (40, 72), (30, 90, 200))]),
    ]
    pad = model.generation_defaults.pad_token_id or 0
    return collate(items, pad, processor.rows_first, side="left")


def run(folder: Path, model) -> dict:
    batch = batch_for(folder, model)
    with torch.inference_mode():
        logits = model(**batch)
        steps = generate_steps(model, **batch, max_new_tokens=STEPS, stop=StopRules(set()))
        tokens = torch.stack([t for t, _ in steps], dim=1)
    return {"logits": logits.float().contiguous(), "tokens": tokens.contiguous()}


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of the decoder's parameters on this rank, bytes of the rest of the model)."""
    lm = getattr(model, "language_model", model)
    decoder = {id(p): p.numel() * p.element_size() for p in lm.parameters()}
    rest = {id(p): p.numel() * p.element_size() for p in model.parameters() if id(p) not in decoder}
    return sum(decoder.values()), sum(rest.values())


def main(out: Path, folders: list[Path]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    for i, folder in enumerate(folders):
        model = minivlm.load_model(folder, tensor_parallel=True)
        results = run(folder, model)
        if rank == 0:
            save_file(results, str(out / f"{i}.safetensors"))
        report[str(i)] = weight_bytes(model)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(f) for f in sys.argv[2:]])
