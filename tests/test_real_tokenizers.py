"""minivlm's tokenizers on real vocabularies trained by others, against transformers.

The folders come from tests/real_files.py (`python tests/real_files.py` fetches them into
tests/.real/); the texts from tests/corpus.py, plus each tokenizer's own special and added tokens
typed inside texts. For every real tokenizer: the ids of every text with and without special
tokens, the decoding of those ids (whole, and the second half alone) with and without
skip_special_tokens, ids past the vocabulary (an embedding matrix with more rows than the tokenizer
has tokens), and, where the files carry one, the chat template.

The reference is `transformers.AutoTokenizer.from_pretrained(folder)`: what transformers does with
these files is what minivlm must do, quirks included (e.g. transformers 5 reads a SentencePiece
model under LlamaTokenizer as BPE, and ignores clean_up_tokenization_spaces for BPE tokenizers).

A failure names the tokenizer, how many texts differ, and the first few with both id lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import transformers
from corpus import CORPUS, with_specials
from real_files import REAL, real_folder

NAMES = list(REAL)
SHOW = 5  # failing texts shown in a message

# The real folders whose tokenizer_config.json carries a chat template (checked below).
CHAT = ["llama3", "qwen3", "deepseek_v3"]

# Rows of the embedding matrix of real models using these vocabularies, when more than the
# tokenizer has tokens: Qwen2/Qwen3's 151,936; LLaVA-1.5's (Llama-2) and llava-v1.6-mistral's
# 32,064; llama3-llava-next-8b's 128,320; DeepSeek-V3's 129,280. Others get 64 rows to spare.
EMBEDDING_ROWS = {"qwen3": 151_936, "llama2": 32_064, "mistral": 32_064, "llama3": 128_320, "deepseek_v3": 129_280}

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello!"}],
    "system and user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "Describe a cat."},
        {"role": "assistant", "content": "A cat is a small furry animal that purrs."},
        {"role": "user", "content": "And a dog?"},
    ],
    "ends with the assistant": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
    ],
    "non-ASCII": [
        {"role": "user", "content": "你好，世界！🙂 Привет, мир. مرحبا"},
        {"role": "assistant", "content": "こんにちは！👋🏽 안녕하세요."},
        {"role": "user", "content": "Café, naïve, Zürich — «ok»?"},
    ],
    "whitespace and newlines": [
        {"role": "system", "content": "  padded system prompt \n\n"},
        {"role": "user", "content": "\nline one\r\nline two\n\n\tindented\n"},
    ],
    "reasoning in an earlier turn": [
        {"role": "user", "content": "What is 3*7?"},
        {"role": "assistant", "content": "<think>\n3*7 = 21\n</think>\n\n21"},
        {"role": "user", "content": "And 4*5?"},
    ],
}


@dataclass
class Pair:
    name: str
    folder: Path
    ref: object  # the transformers tokenizer
    ours: object  # minivlm's
    texts: list[str]


def _added_tokens(ref) -> list[str]:
    """The tokenizer's special and added tokens, by id (the specials transformers knows first)."""
    added = [t.content for _, t in sorted(ref.added_tokens_decoder.items())]
    return list(dict.fromkeys([*ref.all_special_tokens, *added]))


@pytest.fixture(scope="module", params=NAMES)
def pair(request) -> Pair:
    """Both tokenizers of one real folder, loaded once per module."""
    name = request.param
    folder = real_folder(name)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    from minivlm.processing.tokenizer import load_tokenizer  # here, so a broken import fails each test, not collection

    ours = load_tokenizer(folder)
    return Pair(name, folder, ref, ours, CORPUS + with_specials(_added_tokens(ref)))


# -- reporting -----------------------------------------------------------------------------------


def _short(text: str, limit: int = 100) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 5] + "...'" + f" ({len(text)} chars)"


def _ids(ids, other=None) -> str:
    """An id list; a long one cut to 30 ids from a little before where it first differs from `other`."""
    if not isinstance(ids, list) or len(ids) <= 40:
        return str(ids)
    other = other if isinstance(other, list) else []
    first = next((i for i, (x, y) in enumerate(zip(ids, other)) if x != y), min(len(ids), len(other)))
    lo = max(0, first - 5)
    return f"(len {len(ids)}, from position {lo}) {ids[lo : lo + 30]}"


def _report(p: Pair, what: str, bad: list[tuple], total: int, show_ids: bool = True) -> str:
    lines = [f"{p.name}: {len(bad)} of {total} differ ({what}); the first {min(SHOW, len(bad))}:"]
    for item in bad[:SHOW]:
        text, ref, ours = item[:3]
        lines.append(f"  text {_short(text)}" + (f" ids {_ids(item[3])}" if len(item) > 3 else ""))
        if show_ids:  # ours is an id list, or "raised ..." when minivlm raised on this text
            lines.append(f"    transformers {_ids(ref, ours)}\n    minivlm      {_ids(ours, ref)}")
        else:
            lines.append(f"    transformers {_short(ref, 200)}\n    minivlm      {_short(ours, 200)}")
    return "\n".join(lines)


def _fail_if(bad: list, message: str) -> None:
    if bad:
        pytest.fail(message, pytrace=False)


