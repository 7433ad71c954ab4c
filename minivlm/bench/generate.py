"""`python -m minivlm bench generate`: greedy generation with one image, minivlm's `generate`
against transformers' on the same random-weight LLaVA-Interleave model and inputs: whether the
tokens are identical, time to first token and decode tokens/s; on CUDA also peak memory and the
bandwidth roofline (decoder weight bytes / measured copy bandwidth).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from ..generation import GenerationDefaults, generate
from .timing import time_call
from .vlm import vlm_pair


def bench_generate(args: argparse.Namespace) -> None:
    ours, theirs, config = vlm_pair(args)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 384, 384, generator=g).to(args.device, dtype)
    text = torch.randint(0, 1000, (args.text_tokens,), generator=g)
    ids = torch.cat([text[:4], torch.full((729,), config.image_token_id), text[4:]])[None].to(args.device)
    ours.generation_defaults = GenerationDefaults((), 0, None)  # no EOS: every run is full length

    def run_ours(n):
        return generate(ours, ids, pixel_values=pixels, max_new_tokens=n)

    def run_theirs(n):
        out = theirs.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[:, ids.shape[1] :]

    n = args.new_tokens
    same = torch.equal(run_ours(n).cpu(), run_theirs(n).cpu())
    print(
        f"prompt: 1 image (729 tokens) + {args.text_tokens} text tokens; {n} new tokens, greedy; "
        f"identical tokens: {same}"
    )
    print(f"{'':<34}{'minivlm':>12}{'transformers':>14}{'ratio':>8}")
    results = {}
    for name, fn in (("minivlm", run_ours), ("transformers", run_theirs)):
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        first = time_call(partial(fn, 1), args.repeats, args.device)
        full = time_call(partial(fn, n), args.repeats, args.device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
        results[name] = (first, (n - 1) / (full - first), peak)
    (f_o, r_o, m_o), (f_t, r_t, m_t) = results["minivlm"], results["transformers"]
    print(f"{'time to first token (s)':<34}{f_o:>12.3f}{f_t:>14.3f}{f_t / f_o:>8.2f}")
    print(f"{'decode (tokens/s)':<34}{r_o:>12.1f}{r_t:>14.1f}{r_o / r_t:>8.2f}")
    if args.device.startswith("cuda"):
        print(f"{'peak memory (GiB)':<34}{m_o:>12.2f}{m_t:>14.2f}")
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.language_model.parameters())
        buf = torch.empty(2**28, dtype=torch.float32, device=args.device)  # 1 GiB
        copy = time_call(lambda: buf.clone(), 5, args.device)
        bandwidth = 2 * buf.numel() * 4 / copy  # read + write
        roofline = bandwidth / weight_bytes
        print(
            f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; decoder weights {weight_bytes / 2**30:.2f} GiB; "
            f"roofline {roofline:.1f} tokens/s; minivlm at {r_o / roofline:.0%} of it"
        )
