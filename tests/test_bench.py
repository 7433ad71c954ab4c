"""`python -m minivlm bench loader` runs end to end on a small checkpoint (a smoke test: no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_bench_loader_runs_and_agrees_with_transformers():
    out = subprocess.run(
        [sys.executable, "-m", "minivlm", "bench", "loader",
         "--hidden", "256", "--layers", "2", "--vocab", "1000", "--seq", "8", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for row in ("minivlm float32", "transformers float32", "minivlm bfloat16", "transformers eager"):
        assert row in out.stdout
    diffs = [float(d) for d in re.findall(r"max \|logit diff\| (\S+)", out.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out.stdout


def test_bench_tokenizer_runs():
    out = subprocess.run(
        [sys.executable, "-m", "minivlm", "bench", "tokenizer", "--words", "3000", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "minivlm (tiktoken)" in out.stdout and "speed-up" in out.stdout


def test_bench_sentencepiece_tokenizer_runs():
    out = subprocess.run(
        [sys.executable, "-m", "minivlm", "bench", "tokenizer", "--kind", "sentencepiece", "--words", "20000",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "minivlm (Python BPE)" in out.stdout and "speed-up" in out.stdout


def test_bench_generate_runs_and_agrees_with_transformers():
    out = subprocess.run(
        [sys.executable, "-m", "minivlm", "bench", "generate", "--preset", "tiny", "--new-tokens", "4",
         "--text-tokens", "6", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "identical tokens: True" in out.stdout and "decode (tokens/s)" in out.stdout
