"""A tokenizer test corpus: texts written for these tests or generated here, deterministically.

`CORPUS` (a list of str, several hundred texts, no duplicates, always in the same order) covers
what tends to break a reimplementation of a tokenizer: many scripts, emoji sequences, code,
whitespace runs of every length, tabs and every kind of newline, control characters, numbers of
many lengths, punctuation runs (Llama-3's pattern treats them specially), repetitions (BPE merges
of "aaaa"), combining marks and NFC/NFD/NFKC forms, mixed scripts, long words, leading and
trailing whitespace, the empty string, and text that looks like markup or special tokens without
being one. `with_specials(specials)` splices a tokenizer's own special tokens into texts.

Nothing here is copied from a published text: the prose is written for this file, the rest is
generated (with a fixed seed where anything is drawn at random).
"""

from __future__ import annotations

import random
import unicodedata

ENGLISH = [
    "The quick test passed on the first try, which surprised everyone in the room.",
    "She said it's fine, but they'd rather we didn't ship it before Friday.",
    "I'M SHOUTING BECAUSE THE CAPS LOCK KEY IS STUCK. DON'T WORRY, WE'LL FIX IT.",
    "Tokenizers split text into pieces; models only ever see the pieces.",
    "A photo of a red bicycle leaning against a yellow wall, late in the afternoon.",
    "What is shown in this image? Describe it in one sentence.",
    "Mr. Smith (no relation) paid $1,234.56 for 3 books -- roughly 411.52 each.",
    "e.g., i.e., etc. and vs. are abbreviations; U.S.A. and Ph.D. too.",
    "Hello, world!",
    "hello world",
    "Hello World",
    "HELLO WORLD",
    "   indented sentence with three leading spaces",
    "It’s a curly apostrophe, “and these are curly quotes,” she wrote.",
    "They've been here; we're leaving; you'll see; I'd know; he's gone; it'll do.",
    "Well...  that's odd!!  Isn't it??  Maybe -- or maybe not.",
    'The model answered: "Two cats are sleeping on a sofa."',
    "Line one.\nLine two.\n\nA new paragraph after a blank line.",
    "Q: How many legs does a spider have?\nA: Eight.",
    "user: describe the chart\nassistant: The chart shows rising sales from 2019 to 2023.",
    "1. First item\n2. Second item\n   - nested bullet\n   - another one\n3. Third item",
    "# A Markdown heading\n\nSome *emphasis*, some **strong** text, and `inline code`.",
    "| col a | col b |\n|-------|-------|\n| 1     | 2     |",
    "Visit https://example.com/path?query=1&other=two#frag or mail someone@example.org.",
    "C:\\Users\\someone\\Documents\\file name (1).txt",
    "/usr/local/lib/python3.12/site-packages/some_module/__init__.py",
    "naïve café résumé coöperate façade jalapeño Zürich São Paulo",
    "The temperature dropped to -12°C, about 10.4°F, at 06:45 on 2024-01-15.",
    '<html><body><p class="x">Not a special token</p></body></html>',
    "[INST] not really an instruction tag [/INST] <<SYS>> nor a system tag <</SYS>>",
    "<s> </s> <unk> <pad> <|endoftext|> <|im_start|> typed as plain text by someone",
    "<image> <video> <|image_pad|> placeholders typed by a user",
    "@user #hashtag $TICKER %percent ^caret &amp *star (paren) _under_ +plus =eq",
    "i",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "The  double  spaced  sentence  keeps  its  gaps.",
    "Ends with a space ",
    " Starts with a space",
    "\tStarts with a tab",
    "Ends with a newline\n",
    "\nStarts with a newline",
]

CHINESE = [
    "你好，世界！",
    "这是一个用于测试分词器的中文句子。",
    "图片里有一只猫在沙发上睡觉，旁边放着一本书。",
    "请用一句话描述这张图片的内容。",
    "今天天气很好，我们去公园散步吧。",
    "机器学习模型把文本切分成词元，再把词元映射为数字。",
    "中文标点：，。！？；：“引号”（括号）【方括号】《书名号》、顿号……省略号——破折号",
    "数字混排：2024年1月15日，价格为￥1,299.00元，增长了12.5%。",
    "繁體中文也應該正確處理，例如「這樣」的引號。",
]

JAPANESE = [
    "こんにちは、世界！",
    "これはトークナイザーのテスト用の日本語の文章です。",
    "東京で午後三時に会いましょう。",
    "カタカナのテキスト：コンピューター、プログラム、データベース。",
    "ひらがなだけのぶんしょうもためしてみます。",
    "全角の数字１２３と半角の数字123、全角英字ＡＢＣ。",
    "「かぎかっこ」と『二重かぎかっこ』、それから・中黒。",
    "ｶﾀｶﾅの半角文字も含めます。",
]

