"""Tensor parallelism (minivlm/parallel.py) on the CPU: torchrun with 2 and 4 gloo processes.

- A Llama (GQA 8:4, a vocabulary of 211 that neither 2 nor 4 divides: padded), a Qwen2 (q/k/v
  biases, tied embeddings) and a LLaVA-NeXT (anyres tiles, two images of different sizes) split
  across the ranks give the logits of one process within 1e-5 (fp32: only the order of the sums
  differs) and the same 32 greedy tokens, for a left-padded batch (tests/tp_worker.py).
- Each rank holds its share of the decoder's weights, measured: the split tensors' bytes / N plus
  the replicated ones (norms, and the padding rows of the vocabulary), and the vision tower whole.
- A slice is read from the file alone (checkpoint.read_part), rows and columns, against the whole
  tensor as the safetensors library reads it.
- `torchrun -m minivlm generate` prints the answer of one process, once; a world size that does
  not divide the heads, and a rank killed mid-generation, end with a clear error within 30 s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from tp_worker import run

import minivlm
from minivlm.__main__ import main
from minivlm.bench.tiny import tiny_checkpoint
from minivlm.bench.tiny.models import randomize_, save_checkpoint
from minivlm.checkpoint import find_tensors, read_tensor
from minivlm.parallel import Shard, decoder_slices

TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(n: int, *args, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    # torchrun's own scratch folders (torchelastic_*) stay behind when a rank is killed: give it one
    # of ours, removed after.
    with tempfile.TemporaryDirectory() as scratch:
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": scratch, **env}
        return subprocess.run(
            [*TORCHRUN, "--nproc-per-node", str(n), *map(str, args)],
            capture_output=True, text=True, timeout=timeout, env=environment,
        )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    text = {
        "llama": transformers.LlamaConfig(
            vocab_size=211, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4,
        ),
        "qwen2": transformers.Qwen2Config(
            vocab_size=211, hidden_size=144, intermediate_size=200, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
        ),
    }  # fmt: skip
    folders = {}
    for name, config in text.items():
        model = transformers.AutoModelForCausalLM.from_config(config)
        folders[name] = save_checkpoint(randomize_(model).eval(), root / name, layout="hub")
    folders["llava-next"] = tiny_checkpoint(
        "llava-next", root / "next", text=dict(num_attention_heads=4, num_key_value_heads=4)
    )
    return folders


@pytest.mark.parametrize("world", [2, 4])
def test_split_models_equal_one_process(checkpoints, world, tmp_path):
    names = list(checkpoints)
    done = torchrun(world, TESTS / "tp_worker.py", tmp_path, *checkpoints.values())
    assert done.returncode == 0, done.stderr[-3000:]
    held = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for i, name in enumerate(names):
        folder = checkpoints[name]
        model = minivlm.load_model(folder)
        alone, split = run(folder, model), load_file(str(tmp_path / f"{i}.safetensors"))
        assert (split["logits"] - alone["logits"]).abs().max() <= 1e-5, name
        assert torch.equal(split["tokens"], alone["tokens"]), name
        # weight bytes: each rank's decoder is its slices plus what is replicated
        lm = getattr(model, "language_model", model)
        prefix = "language_model." if lm is not model else ""
        config = lm.config
        for rank in range(world):
            slices = decoder_slices(config, Shard(rank, world))
            want = 0
            for key, p in {**dict(lm.named_parameters(remove_duplicate=True))}.items():
                spec = slices.get(key)
                size = p.numel() if spec is None else p.numel() // p.shape[spec[0]] * (spec[2] - spec[1])
                want += size * p.element_size()
            decoder, rest = held[rank][str(i)]
            assert decoder == want, (name, rank)
            whole = sum(p.numel() * p.element_size() for p in lm.parameters())
            assert decoder < whole / world * 1.1 + 2 * 256 * config.hidden_size * 4  # about 1/N of it
            others = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith(prefix))
            assert rest == (others if prefix else 0)


def test_a_slice_is_read_alone(tmp_path):
    """checkpoint.read_part against the safetensors library's whole tensor: rows (dim 0, past the
    end padded with zeros) and columns (dim 1), in fp32 and bf16."""
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(7, 10, generator=g), "b": torch.randn(10, generator=g).bfloat16()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    entries = find_tensors(tmp_path)
    assert torch.equal(read_tensor(entries["w"].sliced(0, 2, 5)), tensors["w"][2:5])
    assert torch.equal(read_tensor(entries["w"].sliced(1, 4, 9)), tensors["w"][:, 4:9])
    padded = read_tensor(entries["w"].sliced(0, 4, 8))  # a padded vocabulary's last rank
    assert torch.equal(padded[:3], tensors["w"][4:]) and not padded[3].any()
    assert torch.equal(read_tensor(entries["b"].sliced(0, 5, 10)), tensors["b"][5:])


def test_the_generate_command_under_torchrun(checkpoints, tmp_path, capsys):
    folder = checkpoints["llava-next"]
    image = tmp_path / "photo.png"
    Image.new("RGB", (60, 40), (10, 150, 60)).save(image)
    command = ["generate", "--model", folder, "--image", image, "--prompt", "What is it?", "--max-new-tokens", 8]
    assert main([str(c) for c in command]) == 0
    alone = capsys.readouterr().out
    done = torchrun(2, "-m", "minivlm", *command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == alone  # printed once, by rank 0


def test_a_world_size_that_does_not_divide_the_heads(checkpoints, tmp_path):
    start = time.monotonic()
    done = torchrun(3, "-m", "minivlm", "generate", "--model", checkpoints["llava-next"], "--prompt", "hi")
    assert done.returncode != 0 and time.monotonic() - start < 30
    assert "does not divide" in done.stderr and "num_attention_heads (4)" in done.stderr
    assert not re.search(r'File ".*/minivlm/', done.stderr)  # no traceback of ours (torchrun prints its own)


KILLER = """
import os, signal, sys, torch, torch.distributed as dist, minivlm
from minivlm.generation import generate_steps, StopRules
dist.init_process_group("gloo")
model = minivlm.load_model(sys.argv[1], tensor_parallel=True)
ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))  # the same prompt on every rank
try:
    for i, _ in enumerate(generate_steps(model, ids, max_new_tokens=400, stop=StopRules(set()))):
        if i == 5 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
