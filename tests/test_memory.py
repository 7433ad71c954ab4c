"""Loading keeps one copy of the weights: peak host memory at most 1.2x the checkpoint size.

Measured in a fresh process, as the resident-set high-water mark (VmHWM) minus the resident set
before loading, so that nothing else the test session allocated counts. The child first loads a
tiny checkpoint, so that one-time costs of a process (lazy imports, the allocator's first arenas:
some 10-20 MB, which is noise against a real checkpoint but a fifth of this small one) are paid
before the measurement; then it resets the high-water mark. A second copy of the weights would
still show as 2x. Not a timing: memory of a deterministic load.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

from minivlm.bench.tiny.models import build_text_model, save_checkpoint

CHILD = r"""
import json, sys, torch, minivlm
from minivlm.bench import proc_status as status
tiny, folder, dtype = sys.argv[1:4]
minivlm.load_model(tiny, dtype=dtype)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
before = status("VmRSS")
model = minivlm.load_model(folder, dtype=dtype)
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.data_ptr())
print(json.dumps({"peak": status("VmHWM") - before, "weights": weights}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    folder = save_checkpoint(model, tmp_path_factory.mktemp("mem"), layout="hub", shards=2)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    tiny = save_checkpoint(build_text_model("llama"), tmp_path_factory.mktemp("tiny"), layout="hub", shards=2)
    return tiny, folder, size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype,share", [("float32", 1.0), ("bfloat16", 0.5)])
def test_peak_host_memory_is_one_copy(checkpoint, dtype, share):
    tiny, folder, size = checkpoint
    out = subprocess.run([sys.executable, "-c", CHILD, str(tiny), str(folder), dtype], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["weights"] == pytest.approx(share * size, rel=0.01)  # the model holds the weights once
    # fp32: one copy of the file. bf16 from an fp32 file: the half-size model plus one fp32 tensor
    # in flight (the 16 MB embedding here), well inside the bound.
    assert result["peak"] <= 1.2 * size, (
        f"peak {result['peak'] / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint"
    )
