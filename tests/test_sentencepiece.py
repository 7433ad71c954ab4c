"""SentencePiece tokenizers (Llama-2, Vicuna, Mistral) against transformers 5's LlamaTokenizer, on a
SentencePiece BPE model the test trains itself with byte fallback, as Llama-2's was. Each
tokenizer_config variant is read from the bare tokenizer.model and from the tokenizer.json that
transformers saves. Expected: identical ids and identical decoded text."""

from __future__ import annotations

import json

import pytest
import transformers

from minivlm.bench.tiny.vocab import LLAVA15_CONFIG, PROMPTS, train_sentencepiece
from minivlm.processing.tokenizer import SentencePieceTokenizer, StreamDecoder, TokenizerError, load_tokenizer

# Text where SentencePiece's rules show: leading and doubled spaces, added tokens with and without
# spaces around them, the user-defined piece, characters outside the vocab (byte fallback).
SP_PROMPTS = PROMPTS + [
    " Hello  world", "a<image> b", "<image>\nWhat is this?", "x <sep> y<sep>z", "<s>x</s> y",
    "USER: <image>\nDescribe it. ASSISTANT:", "  ", "\n\n", "\u2581 literal", "tab\there",
]  # fmt: skip


VARIANTS = {
    # LLaVA-1.5's tokenizer_config: <image> and <pad> are added past the SentencePiece vocab.
    "llava15": LLAVA15_CONFIG,
    # legacy=true: a "▁" goes in front of the text after every added token too.
    "legacy": {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False},
    "no_prefix_space": {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False,
                        "add_bos_token": True},
    "bos_and_eos": {"tokenizer_class": "LlamaTokenizerFast", "legacy": False, "add_bos_token": True, "add_eos_token": True},
}  # fmt: skip


@pytest.fixture(scope="module")
def model_bytes():
    return train_sentencepiece()


@pytest.fixture(scope="module", params=[(v, layout) for v in VARIANTS for layout in ("model", "json")], ids=str)
def pair(request, model_bytes, tmp_path_factory):
    variant, layout = request.param
    folder = tmp_path_factory.mktemp(variant)
    (folder / "tokenizer.model").write_bytes(model_bytes)
    (folder / "tokenizer_config.json").write_text(json.dumps(VARIANTS[variant]))
    if layout == "json":  # what transformers saves: tokenizer.json beside tokenizer.model
        saved = tmp_path_factory.mktemp(variant + "_saved")
        transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(saved)
        assert (saved / "tokenizer.json").is_file()
        folder = saved
    return transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)


def test_it_is_the_sentencepiece_pipeline(pair):
    hf, ours = pair
    assert isinstance(ours, SentencePieceTokenizer)
    assert hf.backend_tokenizer.model.byte_fallback  # the reference is the byte-fallback BPE, as Llama-2


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_equal_transformers(pair, add_special_tokens):
    hf, ours = pair
    for text in SP_PROMPTS:
        assert ours.encode(text, add_special_tokens) == hf(text, add_special_tokens=add_special_tokens)["input_ids"], (
            text
        )


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_equals_transformers(pair, skip_special_tokens):
    hf, ours = pair
    for text in SP_PROMPTS:
        ids = hf(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens), text
        new = ids[len(ids) // 2 :]  # an answer decoded alone: transformers strips its first space too
        assert ours.decode(new, skip_special_tokens) == hf.decode(new, skip_special_tokens=skip_special_tokens), text


def test_byte_fallback_is_exercised(pair):
    """The corpus must reach characters outside the vocab, or the byte path goes untested."""
    hf, ours = pair
    ids = ours.encode("😀 ٣ ♞")
    assert any(ours.pieces.get(i, "").startswith("<0x") for i in ids)


def test_streaming_decode_equals_decode(pair):
    hf, ours = pair
    for text in SP_PROMPTS:
        ids = hf(text)["input_ids"]
        for skip in (True, False):
            stream = StreamDecoder(ours, skip_special_tokens=skip)
            pieces = [stream.push(i) for i in ids] + [stream.flush()]
            assert "".join(pieces) == ours.decode(ids, skip), text
            assert all("\ufffd" not in p for p in pieces), text


def test_segments_are_cut_into_cached_words(tmp_path, model_bytes):
    """No piece of the trained model holds a character followed by "▁", so words merge alone."""
    (tmp_path / "tokenizer.model").write_bytes(model_bytes)
    assert load_tokenizer(tmp_path).fast_path == "words"


def test_without_byte_fallback(tmp_path):
    """A model without byte pieces: transformers drops a character that has no piece (its
    LlamaTokenizer's BPE has no unknown token), and the neighbours of that character may then merge."""
    (tmp_path / "tokenizer.model").write_bytes(train_sentencepiece(byte_fallback=False))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(VARIANTS["llava15"]))
    hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    for text in SP_PROMPTS + ["x😀y", "😀😀 ٣♞"]:
        ids = hf(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids), text


def test_bad_sentencepiece_files(tmp_path, model_bytes):
    (tmp_path / "tokenizer.model").write_bytes(model_bytes[: len(model_bytes) // 2])
    with pytest.raises(TokenizerError, match=r"tokenizer.model: not a readable SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"tokenizer.model: not a SentencePiece model \(the file is empty\)"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(model_bytes)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    with pytest.raises(TokenizerError, match=r"class 'GemmaTokenizer'; minivlm reproduces LlamaTokenizer's pipeline"):
        load_tokenizer(tmp_path)