except minivlm.parallel.ParallelError as e:
    print(f"rank {dist.get_rank()} error: {e}", file=sys.stderr)
    sys.exit(1)
"""


def test_a_killed_rank_ends_the_others(checkpoints, tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    start = time.monotonic()
    done = torchrun(2, script, checkpoints["llama"], timeout=60)
    assert done.returncode != 0 and time.monotonic() - start < 30
    # rank 0 says why, or torchrun ended it first and names the signal that killed rank 1
    assert "another process of the tensor-parallel group stopped" in done.stderr or "SIGKILL" in done.stderr


CLOCKS = """
import json, os, sys, time, torch, torch.distributed as dist, minivlm
from minivlm.parallel import ParallelError, from_rank0, join_group
from minivlm.generation import generate_steps, StopRules

shard = join_group(torch.device("cpu"))  # MINIVLM_DIST_TIMEOUT=2: the steps' clock
said = {}
if shard.rank == 1:
    time.sleep(3.5)  # a slow load, longer than a step may take: waited for
model = minivlm.load_model(sys.argv[1], tensor_parallel=True)
ids = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))
said["tokens"] = minivlm.generate(model, ids, max_new_tokens=4).tolist()
said["typed"] = from_rank0(model, lambda: time.sleep(3.5) or f"typed on rank {shard.rank}")  # a slow user
try:
    from_rank0(model, lambda: minivlm.processing.image.load_image(sys.argv[2]))