KOREAN = [
    "안녕하세요, 세계!",
    "이것은 토크나이저를 시험하기 위한 한국어 문장입니다.",
    "사진에는 고양이 두 마리가 소파 위에서 자고 있습니다.",
    "오늘은 2024년 1월 15일 월요일입니다.",
]

ARABIC = [
    "مرحبا بالعالم!",
    "هذه جملة عربية لاختبار المقسم إلى رموز.",
    "الأرقام العربية: ٠١٢٣٤٥٦٧٨٩ والأرقام الغربية 0123456789.",
    "كتبتُ النصَّ بالتشكيلِ الكاملِ.",
    "النص العربي مع English في الوسط.",
]

HINDI = [
    "नमस्ते दुनिया!",
    "यह टोकनाइज़र की जाँच के लिए एक हिंदी वाक्य है।",
    "तस्वीर में एक लाल साइकिल दीवार के सहारे खड़ी है।",
    "देवनागरी अंक: ०१२३४५६७८९",
]

RUSSIAN = [
    "Привет, мир!",
    "Это русское предложение для проверки токенизатора.",
    "На фотографии две кошки спят на диване.",
    "ЗАГЛАВНЫЕ БУКВЫ И строчные буквы, а также ёлка и Ёж.",
    "Съешь же ещё этих мягких булок, да выпей чаю.",
]

THAI = [
    "สวัสดีชาวโลก",
    "นี่คือประโยคภาษาไทยสำหรับทดสอบตัวตัดคำ",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "ตัวเลขไทย ๐๑๒๓๔๕๖๗๘๙",
]

OTHER_SCRIPTS = [
    "Γειά σου κόσμε! Ελληνικά γράμματα: αβγδεζηθ ΑΒΓΔ.",
    "שלום עולם, זה משפט בעברית.",
    "Xin chào thế giới! Tiếng Việt có nhiều dấu thanh.",
    "Olá, mundo! Ação, coração, pão, irmã.",
    "Grüße aus Köln: Straße, Maß, Fuß, ÄÖÜ äöü ß ẞ.",
    "Zażółć gęślą jaźń.",
    "Ελληνικά ΚΕΦΑΛΑΙΑ και τελικό σίγμα: ς.",
    "ქართული ანბანი",
    "Հայերեն գրեր",
    "ᚠᚢᚦᚨᚱᚲ runes",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉 𝟘𝟙𝟚𝟛",
    "𠀀𠀁𠀂 CJK extension B and 𓀀𓀁 hieroglyphs",
    "Private use: \ue000\ue001\uf8ff and noncharacters \ufdd0\ufffe",
    "Replacement character: \ufffd and BOM: \ufeff in the middle",
    "▁ is SentencePiece's space marker, Ġ and Ċ are byte-level's.",
    "▁▁▁three markers ▁a▁b▁c",
    "ĠHello ĊWorld ĉtab",
]

EMOJI = [
    "🙂",
    "😀😃😄😁😆😅😂🤣",
    "I love it ❤️ so much 🔥🔥🔥",
    "Family: 👨‍👩‍👧‍👦 and 👩‍👩‍👦 and 👨‍👨‍👧‍👧",
    "Rainbow flag 🏳️‍🌈, pirate flag 🏴‍☠️, transgender flag 🏳️‍⚧️",
    "Flags: 🇯🇵 🇺🇸 🇩🇪 🇧🇷 🇮🇳 🇪🇺",
    "🇯🇵🇺🇸🇩🇪",
    "Skin tones: 👍🏻 👍🏼 👍🏽 👍🏾 👍🏿",
    "👩🏽‍💻 👨🏿‍🚀 🧑🏻‍🎨 🤝🏾",
    "Keycaps: 1️⃣ 2️⃣ #️⃣ *️⃣",
    "Variation selectors: ☺ ☺️ ☺︎ ✔ ✔️",
    "Subdivision flag: 🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "emoji🙂glued🙂to🙂words",
    "🐈🐈‍⬛🐕🦮",
    "Math and symbols: ∑∫√∞≈≠≤≥ ∀x∈ℝ ⇒ ∃y ← → ↔ ©®™ §¶ †‡ •",
    "Box drawing: ┌──┐ │  │ └──┘ ░▒▓█",
]

