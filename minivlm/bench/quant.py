"""`python -m minivlm bench quant`: weight-only quantization against minivlm's own unquantized
model, in one run on identical prompts.

--preset P (speed and memory; random weights): the preset's LLaVA checkpoint is written once, then
loaded unquantized, int8 and int4 (each in a fresh process for its peak resident memory, and in
this process for speed). Decode is timed on its own after a prefill (as `bench generate`), with
the time to first token, each as the median [min - max] of --repeats runs after a warm-up.

--model PATH (quality; a real trained checkpoint, e.g. tests/.real/smollm2): next-token logits of
the unquantized model (its reference path, fp32) and of each quantized one (the fast path, as
users run it) over the windows of a text corpus: top-1 agreement, the mean KL divergence of the
quantized distribution from the unquantized one, the perplexity of each, and the greedy answers
to a few chat prompts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..generation import GenerationDefaults, generate
from ..load import load_model
from ..quant import QuantConfig, model_dtype, quantized_bytes
from ..quant_sensitivity import calibration_text, rank, windows
from .timing import call_times

SCHEMES = [
    ("unquantized", {}),
    ("int8", {"quantize": "int8"}),
    ("int4 g64", {"quantize": "int4", "group_size": 64}),
    # three layers left in fp32, as quantize_keep leaves the most sensitive (which ones does not
    # matter for speed; with random weights no layer is more sensitive than another)
    (
        "int8 keep 3",
        {"quantize": "int8", "quantize_keep": [f"language_model.model.layers.{i}.mlp.down_proj" for i in range(3)]},
    ),
    ("int8 +lm_head", {"quantize": "int8", "quantize_parts": ["decoder", "lm_head"]}),
    ("int4 +lm_head", {"quantize": "int4", "group_size": 64, "quantize_parts": ["decoder", "lm_head"]}),
]

LOAD_CHILD = """
import json, sys
from minivlm.bench.timing import proc_status
before = proc_status("VmRSS")
import minivlm
from minivlm.quant import quantized_bytes
model = minivlm.load_model(sys.argv[1], dtype=sys.argv[2], **json.loads(sys.argv[3]))
print(json.dumps({"peak": proc_status("VmHWM") - before, "size": quantized_bytes(model),
                  "largest": max(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))}))