except minivlm.processing.image.ImageError as e:
    said["image"] = str(e)
try:
    minivlm.generate(model, ids[:, : 8 - shard.rank], max_new_tokens=4)  # rank 1 has a shorter prompt
except ParallelError as e:
    said["different"] = str(e)
try:
    for i, _ in enumerate(generate_steps(model, ids, max_new_tokens=50, stop=StopRules(set()))):
        if i == 3 and shard.rank == 1:
            time.sleep(4.5)  # a hung rank, in step
except ParallelError as e:
    said["hung"] = str(e)
print(json.dumps(said), file=open(os.path.join(sys.argv[3], f"rank{shard.rank}.json"), "w"))
"""


def test_waits_that_are_not_hangs_and_a_hung_step(checkpoints, tmp_path):
    """Two clocks: a rank loading 3.5 s later and a chat user typing 3.5 s later are waited for,
    with MINIVLM_DIST_TIMEOUT=2; a rank silent for 4.5 s inside generation ends rank 0 with one error.
    What rank 0 reads (a line, an image file that fails) reaches every rank; ranks that call
    generate with different prompts are told so."""
    script = tmp_path / "clocks.py"
    script.write_text(CLOCKS)
    alone = minivlm.generate(
        minivlm.load_model(checkpoints["llama"]),
        torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0)),
        max_new_tokens=4,
    )
    done = torchrun(2, script, checkpoints["llama"], tmp_path / "missing.png", tmp_path, MINIVLM_DIST_TIMEOUT="2")
    said = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["tokens"] for s in said] == [alone.tolist()] * 2, done.stderr[-3000:]
    assert [s["typed"] for s in said] == ["typed on rank 0"] * 2
    assert said[0]["image"] == said[1]["image"] and "missing.png" in said[0]["image"]
    assert all("different inputs" in s["different"] and "alike: rank 0; rank 1" in s["different"] for s in said)
    assert "stayed silent past its timeout" in said[0]["hung"]


def test_chat_under_torchrun_answers_as_one_process(checkpoints, tmp_path, monkeypatch, capsys):
    """Rank 0 reads the lines and the /image file and sends them; the answers are one process's."""
    image = tmp_path / "photo.png"
    Image.new("RGB", (60, 40), (200, 30, 60)).save(image)
    typed = f"/image {image}\nWhat is it?\nAnd now?\n"
    command = ["chat", "--model", str(checkpoints["llava-next"]), "--max-new-tokens", "6"]
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(typed))
    assert main(command) in (0, None)
    alone = capsys.readouterr().out
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            [*TORCHRUN, "--nproc-per-node", "2", "-m", "minivlm", *command],
            input=typed, capture_output=True, text=True, timeout=300, env={**environment, "TMPDIR": scratch},
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == alone and alone.count("\n") == 2


def test_timeouts_fingerprints_and_serve_refused(checkpoints, tmp_path, monkeypatch, capsys):
    from minivlm.parallel import ParallelError, fingerprint, step_timeout

    for bad in ("abc", "inf", "nan", "0", "-5"):
        monkeypatch.setenv("MINIVLM_DIST_TIMEOUT", bad)
        with pytest.raises(ParallelError, match="MINIVLM_DIST_TIMEOUT"):
            step_timeout(20)
    monkeypatch.setenv("MINIVLM_DIST_TIMEOUT", "2.5")
    assert step_timeout(20) == 2.5
    # What the ranks compare: the files minivlm reads beside the weights, not a README.
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in checkpoints["llava-next"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    before = fingerprint(folder)
    (folder / "README.md").write_text("notes")
    assert fingerprint(folder) == before
    config = folder / "generation_config.json"
    config.write_text(config.read_text().replace("{", '{"eos_token_id": 5,', 1))
    assert fingerprint(folder) != before
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", "--model", str(folder)]) == 1
    assert "tensor-parallel serving is not built" in capsys.readouterr().err