def _ours(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (a crash on one text is reported with the others)
        return f"raised {type(e).__name__}: {e}"


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode(pair, add_special_tokens):
    bad = []
    for text in pair.texts:
        ref = pair.ref.encode(text, add_special_tokens=add_special_tokens)
        ours = _ours(pair.ours.encode, text, add_special_tokens)
        if ours != ref:
            bad.append((text, ref, ours))
    _fail_if(bad, _report(pair, f"ids, add_special_tokens={add_special_tokens}", bad, len(pair.texts)))


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("part", ["all ids", "second half"])
def test_decode(pair, skip_special_tokens, part):
    """Decoding transformers' own ids (so a wrong encode does not hide or cause a decode failure)."""
    bad = []
    for text in pair.texts:
        ids = pair.ref.encode(text, add_special_tokens=True)
        if part == "second half":
            ids = ids[len(ids) // 2 :]
        ref = pair.ref.decode(ids, skip_special_tokens=skip_special_tokens)
        ours = _ours(pair.ours.decode, ids, skip_special_tokens)
        if ours != ref:
            bad.append((text, ref, ours, ids))
    what = f"decode of {part}, skip_special_tokens={skip_special_tokens}"
    _fail_if(bad, _report(pair, what, bad, len(pair.texts), show_ids=False))


def test_ids_past_the_vocabulary(pair):
    """An embedding matrix often has more rows than the tokenizer has tokens, so a model can emit an
    id the tokenizer lacks. transformers 5 decodes such an id to nothing (it is dropped, no error);
    minivlm must do the same and never raise."""
    n = len(pair.ref)
    rows = max(EMBEDDING_ROWS.get(pair.name, 0), n + 64)
    hello = pair.ref.encode("Hello world", add_special_tokens=False)
    cases = [
        [n],
        [rows - 1],
        [n, n + 1, rows - 1],
        [*hello, n],
        [n, *hello],
        [hello[0], rows - 1, *hello[1:]],
        [*hello, n, *hello],
        [*pair.ref.encode("你好🙂", add_special_tokens=True), n + 3],
    ]
    bad = []
    for ids in cases:
        for skip in (False, True):
            ref = pair.ref.decode(ids, skip_special_tokens=skip)
            ours = _ours(pair.ours.decode, ids, skip)
            if ours != ref:
                bad.append((f"skip_special_tokens={skip}", ref, ours, ids))
    _fail_if(bad, _report(pair, f"decode with ids from {n} up to {rows - 1}", bad, 2 * len(cases), show_ids=False))


def test_decode_each_id(pair):
    """Every id of the vocabulary decoded alone and after a word (a byte-level token that is part of
    a UTF-8 character, a SentencePiece byte piece, a piece with the space marker); every added or
    special token also with skip_special_tokens=True."""
    ref, ours = pair.ref, pair.ours
    word = ref.encode("Hello", add_special_tokens=False)[:1]
    added = sorted(ref.added_tokens_decoder)
    cases = [([i], False) for i in range(len(ref))] + [([*word, i], False) for i in range(len(ref))]
    cases += [([i], True) for i in added] + [([*word, i, *word], True) for i in added]
    expected = ref.batch_decode([ids for ids, skip in cases if not skip], skip_special_tokens=False)
    expected += ref.batch_decode([ids for ids, skip in cases if skip], skip_special_tokens=True)
    bad = []
    for (ids, skip), e in zip(cases, expected):
        got = _ours(ours.decode, ids, skip)
        if got != e:
            bad.append((f"skip_special_tokens={skip}", e, got, ids))
    _fail_if(bad, _report(pair, "decode of one id", bad, len(cases), show_ids=False))


def test_chat_folders():
    """CHAT lists exactly the real folders whose tokenizer_config.json carries a chat template."""
    have = [
        n for n in NAMES if "chat_template" in json.loads((real_folder(n) / "tokenizer_config.json").read_text("utf-8"))
    ]
    assert have == CHAT


def _minivlm_chat(folder: Path, messages, add_generation_prompt: bool) -> str:
    """What Processor.apply_chat_template does for a text-only checkpoint: the folder's template
    (find_chat_template) rendered with the tokenizer_config's special tokens (render)."""
    from minivlm.processing.chat import find_chat_template, render

    config = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    special = {
        name: (v["content"] if isinstance(v, dict) else v)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if (v := config.get(name)) is not None
    }
    return render(find_chat_template(folder), messages, add_generation_prompt, **special)


@pytest.fixture(scope="module", params=CHAT)
def chat_pair(request):
    folder = real_folder(request.param)
    return request.param, folder, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template(chat_pair, add_generation_prompt):
    name, folder, ref = chat_pair
    bad = []
    for title, messages in CONVERSATIONS.items():
        try:
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001  (the template refuses it: minivlm must refuse it too)
            expected = f"refused: {type(e).__name__}: {e}"
        try:
            got = _minivlm_chat(folder, messages, add_generation_prompt)
        except Exception as e:  # noqa: BLE001
            got = expected if expected.startswith("refused") else f"raised {type(e).__name__}: {e}"
        if got != expected:
            bad.append((title, expected, got))
    lines = [
        f"{name}: {len(bad)} of {len(CONVERSATIONS)} conversations render differently (add_generation_prompt={add_generation_prompt}):"
    ]
    lines += [f"  {t}\n    transformers {e!r}\n    minivlm      {g!r}" for t, e, g in bad[:SHOW]]
    _fail_if(bad, "\n".join(lines))
