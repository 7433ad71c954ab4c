"""transformers is the parity reference, not a dependency: importing minivlm, its command line, and
every module but the bench and parity ones (which import it when they run) leaves it unimported.
Each check runs in a fresh interpreter, since the tests themselves import transformers."""

from __future__ import annotations

import subprocess
import sys

# Modules allowed to import transformers: the bench and parity commands when they run, and the
# bench's checkpoint builder (minivlm.bench.tiny) when it is imported.
REFERENCE_USERS = ("minivlm.bench", "minivlm.parity")

# Imports each module in turn; the first import of transformers ends the process naming the module
# being imported and the line of minivlm that asked for transformers.
EACH_MODULE = r"""
import importlib, pkgutil, sys, traceback

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers":
            ours = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "importlib" not in f.filename]
            sys.exit(f"importing {current} imported transformers ({ours[-2]})")
        return None

sys.meta_path.insert(0, Refuse())
current = "minivlm"
import minivlm, minivlm.kernels

def walk(package):  # every module under package, imported (walk_packages would import skipped ones)
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        global current
        current = info.name
        if current == "minivlm.kernels.bench" or current.startswith(REFERENCE_USERS):
            continue
        module = importlib.import_module(current)
        yield current
        if info.ispkg:
            yield from walk(module)

checked = [*walk(minivlm), *walk(minivlm.kernels)]
assert "transformers" not in sys.modules
print(" ".join(checked))
"""


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_minivlm_and_its_command_line_do_not_import_transformers():
    out = python("import minivlm, minivlm.__main__, sys; assert 'transformers' not in sys.modules")
    assert out.returncode == 0, out.stderr


def test_no_module_but_bench_and_parity_imports_transformers():
    out = python(f"REFERENCE_USERS = {REFERENCE_USERS!r}\n{EACH_MODULE}")
    assert out.returncode == 0, out.stderr
    checked = out.stdout.split()
    # The walk found the library (not an empty path): the model, the processing and the kernels.
    for name in ("minivlm.vlm", "minivlm.generation", "minivlm.processing.tokenizer", "minivlm.kernels.attention"):
        assert name in checked, checked
