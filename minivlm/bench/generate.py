"""`python -m minivlm bench generate`: greedy generation with one image, minivlm against
transformers on the same random-weight LLaVA-Interleave model and inputs.

Each phase is timed on its own, `--repeats` times, and given as the median with the range:
- time to first token: `generate` of one token from the prompt (vision tower, prefill, the first
  token);
- decode: `--new-tokens` tokens generated from a KV cache that a prefill outside the timing has
  filled (each side's own cache, restored before every run), as tokens per second. It is not a
  difference of two timings: prefill swings by more than the decode it would hide.

With --compile, minivlm decodes with compile=True: the compile happens in a first decode run of
its own, timed and reported apart (the steady runs reuse the compiled graph); transformers runs as
always (its SDPA attention, eager).

Then the decode roofline for the device: the bytes of weights one decode step reads (every decoder
layer, the final norm and the output projection; one embedding row is negligible) against two
rates measured here on buffers far larger than the caches: the read bandwidth of a reduction, and
the rate of a float32 matrix-vector product, which is what a decode step's projections run: F.linear
(transformers', and minivlm's reference path) and minivlm's fast path (ops.linear: on a CPU oneDNN's
matmul, which on an AMD EPYC reads about twice as fast as MKL's behind F.linear). All are upper
bounds: the KV cache, activations and per-op overhead come on top.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from .. import ops
from ..generation import GenerationDefaults, generate
from ..generation_checks import cache_bytes
from .timing import call_times, time_call
from .vlm import vlm_pair


def bench_generate(args: argparse.Namespace) -> None:
    ours, theirs, config = vlm_pair(args)
    dtype, n = getattr(torch, args.dtype), args.new_tokens
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 384, 384, generator=g).to(args.device, dtype)
    text = torch.randint(0, 1000, (args.text_tokens,), generator=g)
    ids = torch.cat([text[:4], torch.full((729,), config.image_token_id), text[4:]])[None].to(args.device)
    ours.generation_defaults = GenerationDefaults((), 0, None)  # no EOS: every run is full length

    def theirs_generate(input_ids, new, **kwargs):
        out = theirs.generate(input_ids=input_ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0, **kwargs)  # fmt: skip
        return out[:, input_ids.shape[1] :]

    expected = theirs_generate(ids, n, pixel_values=pixels)
    same = torch.equal(generate(ours, ids, pixel_values=pixels, max_new_tokens=n).cpu(), expected.cpu())
    print(f"prompt: 1 image (729 tokens) + {args.text_tokens} text tokens; {n} new tokens, greedy; "
          f"identical tokens: {same}; minivlm compiles its decode step: {args.compile}")  # fmt: skip

    first = {
        "minivlm": call_times(
            lambda: generate(ours, ids, pixel_values=pixels, max_new_tokens=1), args.repeats, args.device
        ),
        "transformers": call_times(lambda: theirs_generate(ids, 1, pixel_values=pixels), args.repeats, args.device),
    }
    # Decode: each side's cache holds the prompt and the first token's prefill; n more tokens.
    first_token = expected[:, :1]
    ids_1 = torch.cat([ids, first_token], dim=1)
    with torch.inference_mode():
        cache = ours.new_cache(1, ids_1.shape[1] + n)
        ours(ids, pixel_values=pixels, cache=cache, logits_to_keep=1)
        past = theirs(input_ids=ids, pixel_values=pixels, use_cache=True).past_key_values
    filled = cache.length

    def ours_decode():
        cache.length = filled  # the slots past the prompt are overwritten
        return generate(ours, first_token, torch.ones_like(ids_1), max_new_tokens=n, cache=cache, compile=args.compile)

    if args.compile:  # the first compiled run compiles the step: timed alone, before the rest
        start = time.perf_counter()
        ours_decode()
        print(f"compile=True: the first decode run (the compile, then {n} tokens) took "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip

    def theirs_decode():
        return theirs_generate(ids_1, n, past_key_values=copy.deepcopy(past))

    decode_same = torch.equal(ours_decode().cpu(), theirs_decode().cpu())
    decode = {
        "minivlm": [n / s for s in call_times(ours_decode, args.repeats, args.device)],
        "transformers": [n / s for s in call_times(theirs_decode, args.repeats, args.device)],
    }
    print(f"each phase timed alone, {args.repeats} runs after a warm-up: median [min - max]; "
          f"decode tokens identical: {decode_same}")  # fmt: skip
    print(f"{'':<26}{'minivlm':>24}{'transformers':>24}{'ratio':>8}")
    print(f"{'time to first token (s)':<26}{spread(first['minivlm'], 3):>24}{spread(first['transformers'], 3):>24}"
          f"{statistics.median(first['transformers']) / statistics.median(first['minivlm']):>8.2f}")  # fmt: skip
    print(f"{'decode (tokens/s)':<26}{spread(decode['minivlm'], 1):>24}{spread(decode['transformers'], 1):>24}"
          f"{statistics.median(decode['minivlm']) / statistics.median(decode['transformers']):>8.2f}")  # fmt: skip
    print("ratio: transformers' time / minivlm's, and minivlm's rate / transformers' (above 1: minivlm is faster)")

    weight_bytes = decode_weight_bytes(ours)
    ours_rate, theirs_rate = statistics.median(decode["minivlm"]), statistics.median(decode["transformers"])
    print(f"decode reads {weight_bytes / 2**30:.2f} GiB of weights a token (and the KV cache: "
          f"{cache_bytes(ours, 1, cache.length)[0] / 2**20:.0f} MiB at the end here)")  # fmt: skip
    mib = BANDWIDTH_BYTES // 2**20
    for what, bandwidth in (
        (f"read bandwidth (a sum over {mib} MiB)", read_bandwidth(args.device)),
        (f"F.linear's matrix-vector product ({mib} MiB of weights)", gemv_bandwidth(args.device, "off")),
        (f"minivlm's fast path's matrix-vector product ({mib} MiB)", gemv_bandwidth(args.device, "auto")),
    ):
        roofline = bandwidth / weight_bytes
        print(f"  {what}: {bandwidth / 1e9:.1f} GB/s, roofline {roofline:.1f} tokens/s; minivlm at "
              f"{ours_rate / roofline:.0%}, transformers at {theirs_rate / roofline:.0%}")  # fmt: skip
    if args.device.startswith("cuda"):
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (both models resident)")


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f} - {max(values):.{digits}f}]"


def decode_weight_bytes(model) -> int:
    """The weight bytes one decode step reads: the decoder layers, the final norm, the output
    projection (tied to the embedding or not)."""
    lm = model.language_model
    modules = (lm.model.layers, lm.model.norm, lm.lm_head)  # quantized ones hold buffers, not parameters
    parts = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return sum(p.numel() * p.element_size() for p in parts)


BANDWIDTH_BYTES = 512 * 2**20  # far past any CPU cache; a GPU's L2 is at most tens of MiB


def read_bandwidth(device: str) -> float:
    """Bytes per second read by a reduction over a 512 MiB float32 buffer: best of 5."""
    buf = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32, device=device)
    return BANDWIDTH_BYTES / time_call(buf.sum, 5, device)


def gemv_bandwidth(device: str, kernels: str) -> float:
    """Bytes of weights per second that one float32 matrix-vector product over 512 MiB reads, on the
    path `kernels` names (ops.linear: "off" is F.linear): the rate a decode step's projections can
    reach there (on a CPU, under the read bandwidth a reduction gets). Best of 5."""
    weight = torch.ones(BANDWIDTH_BYTES // 4 // 1024, 1024, dtype=torch.float32, device=device)
    x = torch.ones(1, 1024, dtype=torch.float32, device=device)
    with torch.no_grad():
        return BANDWIDTH_BYTES / time_call(lambda: ops.linear(x, weight, None, kernels), 5, device)