PYTHON = '''def greet(name: str) -> str:
    """Return a greeting."""
    if not name:
        raise ValueError("empty name")
    return f"Hello, {name}!"


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, step=1):
        self.n += step
        return self.n
'''

PYTHON_TABS = "def f(x):\n\tif x:\n\t\treturn x * 2\n\treturn None\n"

JSON = '{\n  "name": "example",\n  "version": "1.0.0",\n  "values": [1, 2.5, -3, 1e-10, null, true, false],\n  "nested": {"key": "value with \\"quotes\\" and \\\\ backslash", "unicode": "\\u00e9"}\n}'

JSON_COMPACT = '{"a":1,"b":[1,2,3],"c":{"d":"e"},"f":"g h","i":null}'

C_CODE = """#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    for (int i = 0; i < argc; ++i) {
        printf("%d: %s\\n", i, argv[i]);
    }
    int *p = malloc(16 * sizeof(int));
    if (p == NULL) return 1;
    free(p);
    return 0;
}
"""

SHELL = """#!/usr/bin/env bash
set -euo pipefail
for f in *.txt; do
  wc -l "$f" | awk '{print $1}' >> counts.log 2>&1
done
echo "done: $(date +%Y-%m-%d)" && ls -la | grep -v '^total' || true
"""

CODE = [
    PYTHON,
    PYTHON_TABS,
    JSON,
    JSON_COMPACT,
    C_CODE,
    SHELL,
    "x = [i ** 2 for i in range(10) if i % 2 == 0]  # squares of evens",
    "if (a && b || !c) { return a->b[0] << 2 >>= 1; }",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;",
    '<div id="main" style="color: #ff0000;">&lt;escaped&gt; &amp; &quot;</div>',
    "const f = async (x) => { await g(x ?? 0); return `value: ${x}`; };",
    "    return self.weight * x + self.bias\n",
    "print('tokenizer')\r\nprint(\"windows line endings\")\r\n",
    "a=1;b=2;c=a+b;print(c)",
    "regex: ^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@\\w+\\.[a-z]{2,}$",
    "0x1F 0xDEADBEEF 0b1010 0o777 1_000_000 3.14e+10 -0.0 .5 5.",
    'git commit -m "fix: handle \\r\\n in prompts" && git push origin main',
]

NORMALIZATION = [
    "caf\u00e9",  # é precomposed (NFC)
    "cafe\u0301",  # e + combining acute (NFD)
    "\u00c5ngstr\u00f6m",  # Å precomposed
    "A\u030angstro\u0308m",  # decomposed
    "\u212b",  # ANGSTROM SIGN, NFC -> Å
    "\u2126 ohm sign and \u03a9 omega",
    "\ufb01nance \ufb02ow \ufb00",  # ligatures (NFKC splits them)
    "\uff21\uff22\uff23\uff11\uff12\uff13",  # fullwidth
    "\u2460\u2461\u2462 \u00b2\u00b3\u00b9 x\u00b2 H\u2082O",  # circled digits, super/subscripts
    "\u210c\u2115\u211d \u2102",  # letterlike symbols
    "\u00bd \u00bc \u2153 fractions",
    "a\u0301\u0302\u0303\u0304\u0305 stacked combining marks",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u0334\u0335\u031c\u0330\u0354L\u0328\u0357\u0313\u036e\u035c",
    unicodedata.normalize("NFD", "Tiếng Việt có nhiều dấu"),
    unicodedata.normalize("NFC", "Tiếng Việt có nhiều dấu"),
    unicodedata.normalize("NFD", "한국어 자모"),  # Hangul decomposed into jamo
    unicodedata.normalize("NFD", "ñandú pingüino çà"),
    "\u0915\u094d\u0937 \u0924\u094d\u0930 conjuncts",
    "non\u00a0breaking\u2009thin\u202fnarrow\u3000ideographic\u2003em spaces",
    "zero\u200bwidth\u200cnon\u200djoiner\u2060word",
    "soft\u00adhyphen and \u2010hyphen \u2011nb \u2013en \u2014em \u2212minus",
    "\u201cquotes\u201d \u2018single\u2019 \u00abguillemets\u00bb \u201elow\u201c \u2039single\u203a",
    "\u0130stanbul \u0131 \u0049 \u0069 dotted and dotless i",
    "\u1e9e \u00df SS ss",
    "\u01c4 \u01c5 \u01c6 digraphs",
]

