"""Benchmarks that compare minivlm with transformers in one run (transformers must be installed).

`python -m minivlm bench loader`: builds a random Llama checkpoint of a few hundred MB, then
- loads it with minivlm and with transformers, each in a fresh process, and prints the load time
  and the peak host memory (resident high-water mark minus the resident set before loading)
  against the checkpoint's size;
- runs a forward pass with both in this process and prints the time and the ratio.

Figures from a benchmark are for BENCHMARKS.md, never asserted by a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

# Runs in a fresh interpreter so that each loader's memory is its own.
LOAD_CHILD = r"""
import json, sys, time, torch
from minivlm.bench import proc_status as status
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


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (0 repeats would time nothing, 0 words encode nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a whole number of at least 1")
    return value


def proc_status(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _transformers():
    try:
        import transformers
    except ImportError:
        sys.exit("minivlm bench compares against transformers: pip install 'minivlm[test]' (or transformers) first")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def make_checkpoint(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random-weight LlamaForCausalLM saved with shards and an index; returns its size in bytes."""
    transformers = _transformers()
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
        max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="100MB")
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure_load(which: str, folder: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_CHILD, which, str(folder), dtype], capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(f"loading with {which} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, repeats: int, device: str) -> float:
    """Best wall time of `repeats` calls after one warm-up (best: least disturbed by the OS)."""
    best = float("inf")
    with torch.inference_mode():
        fn()
        _sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return best


def bench_loader(args: argparse.Namespace) -> None:
    transformers = _transformers()
    import minivlm

    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = make_checkpoint(folder, args.hidden, args.layers, args.vocab)
        print(f"checkpoint: random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
              f"{size / mib:.0f} MiB fp32 in {len(list(folder.glob('*.safetensors')))} shards")  # fmt: skip
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
        print()
        print("load, fresh process; peak = resident high-water mark minus resident before loading")
        print(f"{'':<28}{'seconds':>10}{'peak MiB':>10}{'peak/size':>11}{'after 1 forward':>17}")
        for dtype in ("float32", "bfloat16"):
            for which in ("minivlm", "transformers"):
                r = measure_load(which, folder, dtype)
                print(f"{which + ' ' + dtype:<28}{r['seconds']:>10.2f}{r['peak'] / mib:>10.0f}"
                      f"{r['peak'] / size:>11.2f}{r['peak_after_forward'] / size:>17.2f}")  # fmt: skip
        print()

        ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
        ours = minivlm.load_model(folder)
        print(f"{'forward, 1 x ' + str(args.seq) + ' tokens, fp32':<28}{'seconds':>10}{'time/ours':>10}")
        t_ours = time_call(partial(ours, ids), args.repeats, "cpu")
        print(f"{'minivlm':<28}{t_ours:>10.3f}{1.0:>10.2f}")
        for impl in ("eager", "sdpa"):
            ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=impl)
            t_ref = time_call(partial(ref, ids), args.repeats, "cpu")
            print(f"{'transformers ' + impl:<28}{t_ref:>10.3f}{t_ref / t_ours:>10.2f}")
            with torch.inference_mode():
                diff = (ours(ids) - ref(ids).logits).abs().max().item()
            print(f"{'':<28}max |logit diff| {diff:.1e}")
            del ref


# LLaVA-Interleave configurations for `bench vlm`: "interleave-0.5b" is the real
# llava-hf/llava-interleave-qwen-0.5b-hf (SigLIP so400m with 26 layers, Qwen1.5-0.5B), random
# weights; "small" keeps its shapes (729 patches, head_dim 72 and 64) at a size a CPU runs in seconds.
VLM_PRESETS = {
    "interleave-0.5b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
        text=dict(vocab_size=151646, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16),
    ),
    # The decoder's weights (3 MB) stay in the CPU's cache: a decode step's time is mostly each
    # loop's own overhead, which is what this preset measures.
    "tiny": dict(
        vision=dict(hidden_size=144, intermediate_size=288, num_hidden_layers=2, num_attention_heads=2),
        text=dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
    ),
    "small": dict(
        vision=dict(hidden_size=288, intermediate_size=1152, num_hidden_layers=6, num_attention_heads=4),
        text=dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=8),
    ),
    # SigLIP so400m + Llama-3 8B's decoder (GQA 32/8, 128k vocab): an 8B family member for CUDA.
    "llama3-8b": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16),
        text=dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                  tie_word_embeddings=False),
    ),
}  # fmt: skip


def _vlm_pair(args: argparse.Namespace):
    """The preset as a random-weight LLaVA checkpoint, loaded by minivlm and by transformers."""
    transformers = _transformers()
    import minivlm

    preset = VLM_PRESETS[args.preset]
    dtype = getattr(torch, args.dtype)
    text = {"model_type": "qwen2", "tie_word_embeddings": True, "rope_theta": 1000000.0, **preset["text"]}
    config = transformers.LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=384, patch_size=14, **preset["vision"]),
        text_config=text, image_token_index=preset["text"]["vocab_size"] - 1, vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device("meta"):  # no fp32 copy of an 8B model in host memory: random values come below
            model = transformers.LlavaForConditionalGeneration(config)
        model.to_empty(device="cpu").to(dtype)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        model.tie_weights()
        model.save_pretrained(tmp)
        del model
        ours = minivlm.load_model(tmp, dtype=dtype, device=args.device)
        theirs = transformers.LlavaForConditionalGeneration.from_pretrained(
            tmp, dtype=dtype, attn_implementation=args.attn
        ).to(args.device)
    theirs.eval()
    params = sum(p.numel() for p in ours.parameters())
    print(f"LLaVA '{args.preset}': {params / 1e6:.0f}M parameters, {args.dtype} on {args.device}; "
          f"transformers {transformers.__version__} ({args.attn} attention), torch {torch.__version__}")  # fmt: skip
    return ours, theirs, config


def bench_vlm(args: argparse.Namespace) -> None:
    ours, theirs, config = _vlm_pair(args)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.images, 3, 384, 384, generator=g).to(args.device, dtype)
    text = torch.randint(0, 1000, (args.text_tokens,), generator=g)
    image = torch.full((729,), config.image_token_id)
    ids = torch.cat([text[:4]] + [image] * args.images + [text[4:]])[None].to(args.device)

    rows = [
        ("vision tower", lambda: ours.vision_tower(pixels, select=(-1,)),
         lambda: theirs.model.vision_tower(pixels, output_hidden_states=-1)),
        (f"forward {args.images} image(s) + {args.text_tokens} text tokens ({ids.shape[1]} total)",
         lambda: ours(ids, pixel_values=pixels), lambda: theirs(input_ids=ids, pixel_values=pixels)),
    ]  # fmt: skip
    print(f"{'':<52}{'minivlm s':>11}{'transformers s':>16}{'speed-up':>10}")
    for name, fn_ours, fn_theirs in rows:
        t_ours, t_theirs = time_call(fn_ours, args.repeats, args.device), time_call(fn_theirs, args.repeats, args.device)
        print(f"{name:<52}{t_ours:>11.4f}{t_theirs:>16.4f}{t_theirs / t_ours:>10.2f}")
    with torch.inference_mode():
        a, b = ours(ids, pixel_values=pixels).float(), theirs(input_ids=ids, pixel_values=pixels).logits.float()
    print(f"max |logit diff| / max |logit|: {((a - b).abs().max() / b.abs().max()).item():.1e}")


def bench_generate(args: argparse.Namespace) -> None:
    """Greedy generation with one image: time to first token and decode tokens/s of minivlm's
    generate against transformers' generate on the same weights and inputs; on CUDA also peak
    memory and the bandwidth roofline (weight bytes / measured copy bandwidth)."""
    import minivlm

    ours, theirs, config = _vlm_pair(args)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 384, 384, generator=g).to(args.device, dtype)
    text = torch.randint(0, 1000, (args.text_tokens,), generator=g)
    ids = torch.cat([text[:4], torch.full((729,), config.image_token_id), text[4:]])[None].to(args.device)
    ours.generation_defaults = minivlm.generation.GenerationDefaults((), 0, None)  # no EOS: every run is full length

    def run_ours(n):
        return minivlm.generate(ours, ids, pixel_values=pixels, max_new_tokens=n)

    def run_theirs(n):
        out = theirs.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        return out[:, ids.shape[1] :]

    n = args.new_tokens
    same = torch.equal(run_ours(n).cpu(), run_theirs(n).cpu())
    print(f"prompt: 1 image (729 tokens) + {args.text_tokens} text tokens; {n} new tokens, greedy; "
          f"identical tokens: {same}")
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
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; decoder weights {weight_bytes / 2**30:.2f} GiB; "
              f"roofline {roofline:.1f} tokens/s; minivlm at {r_o / roofline:.0%} of it")


def _bench_text(words: int) -> str:
    rng = __import__("random").Random(0)
    vocab = ["the", "model", "image", "token", "vision", "language", "attention", "layer", "patch", "résumé",
             "中文", "处理", "😀", "def", "return", "x", "=", "(", ")", ",", ".", "\n", "2024", "3.14"]  # fmt: skip
    return " ".join(rng.choice(vocab) for _ in range(words))


def bench_tokenizer(args: argparse.Namespace) -> None:
    """Encode text with minivlm's tokenizer and transformers' fast tokenizer, from the same files."""
    if args.tokenizer:
        return _bench_folder(args)
    if args.kind == "sentencepiece":
        return _bench_sentencepiece(args)
    transformers = _transformers()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from .processing.tokenizer import load_tokenizer

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama-3's  # fmt: skip
    text = _bench_text(args.words)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text[i : i + 10000] for i in range(0, len(text), 10000)],
                            trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp)
        theirs = transformers.AutoTokenizer.from_pretrained(tmp)
        ours = load_tokenizer(Path(tmp))
    print(f"Llama-3 pattern, 4000-token vocabulary, one text of {args.words} words")
    _time_encode(ours, theirs, [text], args.repeats, f"minivlm ({ours.fast_path})")


def _bench_sentencepiece(args: argparse.Namespace) -> None:
    """LlamaTokenizer's pipeline on a SentencePiece BPE model trained here (sentencepiece, a test
    dependency), over prompts of 200 words: a SentencePiece segment is one BPE word, so prompt-sized
    texts are what both are built for."""
    import io

    import sentencepiece

    transformers = _transformers()
    from .processing.tokenizer import load_tokenizer

    text = _bench_text(args.words)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")[:20000]), model_writer=model, vocab_size=4000, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    words = text.split(" ")
    prompts = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        (Path(tmp) / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true}')
        theirs = transformers.AutoTokenizer.from_pretrained(tmp)
        ours = load_tokenizer(Path(tmp))
    print(f"SentencePiece BPE with byte fallback, {len(ours.pieces)} pieces, {len(prompts)} prompts of 200 words")
    _time_encode(ours, theirs, prompts, args.repeats, f"minivlm ({ours.fast_path})")


def _bench_folder(args: argparse.Namespace) -> None:
    """A real checkpoint's tokenizer folder (e.g. tests/.real/llama3 after `python tests/real_files.py`),
    over prompts of 200 words of the benchmark text."""
    transformers = _transformers()
    from .processing.tokenizer import load_tokenizer

    words = _bench_text(args.words).split(" ")
    prompts = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
    theirs = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    ours = load_tokenizer(Path(args.tokenizer))
    print(f"{args.tokenizer}: {type(ours).__name__}, {len(prompts)} prompts of 200 words")
    _time_encode(ours, theirs, prompts, args.repeats, f"minivlm ({ours.fast_path})")


def _time_encode(ours, theirs, texts: list[str], repeats: int, label: str) -> None:
    assert [ours.encode(t) for t in texts] == [theirs(t)["input_ids"] for t in texts], "the two tokenizers disagree"
    mib = sum(len(t.encode()) for t in texts) / 2**20
    tokens = sum(len(ours.encode(t)) for t in texts)
    print(f"encode {mib:.1f} MiB of text ({tokens} tokens)")
    t_ours = time_call(lambda: [ours.encode(t) for t in texts], repeats, "cpu")
    t_theirs = time_call(lambda: [theirs(t)["input_ids"] for t in texts], repeats, "cpu")
    print(f"{label:<34}{t_ours:>8.3f} s{mib / t_ours:>9.1f} MiB/s")
    print(f"{'transformers (tokenizers, fast)':<34}{t_theirs:>8.3f} s{mib / t_theirs:>9.1f} MiB/s")
    print(f"speed-up {t_theirs / t_ours:.2f}x")


def _vlm_args(p: argparse.ArgumentParser) -> None:
    """What `_vlm_pair` and the prompt of the VLM benchmarks read."""
    p.add_argument("--preset", choices=sorted(VLM_PRESETS), default="small")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa"], help="transformers' attention")
    p.add_argument("--text-tokens", type=positive_int, default=32)


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
    gen.set_defaults(run=bench_generate)
    tok = which.add_parser("tokenizer", help="encode speed against transformers' fast tokenizer")
    tok.add_argument("--kind", choices=["bpe", "sentencepiece"], default="bpe")
    tok.add_argument("--words", type=positive_int, default=1_000_000)
    tok.add_argument("--tokenizer", help="a tokenizer folder to time instead of one trained here (--kind is then ignored)")
    tok.add_argument("--repeats", type=positive_int, default=3)
    tok.set_defaults(run=bench_tokenizer)

    kernels = which.add_parser("kernels", help="the Triton kernels against torch eager and SDPA (CUDA)")
    kernels.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    kernels.set_defaults(run=bench_kernels)


def bench_kernels(args: argparse.Namespace) -> None:
    from .kernels import bench

    bench.run(args)
