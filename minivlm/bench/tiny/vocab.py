"""Tokenizers trained here, in seconds, with each family's pipeline: what the tiny checkpoints
carry when no real vocabulary is given (tests/real_files.py fetches real ones for the tests).

- `train_bpe(family, folder)`: byte-level BPE trained with the `tokenizers` library on CORPUS, with
  the family's pre-tokenizer pattern, normalizer, post-processor and added tokens (SPECIALS);
- `train_sentencepiece()`: a Llama-2-like SentencePiece BPE model with byte fallback, and
  `build_llava15(folder)`: it as a LLaVA-1.5 tokenizer folder.
Both are saved as transformers saves them.
"""

from __future__ import annotations

import io
import json

import sentencepiece
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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


def train_bpe(family: str, folder) -> None:
    """A byte-level BPE tokenizer trained on CORPUS with `family`'s pipeline, saved by transformers into `folder`."""
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


SENTENCEPIECE_VOCAB = 700


def special(content: str) -> dict:
    return {
        "content": content,
        "special": True,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
    }


# LLaVA-1.5's tokenizer_config: <image> and <pad> are added past the SentencePiece vocab.
LLAVA15_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "legacy": False,
    "add_bos_token": True,
    "add_eos_token": False,
    "pad_token": "<pad>",
    "added_tokens_decoder": {
        str(SENTENCEPIECE_VOCAB): special("<image>"),
        str(SENTENCEPIECE_VOCAB + 1): special("<pad>"),
    },
}


def train_sentencepiece(byte_fallback: bool = True) -> bytes:
    """A Llama-2-like SentencePiece model: BPE, byte fallback, digits split, no normaliser, spaces kept."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(PROMPTS[:10] * 20),
        model_writer=model,
        vocab_size=SENTENCEPIECE_VOCAB,
        model_type="bpe",
        byte_fallback=byte_fallback,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=0.99,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["<sep>"],
        minloglevel=2,
    )
    return model.getvalue()


def build_llava15(folder) -> None:
    """A LLaVA-1.5-style tokenizer folder: tokenizer.model and its tokenizer_config.json."""
    (folder / "tokenizer.model").write_bytes(train_sentencepiece())
    (folder / "tokenizer_config.json").write_text(json.dumps(LLAVA15_CONFIG))
