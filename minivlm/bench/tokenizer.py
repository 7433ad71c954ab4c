"""`python -m minivlm bench tokenizer`: encode speed of minivlm's tokenizer against transformers'
fast tokenizer (tokenizers, in Rust), from the same files, after checking that both give the same
ids: MiB/s of each and the speed-up. The tokenizer is a byte-level BPE trained here (default), a
SentencePiece BPE trained here (`--kind sentencepiece`) or a real folder (`--tokenizer PATH`).
"""

from __future__ import annotations

import argparse
import io
import random
import tempfile
from pathlib import Path

from ..processing.tokenizer import load_tokenizer
from .timing import time_call, transformers_or_exit


def _bench_text(words: int) -> str:
    rng = random.Random(0)
    vocab = [
        "the",
        "model",
        "image",
        "token",
        "vision",
        "language",
        "attention",
        "layer",
        "patch",
        "résumé",
        "中文",
        "处理",
        "😀",
        "def",
        "return",
        "x",
        "=",
        "(",
        ")",
        ",",
        ".",
        "\n",
        "2024",
        "3.14",
    ]
    return " ".join(rng.choice(vocab) for _ in range(words))


def bench_tokenizer(args: argparse.Namespace) -> None:
    """Encode text with minivlm's tokenizer and transformers' fast tokenizer, from the same files."""
    if args.tokenizer:
        return _bench_folder(args)
    if args.kind == "sentencepiece":
        return _bench_sentencepiece(args)
    transformers = transformers_or_exit()
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )  # Llama-3's
    text = _bench_text(args.words)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [text[i : i + 10000] for i in range(0, len(text), 10000)],
        trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
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
    import sentencepiece

    transformers = transformers_or_exit()
    text = _bench_text(args.words)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")[:20000]),
        model_writer=model,
        vocab_size=4000,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
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
    transformers = transformers_or_exit()
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