"""


def measure_load(folder: Path, dtype: str, options: dict) -> dict:
    """Peak resident memory of loading in a fresh process (minivlm imported first, as LOAD_CHILD)."""
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(folder), dtype, json.dumps(options)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f} - {max(values):.{digits}f}]"


def bench_quant(args: argparse.Namespace) -> None:
    if args.model:
        quality(args)
    else:
        speed(args)


def speed(args: argparse.Namespace) -> None:
    from .vlm import VLM_PRESETS, write_preset

    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        config = write_preset(args.preset, args.dtype, Path(tmp))
        print(f"LLaVA '{args.preset}' (random weights), {args.dtype} activations, {args.device}, "
              f"torch {torch.__version__}; {n} new tokens, {args.repeats} runs after a warm-up")  # fmt: skip
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(1, 3, 384, 384, generator=g).to(args.device, getattr(torch, args.dtype))
        text = torch.randint(0, 1000, (32,), generator=g)
        image_token = VLM_PRESETS[args.preset]["text"]["vocab_size"] - 1
        ids = torch.cat([text[:4], torch.full((729,), image_token), text[4:]])[None].to(args.device)
        print(f"{'':<14}{'load peak MiB':>14}{'size MiB':>10}{'peak/(size+largest)':>21}"
              f"{'first token (s)':>26}{'decode (tokens/s)':>26}{'decode ratio':>14}"
              f"{'MiB read/token':>16}{'bound':>7}")  # fmt: skip
        base = base_bytes = None
        for name, options in SCHEMES:
            mem = measure_load(Path(tmp), args.dtype, options)
            model = load_model(tmp, dtype=args.dtype, device=args.device, **options)
            model.generation_defaults = GenerationDefaults((), 0, None)  # no EOS: every run is full length
            first = call_times(lambda: generate(model, ids, pixel_values=pixels, max_new_tokens=1), args.repeats,
                               args.device)  # fmt: skip
            token = generate(model, ids, pixel_values=pixels, max_new_tokens=1)
            ids_1 = torch.cat([ids, token], dim=1)
            with torch.inference_mode():
                cache = model.new_cache(1, ids_1.shape[1] + n)
                model(ids, pixel_values=pixels, cache=cache, logits_to_keep=1)
            filled = cache.length

            def decode():
                cache.length = filled  # the slots past the prompt are overwritten
                return generate(model, token, torch.ones_like(ids_1), max_new_tokens=n, cache=cache)

            rates = [n / s for s in call_times(decode, args.repeats, args.device)]
            read = decode_bytes(model, filled + n / 2)
            base, base_bytes = base or statistics.median(rates), base_bytes or read
            mib = 2**20
            print(f"{name:<14}{mem['peak'] / mib:>14.0f}{mem['size'] / mib:>10.0f}"
                  f"{mem['peak'] / (mem['size'] + mem['largest']):>21.2f}{spread(first, 3):>26}{spread(rates, 1):>26}"
                  f"{statistics.median(rates) / base:>14.2f}{read / mib:>16.0f}{base_bytes / read:>7.2f}")  # fmt: skip
    text = config.text_config
    print(f"text config: {text.hidden_size} hidden, {text.num_hidden_layers} layers, vocabulary {text.vocab_size}")
    print(
        "MiB read/token: the weights a decode step reads (decoder layers, final norm, output projection; one "
        "embedding row) and the KV cache at the mean decode length; bound: the unquantized row's bytes over "
        "this row's, the decode ratio a step bound by memory bandwidth could reach"
    )


def decode_bytes(model, cached_tokens: float) -> float:
    """The bytes a batch-1 decode step reads: every weight of the decoder's layers, its final norm and
    output projection (quantized as held), and the keys and values of `cached_tokens` tokens."""
    lm = getattr(model, "language_model", model)
    weights = sum(quantized_bytes(m) for m in (lm.model.layers, lm.model.norm, lm.lm_head))
    first = lm.model.layers[0].self_attn
    kv_per_token = (
        2 * len(lm.model.layers) * first.num_kv_heads * first.head_dim * model_dtype(model).itemsize
    )  # the cache holds the activations' dtype
    return weights + kv_per_token * cached_tokens


# -- quality ----------------------------------------------------------------------------------


@torch.inference_mode()
def compare(reference, quantized, windows: list[torch.Tensor]) -> dict:
    """Top-1 agreement, mean KL(reference || quantized) and both perplexities over the windows."""
    agree = kl = nll_ref = nll_q = count = 0
    for ids in windows:
        ref = reference(ids[None]).float().log_softmax(-1)[0, :-1]  # (len - 1, vocab)
        q = quantized(ids[None]).float().log_softmax(-1)[0, :-1]
        target = ids[1:]
        agree += (ref.argmax(-1) == q.argmax(-1)).sum().item()
        kl += (ref.exp() * (ref - q)).sum(-1).sum().item()
        nll_ref -= ref.gather(-1, target[:, None]).sum().item()
        nll_q -= q.gather(-1, target[:, None]).sum().item()
        count += len(target)
    return {"top1": agree / count, "kl": kl / count, "ppl_ref": float(torch.tensor(nll_ref / count).exp()),
            "ppl": float(torch.tensor(nll_q / count).exp()), "tokens": count}  # fmt: skip


def quality(args: argparse.Namespace) -> None:
    from ..load import load_processor

    processor = load_processor(args.model)
    ids = torch.tensor(processor.tokenizer.encode(calibration_text(args.corpus)))
    # The first --windows windows are scored; the sensitivity ranking calibrates on the next 16.
    calibration = windows(ids, args.window)[args.windows : args.windows + 16]
    scored = windows(ids, args.window)[: args.windows]
    reference = load_model(args.model, dtype="float32", kernels="off")
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?"]
    print(f"{args.model}: {sum(len(w) - 1 for w in scored)} scored tokens in {len(scored)} windows of {args.window}; "
          f"torch {torch.__version__}")  # fmt: skip
    answers = {"unquantized": [answer(reference, processor, p) for p in prompts]}
    print(f"{'':<26}{'top-1 agreement':>16}{'mean KL':>10}{'perplexity':>12}{'(unquantized)':>15}")
    rows = [("int8", {"quantize": "int8"}), ("int8, reference path", {"quantize": "int8", "kernels": "off"})]
    for g in (32, 64, 128):
        rows.append((f"int4 g{g}", {"quantize": "int4", "group_size": g}))
        rows.append((f"int4 g{g}, range search", {"quantize": QuantConfig("int4", g, ("decoder",), search=True)}))
    rows += sensitive_rows(reference, calibration)
    for name, options in rows:
        model = load_model(args.model, dtype="float32", **options)
        r = compare(reference, model, scored)
        print(f"{name:<26}{r['top1']:>16.4f}{r['kl']:>10.4f}{r['ppl']:>12.3f}{r['ppl_ref']:>15.3f}")
        answers[name] = [answer(model, processor, p) for p in prompts]
    for i, p in enumerate(prompts):
        print(f"\n{p}")
        for name, said in answers.items():
            print(f"  {name:<22} {said[i]!r}")


def sensitive_rows(reference, calibration: list[torch.Tensor]) -> list[tuple[str, dict]]:
    """int8 with the decoder's most sensitive layers kept in full precision (quant_sensitivity.rank,
    on calibration windows apart from the scored ones), and with the output projection quantized."""
    if not calibration:
        print("(no text past the scored windows to calibrate on: no rows that keep sensitive layers)")
        return []
    ranking = rank(reference, [w[None] for w in calibration], QuantConfig("int8"))
    print(f"int8: the decoder's layers ranked most sensitive on {len(calibration)} calibration windows: "
          + ", ".join(f"{name} {error:.3g}" for name, error in ranking[:4]))  # fmt: skip
    top = {k: [name for name, _ in ranking[:k]] for k in (1, 3)}
    head = {"quantize": "int8", "quantize_parts": ["decoder", "lm_head"]}
    return [("int8, keep 1", {"quantize": "int8", "quantize_keep": top[1]}),
            ("int8, keep 3", {"quantize": "int8", "quantize_keep": top[3]}),
            ("int8 +lm_head", head), ("int8 +lm_head, keep 3", {**head, "quantize_keep": top[3]})]  # fmt: skip


def answer(model, processor, prompt: str) -> str:
    text = processor.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = torch.tensor([processor.tokenizer.encode(text, add_special_tokens=False)])
    out = generate(model, ids, max_new_tokens=24)
    return processor.tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