WORDS = [
    "Donaudampfschiffahrtsgesellschaftskapitaenswitwenrente",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism",
    "internationalization localization i18n l10n",
    "ThisIsAVeryLongCamelCaseIdentifierThatKeepsGoingAndGoing",
    "this_is_a_very_long_snake_case_identifier_that_keeps_going",
    "SCREAMING_SNAKE_CASE_CONSTANT_VALUE",
    "aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZW5jb2RlZCB0ZXh0Cg==",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "https://example.com/a/very/long/path/with/many/segments/and-dashes_and_underscores/index.html",
    "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch",
]

MIXED = [
    "Hello世界",
    "東京Tokyo2024年",
    "Привет мир hello world",
    "مرحبا world שלום",
    "日本語とEnglishと한국어と中文",
    "x = '你好'  # コメント",
    "GPT-4o和Llama-3都是大模型。",
    "5个苹果and 3 oranges",
    "αβγ123abcАБВ",
    "नमस्ते hello สวัสดี 안녕",
    "ÀÉÎÕÜ àéîõü",
    "smile😀smile 笑😀笑",
]


def _controls() -> list[str]:
    chars = [chr(c) for c in range(0x20)] + ["\x7f", "\x85", "\u2028", "\u2029", "\x80", "\x9f", "\xa0"]
    out = [f"a{c}b" for c in chars]
    out += ["".join(chr(c) for c in range(1, 0x20)), "\x00", "\x00\x00\x00", "end with nul\x00", "\x1b[31mred\x1b[0m"]
    out += ["a\u2028b\u2029c", "\x0b\x0c vertical tab and form feed", "bell\x07 backspace\x08"]
    return out


def _whitespace() -> list[str]:
    out = []
    for n in range(1, 41):
        out.append(f"a{' ' * n}b")
    for n in (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 40):
        out += [" " * n, f"{' ' * n}x", f"x{' ' * n}", f"x{' ' * n}\ny", f"{' ' * n}\n"]
    out += ["\t", "\t\t", "\t\t\t\t", "a\tb", "a\t\tb", "\tx", "x\t", " \t \t ", "a \t b", "\t \n \t"]
    out += ["\n", "\n\n", "\n\n\n", "\n" * 8, "a\nb", "a\n\nb", "a\n\n\n\nb"]
    out += ["\r\n", "\r\n\r\n", "a\r\nb", "a\r\n\r\nb", "\r", "a\rb", "a\r\rb"]
    out += ["mixed\n\r\nnewlines\r\n\nhere\r", "line\n \nline", "line \nline", "line\n line", " \n ", "\n \n \n"]
    out += ["word\n\n\n   indented after blanks", "  \n\n  two spaces around", "trailing spaces   \n"]
    out += ["a \n\tb", "\n\t\n", "x \r\n y"]
    return out


def _numbers() -> list[str]:
    digits = "1234567890"
    out = [(digits * 3)[:n] for n in range(1, 26)]
    out += [f"n{(digits * 3)[:n]}n" for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 13)]
    out += [f" {(digits * 3)[:n]}" for n in (1, 3, 4, 7)]
    out += ["0", "00", "000", "0000", "007", "100", "1000", "1,000", "1,000,000", "1.000.000,50"]
    out += ["3.14159265358979", "-42", "+7", "1e10", "6.022e23", "2^64 = 18446744073709551616"]
    out += ["+1 (555) 010-9999", "2024-01-15T13:45:30Z", "v1.2.3-rc.4", "192.168.0.1:8080", "1/2 3/4 99%"]
    out += ["١٢٣ ۱۲۳ १२३ ๑๒๓ １２３", "Ⅰ Ⅱ Ⅲ Ⅳ ⅰⅱⅲ", "12abc34def5678"]
    return out


def _punctuation() -> list[str]:
    out = []
    for ch in "-.=":
        for n in range(1, 34):
            out.append(ch * n)
    for ch in "_*#~!?/\\+:;,'\"`|<>()[]{}@$%^&":
        for n in (1, 2, 3, 4, 8, 16):
            out.append(ch * n)
    for run in ("---", "----", "-----", "........", "====", "======", "****", "____", "~~~", "!!!", "???"):
        out += [f"word{run}word", f"word {run} word", f"{run}\n", f"\n{run}\n", f" {run}", f"{run} ", f"{run}\r\n"]
    out += ["-->", "<!--", "...!?!", "?!?!?!", "'''", '"""', "```python", "```\n", "::", "->", "=>", "!=", "==", "<=>"]
    out += ["a--b", "a...b", "(-_-)", "¯\\_(ツ)_/¯", "(╯°□°)╯︵ ┻━┻", "—–-‒―", "…", "。。。", "！！", "？？"]
    return out


