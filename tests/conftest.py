"""Test-session setup that must happen before torch, triton or transformers is imported.

Without a CUDA device, triton kernels run under triton's CPU interpreter, which reads
TRITON_INTERPRET when triton is first imported: so it is set here, first. On a machine with a GPU
the kernels run for real (set TRITON_INTERPRET=1 yourself to force the interpreter there).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach the hub (nor anything it runs)
# The tests measure parity on the reference path (ops.py's definitions of transformers' arithmetic);
# tests/test_fast_path.py and the kernel tests choose the fast path themselves.
os.environ.setdefault("MINIVLM_KERNELS", "0")

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
