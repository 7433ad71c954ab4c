"""What every benchmark measures with: wall time of a call (best of a few, synchronised on CUDA),
this process's memory from /proc, and the transformers they measure against.

`time_call` is also the timer of `python -m minivlm bench kernels` (kernels/bench.py).
"""

from __future__ import annotations

import sys
import time

import torch

# One line on stderr, not a traceback, when the reference is missing (`minivlm parity` says the same).
NO_TRANSFORMERS = (
    'minivlm: error: bench compares against transformers; install it with pip install "minivlm[test]" '
    '(from a checkout: pip install -e ".[test]")'
)


def transformers_or_exit():
    """transformers, quietened (no logging below errors, no progress bars), or exit with one line
    saying which extra installs it."""
    try:
        import transformers
    except ImportError:
        sys.exit(NO_TRANSFORMERS)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def call_times(fn, repeats: int, device: str) -> list[float]:
    """Wall times of `repeats` calls after one warm-up, each synchronised on CUDA."""
    times = []
    with torch.inference_mode():
        fn()
        sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
    return times


def time_call(fn, repeats: int, device: str) -> float:
    """Best wall time of `repeats` calls after one warm-up (best: least disturbed by the OS)."""
    return min(call_times(fn, repeats, device))


def proc_status(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)
