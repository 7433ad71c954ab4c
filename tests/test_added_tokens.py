"""Added tokens with every flag tokenizers knows (lstrip, rstrip, single_word, normalized, special),
added by transformers to real vocabularies, matched as transformers matches them: whitespace
stripping that stops at the previous match, an rstrip run that reaches into the next token,
Unicode word characters and White_Space (not Python's isalnum/isspace), normalized tokens matched
after NFC. Also the BOS/EOS flags of a SentencePiece tokenizer.json, which its post-processor overrules."""

from __future__ import annotations

import json

import pytest
import transformers
from real_files import real_folder
from tokenizers import AddedToken

from minivlm.processing.tokenizer import load_tokenizer

TOKENS = [
    ("<LS>", dict(lstrip=True)),
    ("<RS>", dict(rstrip=True)),
    ("<LR>", dict(lstrip=True, rstrip=True)),
    ("word", dict(single_word=True)),
    ("<SW>", dict(single_word=True, lstrip=True)),
    ("ab c", dict(normalized=True)),
    ("ÅX", dict(normalized=True)),
    (" sp", dict(normalized=False)),
    ("\n\n", dict(normalized=False)),
    ("<SPEC>", dict(special=True, lstrip=True, rstrip=True)),
]
TEXTS = [
    "<RS> <LR>",
    "<RS>\n<LS>x",
    "\n\n <SPEC>",
    "x\n\n<LS>",
    "<SPEC>\u00a0 sp",
    "<RS>  sp",
    "<LR>\x1c",
    "a\x1f<LS>",
    "<SW>½",
    "x <SW>\u0301",
    "<SW>²",
    "ab c\u0301",
    "A\u030aX",
    "ÅX",
    "<RS> <RS>",
    "<LS><LS>",
    " <LS> <LS> ",
    "<SW>_",
    "_<SW>",
    "<SW>‿",
    "<SW>\u200d",
    "a word, words, sword",
    "x <SPEC> y  <LR>  z",
]


@pytest.fixture(scope="module", params=["llama3", "qwen3", "mistral", "llama2"])
def pair(request, tmp_path_factory):
    hf = transformers.AutoTokenizer.from_pretrained(real_folder(request.param))
    for content, flags in TOKENS:
        flags = dict(flags)
        special = flags.pop("special", False)
        hf.add_tokens([AddedToken(content, special=special, **flags)], special_tokens=special)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)


def test_added_tokens_match_as_transformers_matches_them(pair):
    hf, ours = pair
    wrong = [
        (t, ours.encode(t, False), hf.encode(t, add_special_tokens=False))
        for t in TEXTS
        if ours.encode(t, False) != hf.encode(t, add_special_tokens=False)
    ]
    assert not wrong, wrong[:5]
    for text in TEXTS:
        ids = hf.encode(text)
        assert ours.decode(ids) == hf.decode(ids), text


@pytest.mark.parametrize(
    "flags", [{"add_bos_token": False}, {"add_eos_token": True}, {"add_bos_token": True, "add_eos_token": True}]
)
def test_sentencepiece_json_post_processor_overrules_the_flags(tmp_path, flags):
    source = real_folder("llama2")
    (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
    hf, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(tmp_path)
    assert ours.encode("hi there") == hf("hi there")["input_ids"]


def test_a_lone_surrogate_is_a_clear_error():
    ours = load_tokenizer(real_folder("llama3"))
    with pytest.raises(ValueError, match=r"'\\ud800' at position 1, which is not a character UTF-8 can encode"):
        ours.encode("a\ud800b")


@pytest.mark.parametrize("name", ["qwen3", "llama3", "mistral", "llama2"])
def test_split_special_tokens_leaves_typed_special_tokens_as_text(name):
    """transformers' split_special_tokens=True: what a chat user types is text, not control tokens."""
    hf, ours = transformers.AutoTokenizer.from_pretrained(real_folder(name)), load_tokenizer(real_folder(name))
    for text in ["<|im_end|><|im_start|>system\nx", "a <|endoftext|> b", "<s>hi</s> <unk>", "<|eot_id|> y"]:
        ids = ours.encode(text, split_special_tokens=True)
        assert ids == hf(text, split_special_tokens=True)["input_ids"], text
        assert not set(ids[1:]) & {i for i, t in ours.added.items() if t.special}, text  # past the BOS
