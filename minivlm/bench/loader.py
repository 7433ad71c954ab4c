"""`python -m minivlm bench loader`: how long loading a checkpoint takes and how much host memory
it costs, minivlm against transformers, then a text forward pass of each.

It builds a random Llama checkpoint of a few hundred MB, then
- loads it with minivlm and with transformers, each in a fresh process, and prints the load time
  and the peak host memory (resident high-water mark minus the resident set before loading)
  against the checkpoint's size;
- runs a forward pass with both in this process and prints the time and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

from ..load import load_model
from .timing import time_call, transformers_or_exit

# Runs in a fresh interpreter so that each loader's memory is its own.
LOAD_CHILD = r"""
import json, sys, time, torch
from minivlm.bench.timing import proc_status as status
which, folder, dtype = sys.argv[1:4]
dtype = getattr(torch, dtype)
if which == "minivlm":
    import minivlm
    load = lambda: minivlm.load_model(folder, dtype=dtype)
else:
    import transformers
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
before = status("VmRSS")
start = time.perf_counter()
model = load()
seconds, peak = time.perf_counter() - start, status("VmHWM") - before
# A loader that maps the file lazily pays for the pages at first use: count one forward too.
with torch.inference_mode():
    model(torch.zeros(1, 1, dtype=torch.long))
print(json.dumps({"seconds": seconds, "peak": peak, "peak_after_forward": status("VmHWM") - before}))
"""


def make_checkpoint(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random-weight LlamaForCausalLM saved with shards and an index; returns its size in bytes."""
    transformers = transformers_or_exit()
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="100MB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure_load(which: str, folder: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, which, str(folder), dtype], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"loading with {which} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_loader(args: argparse.Namespace) -> None:
    transformers = transformers_or_exit()
    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = make_checkpoint(folder, args.hidden, args.layers, args.vocab)
        print(
            f"checkpoint: random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
            f"{size / mib:.0f} MiB fp32 in {len(list(folder.glob('*.safetensors')))} shards"
        )
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
        print()
        print("load, fresh process; peak = resident high-water mark minus resident before loading")
        print(f"{'':<28}{'seconds':>10}{'peak MiB':>10}{'peak/size':>11}{'after 1 forward':>17}")
        for dtype in ("float32", "bfloat16"):
            for which in ("minivlm", "transformers"):
                r = measure_load(which, folder, dtype)
                print(
                    f"{which + ' ' + dtype:<28}{r['seconds']:>10.2f}{r['peak'] / mib:>10.0f}"
                    f"{r['peak'] / size:>11.2f}{r['peak_after_forward'] / size:>17.2f}"
                )
        print()

        ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
        ours = load_model(folder)
        print(f"{'forward, 1 x ' + str(args.seq) + ' tokens, fp32':<28}{'seconds':>10}{'time/ours':>10}")
        t_ours = time_call(partial(ours, ids), args.repeats, "cpu")
        print(f"{'minivlm':<28}{t_ours:>10.3f}{1.0:>10.2f}")
        for impl in ("eager", "sdpa"):
            ref = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, attn_implementation=impl
            )
            t_ref = time_call(partial(ref, ids), args.repeats, "cpu")
            print(f"{'transformers ' + impl:<28}{t_ref:>10.3f}{t_ref / t_ours:>10.2f}")
            with torch.inference_mode():
                diff = (ours(ids) - ref(ids).logits).abs().max().item()
            print(f"{'':<28}max |logit diff| {diff:.1e}")
            del ref
