"""Byte-level BPE tokenizers against transformers, on tokenizers the test trains itself with each
family's pipeline (pre-tokenizer pattern, normalizer, post-processor, added tokens). Expected:
identical ids and identical decoded text."""

from __future__ import annotations

import json
import os

import pytest
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from minivlm.processing.tokenizer import StreamDecoder, TokenizerError, load_tokenizer

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see what's next!",
    "Numbers: 0 7 42 1234567 3.14159 -17 1e10 ½ ² 五 ٣",
    "中文文本处理：你好，世界！日本語のテキスト。한국어 텍스트입니다.",
    "Emoji 😀👍🏽🇫🇷 and ZWJ 👨‍👩‍👧 sequences, plus ★ ☃ ♞.",
    "def f(x):\n\treturn x ** 2  # comment\n\n\nclass A:\n    pass\n",
    "Whitespace   runs\t\ttabs\n\n\nnewlines \r\n windows   ",
    "Accents: café naïve résumé; combining: cafe\u0301 nai\u0308ve; Ångström.",
    "CAPS'S AND Mixed'Ll Contractions DON'T ' quotes ''' \"double\"",
    "Arabic: مرحبا بالعالم. Hebrew: שלום עולם. Hindi: नमस्ते दुनिया",
    "URLs https://example.com/a?b=c&d=e#f and paths C:\\Users\\x\\y.txt",
]
SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"],
    "llama3v": ["<|begin_of_text|>", "<|end_of_text|>", "<unk>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<image>", "</image>", "<slice>", "</slice>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
    "smollm2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<global-img>",
                "<row_1_col_1>", "<row_1_col_2>", "<end_of_utterance>"],
    "gpt2": ["<|endoftext|>"],
}  # fmt: skip
# Text with the special tokens inside it, glued and spaced, and the text of the corpus around them.
PROMPTS = CORPUS + [
    "<|im_start|>user\n<image>\nWhat is in this picture?<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>Describe 😀 here.<|eot_id|>",
    "User:<fake_token_around_image><row_1_col_1><image><image><fake_token_around_image><global-img> 12 \n<end_of_utterance>\nAssistant:",
    "<image><image> <image>  x<|endoftext|>y <|endoftext|> z",
    "<image><unk><unk></image><slice><image><unk></image>\n<image><unk></image></slice>\nWhat is it?",
    "",
    " ",
    "\n",
    "a",
    "  leading and trailing  ",
]


def build(family: str, folder) -> None:
    tok = Tokenizer(models.BPE())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if family.startswith("llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif family == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, initial_alphabet=alphabet, special_tokens=SPECIALS[family])
    tok.train_from_iterator(CORPUS * 20, trainer)
    if family == "smollm2":
        # Isolate digits only after training, so the vocabulary holds digit merges ("12", " 3") that
        # the isolation must keep from applying: a tokenizer that skipped it would use them.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    extra = {}
    if family.startswith("llama3"):
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]
        )
        extra = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        if family == "llama3v":  # llama3v's tokenizer_config: <unk> stands for image features
            extra.update(eos_token="<|end_of_text|>", unk_token="<unk>")
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if family == "qwen2":
        # A non-special added token that swallows whitespace around it, as some checkpoints define.
        tok.add_tokens([AddedToken("<|mask|>", lstrip=True, rstrip=True, special=False, normalized=False)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **extra).save_pretrained(folder)


@pytest.fixture(scope="module", params=sorted(SPECIALS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    build(request.param, folder)
    return request.param, transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_equal_transformers(pair, add_special_tokens):
    family, hf, ours = pair
    prompts = PROMPTS + (["a <|mask|>  b", "<|mask|>x", "x\n <|mask|>\n y"] if family == "qwen2" else [])
    for text in prompts:
        assert ours.encode(text, add_special_tokens) == hf(text, add_special_tokens=add_special_tokens)["input_ids"], (
            text
        )


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_equals_transformers(pair, skip_special_tokens):
    _, hf, ours = pair
    for text in PROMPTS:
        ids = hf(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens), text


def test_streaming_decode_never_breaks_a_character(pair):
    _, hf, ours = pair
    for text in PROMPTS:
        ids = hf(text)["input_ids"]
        stream = StreamDecoder(ours, skip_special_tokens=False)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == ours.decode(ids)
        assert all("\ufffd" not in p for p in pieces), text  # a multi-byte character split across tokens waits


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(TokenizerError, match=r"model type 'Unigram'; BPETokenizer reads byte-level BPE"):
        load_tokenizer(tmp_path)
    spec = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=r"merge 'a' \+ 'b' needs 'ab', which is not in the vocab"):
        load_tokenizer(tmp_path)
    for model, extra, message in [
        ({"type": "BPE", "vocab": {"a": 0}, "merges": [5]}, {}, r"not a tokenizer file minivlm can read \(TypeError"),
        ({"type": "BPE", "vocab": {"a": 0}}, {"pre_tokenizer": ["x"]}, r"not a tokenizer file minivlm can read"),
        (
            {"type": "BPE", "vocab": {"a": 0}},
            {"added_tokens": [{"id": 1, "content": ""}]},
            r"tokenizer.json: added token 1: expected a non-empty 'content' string",
        ),
    ]:
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model, **extra}))
        with pytest.raises(TokenizerError, match=message):
            load_tokenizer(tmp_path)
    spec["model"].update(vocab={"a": 0, "b": 1, "ab": 2}, continuing_subword_prefix="##")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=r"continuing_subword_prefix '##' is not supported"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_a_fifo_named_like_a_tokenizer_file_is_refused_without_blocking(tmp_path, name):
    os.mkfifo(tmp_path / name)  # a plain open() would wait for a writer for ever
    with pytest.raises(TokenizerError, match=rf"{name}: not a regular file \(a FIFO\)"):
        load_tokenizer(tmp_path)
