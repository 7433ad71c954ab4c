"""Byte-level BPE tokenizers against transformers, on tokenizers the test trains itself with each
family's pipeline (pre-tokenizer pattern, normalizer, post-processor, added tokens). Expected:
identical ids and identical decoded text."""

from __future__ import annotations

import json
import os

import pytest
import transformers

from minivlm.bench.tiny.vocab import PROMPTS, SPECIALS, train_bpe
from minivlm.processing.tokenizer import StreamDecoder, TokenizerError, load_tokenizer


@pytest.fixture(scope="module", params=sorted(SPECIALS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    train_bpe(request.param, folder)
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
