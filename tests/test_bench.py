"""`python -m minivlm bench ...` runs end to end on small inputs (smoke tests: no timing is asserted), and says
which extra to install when transformers is missing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from real_files import real_folder


def bench(*args: str, env: dict | None = None) -> str:
    """stdout of `python -m minivlm bench ARGS` (with `env` added to the environment), which must exit 0."""
    out = subprocess.run(
        [sys.executable, "-m", "minivlm", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_bench_loader_runs_and_agrees_with_transformers():
    out = bench("loader", "--hidden", "256", "--layers", "2", "--vocab", "1000", "--seq", "8", "--repeats", "1")
    for row in ("minivlm float32", "transformers float32", "minivlm bfloat16", "transformers eager"):
        assert row in out
    diffs = [float(d) for d in re.findall(r"max \|logit diff\| (\S+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out


def test_bench_serve_runs():
    port = str(20000 + os.getpid() % 20000)
    out = bench("serve", "--clients", "2", "--new-tokens", "2", "--repeats", "1", "--port", port)
    assert re.search(r"batched / sequential  \d+\.\d+x", out), out


def test_bench_tokenizer_runs():
    out = bench("tokenizer", "--words", "3000", "--repeats", "1")
    assert "minivlm (exact)" in out and "speed-up" in out  # a vocabulary trained by tokenizers: one merge a token


def test_bench_sentencepiece_tokenizer_runs():
    out = bench("tokenizer", "--kind", "sentencepiece", "--words", "20000", "--repeats", "1")
    assert "minivlm (words)" in out and "speed-up" in out


def test_bench_tokenizer_on_real_llama3_takes_tiktoken():
    out = bench("tokenizer", "--tokenizer", str(real_folder("llama3")), "--words", "2000", "--repeats", "1")
    assert "minivlm (tiktoken)" in out and "speed-up" in out


def test_bench_generate_runs_and_agrees_with_transformers():
    out = bench("generate", "--preset", "tiny", "--new-tokens", "4", "--text-tokens", "6", "--repeats", "1")
    assert "identical tokens: True" in out and "decode (tokens/s)" in out


def test_bench_generate_compiled_times_the_compile_apart():
    fast = {"MINIVLM_KERNELS": "auto"}  # the suite runs the reference path, which does not compile
    out = bench(
        "generate",
        "--preset",
        "tiny",
        "--new-tokens",
        "4",
        "--text-tokens",
        "6",
        "--repeats",
        "1",
        "--compile",
        env=fast,
    )
    assert "compile=True: the first decode run" in out and "decode tokens identical: True" in out


def test_bench_kernels_says_it_needs_cuda_without_one():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernel benchmark runs for real: that is for BENCHMARKS.md, not a test")
    out = subprocess.run(
        [sys.executable, "-m", "minivlm", "bench", "kernels"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1 and "needs a CUDA device" in out.stderr and "Traceback" not in out.stderr


def test_bench_without_transformers_says_which_extra_to_install(monkeypatch):
    import pytest

    from minivlm.__main__ import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    for target in (
        ["loader"],
        ["vlm"],
        ["generate"],
        ["tokenizer"],
        ["tokenizer", "--kind", "sentencepiece"],
        ["tokenizer", "--tokenizer", "anywhere"],
    ):
        with pytest.raises(SystemExit) as exit:
            main(["bench", *target])
        assert 'pip install "minivlm[test]"' in str(exit.value.code), target
    # From the command line: that one line on stderr, status 1, no traceback.
    code = (
        "import sys; sys.modules['transformers'] = None; from minivlm.__main__ import main; main(['bench', 'loader'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        'minivlm: error: bench compares against transformers; install it with pip install "minivlm[test]" '
        '(from a checkout: pip install -e ".[test]")'
    ]