def _repetitions() -> list[str]:
    out = []
    for n in (2, 3, 4, 5, 7, 8, 16, 33, 64, 100):
        out += ["a" * n, "ab" * n]
    for n in (3, 10, 50):
        out += ["abc" * n, "the " * n, "🙂" * n, "中" * n, "ー" * n, "ha" * n, "0" * n, " a" * n, "\n\n" * n]
    out += ["Aa" * 20, "aAaA" * 10, "e" * 257, "x" * 1000]
    return out


def _generated(seed: int = 20240115) -> list[str]:
    """Random strings from a fixed seed: words from a mixed alphabet, and random mixes of the pieces above."""
    rng = random.Random(seed)
    alphabet = (
        "abcdefghijklmnopqrstuvwxyz" * 3
        + "ABCDEFGHIJ"
        + "0123456789"
        + "éüñçø"
        + "中文日本語한국어"
        + "абвгд"
        + " " * 12
        + ".,;!?-'\n\t"
    )
    out = []
    for _ in range(30):
        n = rng.randint(1, 120)
        out.append("".join(rng.choice(alphabet) for _ in range(n)))
    pool = ENGLISH + CHINESE + JAPANESE + EMOJI + WORDS + MIXED
    separators = ["", " ", "  ", "\n", "\t", " \n", "\r\n", "---", "...", "123"]
    for _ in range(25):
        k = rng.randint(2, 4)
        parts = [rng.choice(pool) for _ in range(k)]
        out.append("".join(p + rng.choice(separators) for p in parts))
    # one long document (a few thousand characters) of everything above, in a shuffled order
    long = pool + CODE + NORMALIZATION + KOREAN + ARABIC + HINDI + RUSSIAN + THAI
    out.append("\n\n".join(rng.sample(long, len(long))))
    return out


def _edges() -> list[str]:
    return [
        "",
        " ",
        "a",
        "A",
        "1",
        ".",
        "'",
        "'s",
        "'S",
        "it's IT'S It'S",
        "don't DON'T won't can't",
        "you'll YOU'LL we've WE'VE they're THEY'RE I'd I'D I'm",
        "'re 're 'll 'd 've 'm 't",
        "rock'n'roll o'clock",
        "  leading two spaces",
        "trailing two spaces  ",
        "  both sides  ",
        "\n\nleading newlines",
        "trailing newlines\n\n",
        "\t\tleading tabs",
        " \t\n mixed leading whitespace",
        "mixed trailing whitespace \t\n ",
    ]


def _dedup(texts: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in texts:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


CORPUS: list[str] = _dedup(
    _edges() + ENGLISH + CHINESE + JAPANESE + KOREAN + ARABIC + HINDI + RUSSIAN + THAI + OTHER_SCRIPTS + EMOJI
    + CODE + NORMALIZATION + WORDS + MIXED + _controls() + _whitespace() + _numbers() + _punctuation()
    + _repetitions() + _generated()
)  # fmt: skip

# Texts into which `with_specials` splices special tokens.
_HOSTS = ["Hello world", "你好，世界", "a  b", "", "line one\nline two", "x = 1", "🙂"]


def with_specials(specials: list[str]) -> list[str]:
    """Texts with the given special tokens typed inside them: glued to words, with spaces and
    newlines around, alone, doubled, next to each other, at the edges, and cut short (a prefix of a
    special token is plain text). Every special gets the short forms; the first few (and the last)
    get the long list too, so a tokenizer with hundreds of specials stays quick to test."""
    specials = [s for s in dict.fromkeys(specials) if s]
    out = []
    for i, s in enumerate(specials):
        out += [s, f"Hello{s}world", f"Hello {s} world", f"Hello\n{s}\nworld"]
        if i < 8 or i == len(specials) - 1:
            other = specials[(i + 1) % len(specials)]
            out += [
                s + s,
                f"{s} {s}",
                f" {s}",
                f"{s} ",
                f"  {s}  ",
                f"\n{s}\n",
                f"{s}\n\n",
                f"\t{s}\t",
                f"{s}{other}",
                f"{s} text {other}",
                f"你好{s}世界",
                f"123{s}456",
                f"{s}🙂",
                f"--{s}--",
                f"{s}'s",
                f"<{s}>",
                s[:-1],
                s[1:],
                f"{s[:-1]} {s}",
                s.upper() if s.upper() != s else s + s + s,
            ]
            for host in _HOSTS:
                out += [f"{s}{host}", f"{host}{s}", f"{host} {s} {host}"]
    return _dedup(out)


if __name__ == "__main__":
    print(len(CORPUS), "texts,", sum(map(len, CORPUS)), "characters")
