"""`python -m minivlm bench TARGET`: benchmarks that compare minivlm with transformers in one run
(transformers must be installed: pip install "minivlm[test]"), one module per thing measured:

    loader     loader.py     checkpoint load time and peak host memory, and a text forward pass
    vlm        vlm.py        the vision tower and an image + prompt forward of a LLaVA model
    generate   generate.py   time to first token and decode speed against transformers' generate
    quant      quant.py      int8/int4 against the unquantized model: speed and load memory, or quality
    tokenizer  tokenizer.py  encode speed against transformers' fast tokenizer
    kernels    (minivlm.kernels.bench) the Triton kernels against torch eager and SDPA, CUDA only

timing.py holds what they share: the timer, the memory figures, and the transformers import that
fails in one line. This file only builds the command line. Importing this package does not import
transformers; each benchmark imports it when it runs. Figures from a benchmark are for
BENCHMARKS.md, never asserted by a test.
"""

from __future__ import annotations

import argparse

from .generate import bench_generate
from .loader import bench_loader
from .quant import bench_quant
from .serve import bench_serve
from .timing import proc_status, time_call
from .tokenizer import bench_tokenizer
from .vlm import VLM_PRESETS, bench_vlm

# time_call and proc_status stay importable from minivlm.bench (kernels/bench.py, tests/test_memory.py).
__all__ = ["add_parser", "positive_int", "proc_status", "time_call"]


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (0 repeats would time nothing, 0 words encode nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a whole number of at least 1")
    return value


def _vlm_args(p: argparse.ArgumentParser) -> None:
    """What `vlm_pair` and the prompt of the VLM benchmarks read."""
    p.add_argument("--preset", choices=sorted(VLM_PRESETS), default="small")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"], help="transformers' attention")
    p.add_argument("--text-tokens", type=positive_int, default=32)


def bench_kernels(args: argparse.Namespace) -> None:
    """`bench kernels`: the run of minivlm.kernels.bench (kernels/bench.py), imported when it runs."""
    from ..kernels import bench

    bench.run(args)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against transformers in the same run")
    which = p.add_subparsers(dest="target", required=True)
    loader = which.add_parser("loader", help="checkpoint load time, peak host memory and a text forward")
    loader.add_argument("--hidden", type=positive_int, default=1024)
    loader.add_argument("--layers", type=positive_int, default=8)
    loader.add_argument("--vocab", type=positive_int, default=32000)
    loader.add_argument("--seq", type=positive_int, default=256)
    loader.add_argument("--repeats", type=positive_int, default=3)
    loader.set_defaults(run=bench_loader)
    vlm = which.add_parser("vlm", help="vision tower and image+prompt forward of a LLaVA-Interleave model")
    _vlm_args(vlm)
    vlm.add_argument("--images", type=positive_int, default=1)
    vlm.add_argument("--repeats", type=positive_int, default=5)
    vlm.set_defaults(run=bench_vlm)
    gen = which.add_parser("generate", help="time to first token and decode speed against transformers' generate")
    _vlm_args(gen)
    gen.add_argument("--new-tokens", type=positive_int, default=64)
    gen.add_argument("--repeats", type=positive_int, default=3)
    gen.add_argument(
        "--compile", action="store_true", help="minivlm decodes with compile=True (the compile timed on its own)"
    )
    gen.set_defaults(run=bench_generate)
    quant = which.add_parser("quant", help="int8/int4 against the unquantized model: speed and memory, or quality")
    quant.add_argument("--preset", choices=sorted(VLM_PRESETS), default="small", help="speed: a random-weight preset")
    quant.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    quant.add_argument("--device", default="cpu")
    quant.add_argument("--new-tokens", type=positive_int, default=32)
    quant.add_argument("--repeats", type=positive_int, default=3)
    quant.add_argument("--model", help="quality instead: a real trained checkpoint folder (e.g. tests/.real/smollm2)")
    quant.add_argument("--corpus", help="quality: a UTF-8 text file (default: Python's standard library docstrings)")
    quant.add_argument("--window", type=positive_int, default=256, help="quality: tokens per scored window")
    quant.add_argument("--windows", type=positive_int, default=40, help="quality: at most this many windows")
    quant.set_defaults(run=bench_quant)
    serve = which.add_parser("serve", help="the server's throughput: concurrent clients against one at a time")
    serve.add_argument("--family", default="llava-interleave", help="a tiny checkpoint's family (bench.tiny)")
    serve.add_argument("--model", help="a checkpoint folder instead of the tiny one")
    serve.add_argument("--dtype", default=None)
    serve.add_argument("--clients", type=positive_int, default=8)
    serve.add_argument("--new-tokens", type=positive_int, default=32)
    serve.add_argument("--repeats", type=positive_int, default=3)
    serve.add_argument("--port", type=positive_int, default=8123)
    serve.set_defaults(run=bench_serve)
    tok = which.add_parser("tokenizer", help="encode speed against transformers' fast tokenizer")
    tok.add_argument("--kind", choices=["bpe", "sentencepiece"], default="bpe")
    tok.add_argument("--words", type=positive_int, default=1_000_000)
    tok.add_argument(
        "--tokenizer", help="a tokenizer folder to time instead of one trained here (--kind is then ignored)"
    )
    tok.add_argument("--repeats", type=positive_int, default=3)
    tok.set_defaults(run=bench_tokenizer)

    kernels = which.add_parser("kernels", help="the Triton kernels against torch eager and SDPA (CUDA)")
    kernels.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    kernels.set_defaults(run=bench_kernels)
