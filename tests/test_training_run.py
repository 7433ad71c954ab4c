"""`python -m minivlm train` and the loop under it, on the tiny LLaVA-Interleave checkpoint at the
real geometry (729 image tokens) and a synthetic captioning task (bench/tiny/captions.py):

- stage 1 changes the connector's tensors and no other: every tensor of the output is hashed;
- the output loads in minivlm and in transformers' from_pretrained, and a swapped connector saves
  under its own keys with its config row, and loads back;
- a tiny model learns the task: its held-out loss falls below 0.05 (from about 7; guessing among
  four colours would leave about 0.35 per learned token) and it names the colour of held-out images;
- the same seed gives a bit-identical run, and a resumed run ends bit-identical to an uninterrupted one;
- two processes (torchrun, gloo) give the loss curve and the weights of one process with the
  combined batch, within 1e-6;
- bad data and bad settings end in one clear line, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import minivlm
from minivlm.__main__ import main
from minivlm.bench.captions import COLORS, QUESTION, color_captions
from minivlm.bench.tiny import tiny_checkpoint
from minivlm.connector import CONNECTORS, MLP2xGELU
from minivlm.training import TrainConfig, read_llava_json, save_checkpoint, split, train
from minivlm.training.trainer import World, evaluate


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = tiny_checkpoint("llava-interleave", root / "model")
    data = color_captions(root / "task", n=120, seed=0)
    return model, data


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def run(*args: str) -> int:
    return main(["train", *map(str, args)])


def test_stage_one_changes_only_the_connector(task, tmp_path):
    model, data = task
    out = tmp_path / "out"
    assert (
        run(
            "--model",
            model,
            "--data",
            data,
            "--train",
            "connector",
            "--max-steps",
            3,
            "--batch-size",
            2,
            "--output",
            out,
        )
        == 0
    )
    before, after = tensors_of(model), tensors_of(out)
    assert set(before) == set(after)  # the source's layout: every key, nothing new
    changed = {k for k in before if digest(before[k]) != digest(after[k])}
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed), sorted(changed)
    assert len(changed) == 4  # both linear layers' weights and biases
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    # both loaders read the output
    ours = minivlm.load_model(out)
    theirs = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(ours.multi_modal_projector.linear_1.weight, theirs.model.multi_modal_projector.linear_1.weight)


def test_a_tiny_model_learns_the_task(task, capsys):
    model_folder, data = task
    model, processor = minivlm.load_model(model_folder), minivlm.load_processor(model_folder)
    train_set, held_out = split(read_llava_json(data), 0.1, seed=0)
    config = TrainConfig(train="all", lr=3e-3, max_steps=200, batch_size=4, warmup=0.05, eval_every=50)
    untrained = evaluate(model, processor, held_out, config, World())
    start = time.monotonic()
    state = train(model, processor, train_set, config, held_out)
    seconds = time.monotonic() - start
    evals = [r["eval_loss"] for r in state.history if "eval_loss" in r]
    with capsys.disabled():
        print(f"\n  200 steps in {seconds:.0f} s; held-out loss {untrained:.3f} -> {[round(e, 4) for e in evals]}")
    assert untrained > 3 and evals[-1] < 0.05
    right = 0
    for example in held_out:
        prompt = processor.apply_chat_template(example.messages[:1], add_generation_prompt=True)
        inputs = processor(text=prompt, images=list(example.images))
        answer = processor.decode(minivlm.generate(model, **inputs, max_new_tokens=8)[0], skip_special_tokens=True)
        right += answer.strip() == example.messages[1]["content"][0]["text"]
    assert right == len(held_out), f"{right}/{len(held_out)} held-out colours named"


def small_run(model_folder, data, steps=4, **options) -> tuple[dict, list]:
    model, processor = minivlm.load_model(model_folder), minivlm.load_processor(model_folder)
    examples = read_llava_json(data)[:24]
    lora = dataclasses.replace(TrainConfig().lora, rank=2, dropout=0.1)  # dropout: the RNG stream matters
    config = TrainConfig(train="lora", lr=1e-3, max_steps=steps, batch_size=2, lora=lora, log=False, **options)
    resume = options.pop("resume", None) if "resume" in options else None
    state = train(model, processor, examples, config, resume=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, state.history


def test_same_seed_same_run_and_resuming_is_bit_identical(task, tmp_path):
    model, data = task
    first, log1 = small_run(model, data, steps=4, save_every=2, state_dir=str(tmp_path / "state"))
    second, log2 = small_run(model, data, steps=4)
    assert log1 == log2
    assert all(torch.equal(first[n], second[n]) for n in first)
    # resumed from the state after step 2: steps 3 and 4 again, ending where the whole run ended
    m, p = minivlm.load_model(model), minivlm.load_processor(model)
    lora = dataclasses.replace(TrainConfig().lora, rank=2, dropout=0.1)
    config = TrainConfig(train="lora", lr=1e-3, max_steps=4, batch_size=2, lora=lora, log=False)
    state = train(m, p, read_llava_json(data)[:24], config, resume=tmp_path / "state" / "step-2.safetensors")
    assert state.history == log1
    resumed = dict(m.named_parameters())
    assert all(torch.equal(first[n], resumed[n]) for n in first)


def test_two_processes_match_one_with_the_combined_batch(task, tmp_path):
    model, data = task
    subset = tmp_path / "data.json"
    subset.write_text(json.dumps(json.loads(Path(data).read_text())[:16]))
    common = [
        "--model",
        model,
        "--data",
        subset,
        "--images",
        Path(data).parent,
        "--train",
        "all",
        "--lr",
        "1e-3",
        "--max-steps",
        "3",
        "--grad-accum",
        "2",
        "--seed",
        "3",
    ]
    assert run(*common, "--batch-size", 2, "--output", tmp_path / "one") == 0
    (tmp_path / "scratch").mkdir()  # torchrun's scratch folders (torchelastic_*), not left in /tmp
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "scratch")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [
            *torchrun,
            "-m",
            "minivlm",
            "train",
            *map(str, common),
            "--batch-size",
            "1",
            "--output",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one" / "training_log.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "training_log.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * a["grad_norm"], (a, b)
    # The weights: the two runs sum the same gradients in another order (one batch against an
    # all-reduce of two), a few ulps apart. AdamW divides each gradient by its own running size,
    # so where an element's true gradient is zero (a key's bias; rows no token reached), rounding
    # noise of either sign becomes an update of up to lr: measured, 2-8 elements of ~20,000 per
    # matrix differ, by at most 1.2e-5 (lr 1e-3). Every other element agrees within 1e-6.
    w1, w2 = tensors_of(tmp_path / "one"), tensors_of(tmp_path / "two")
    for k in w1:
        diff = (w1[k] - w2[k]).abs()
        assert float((diff > 1e-6).float().mean()) <= 1e-3 and float(diff.max()) <= 5e-5, (k, float(diff.max()))


class WideMLP(MLP2xGELU):
    """A stand-in for a researcher's connector: LLaVA's MLP under another name and keys."""


def test_a_swapped_connector_saves_under_its_keys_and_loads_back(task, tmp_path, monkeypatch):
    model_folder, data = task
    monkeypatch.setitem(CONNECTORS, "wide_mlp", WideMLP)
    model, processor = minivlm.load_model(model_folder), minivlm.load_processor(model_folder)
    config = dataclasses.replace(model.config.connector, kind="wide_mlp")
    model.multi_modal_projector = CONNECTORS["wide_mlp"](config)
    model.config = dataclasses.replace(model.config, connector=config)
    train(model, processor, read_llava_json(data)[:8], TrainConfig(train="connector", max_steps=2, log=False))
    out = save_checkpoint(model, model_folder, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["minivlm_connector"]["kind"] == "wide_mlp"
    again = minivlm.load_model(out)
    assert again.config.connector.kind == "wide_mlp"
    assert minivlm.load_processor(out).connector == config
    example = read_llava_json(data)[0]
    prompt = processor.apply_chat_template(example.messages[:1], add_generation_prompt=True)
    inputs = processor(text=prompt, images=list(example.images))
    with torch.no_grad():
        assert torch.equal(model(**inputs), again(**inputs))


def test_lora_saved_as_an_adapter_and_merged(task, tmp_path):
    model, data = task
    common = ["--model", model, "--data", data, "--train", "lora", "--max-steps", 2, "--lr", "1e-2"]
    assert run(*common, "--save-adapter", "--output", tmp_path / "adapter") == 0
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_log.jsonl",
    }
    assert run(*common, "--output", tmp_path / "merged") == 0
    before, after = tensors_of(model), tensors_of(tmp_path / "merged")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in changed)


@pytest.mark.parametrize(
    "problem,expect",
    [
        ("not json", "cannot read the training data as JSON"),
        ("missing image", "does not exist"),
        ("two tokens", "hold 2 '<image>' and the example has 1 images"),
        ("no answer", "no assistant"),
        ("adapter without lora", "--save-adapter saves LoRA weights"),
        ("output exists", "exists and is not an empty folder"),
        ("bad mode", "invalid choice"),
        ("not an image", "is not an image Pillow can read"),
        ("longer than the context", "the model's context holds 32,768"),
        ("negative clipping", "max_grad_norm=-1.0: expected a positive finite number"),
        ("infinite rate", "lr=inf: expected a positive finite number"),
        ("unknown dtype", "--dtype: unknown dtype 'float13'"),
        ("unknown device", "--device 'tpu'"),
        ("state inside output", "is inside --output"),
        ("eval without a split", "--eval-every needs held-out examples"),
    ],
)
def test_bad_input_ends_in_one_clear_line(task, tmp_path, capsys, problem, expect):
    model, data = task
    images = Path(data).parent
    good = {
        "image": "images/0.png",
        "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "red"}],
    }
    long_question = {"from": "human", "value": "<image>" + "word " * 33000}
    bad = {
        "missing image": [dict(good, image="nope.png")],
        "two tokens": [
            dict(good, conversations=[{"from": "human", "value": "<image><image>"}, good["conversations"][1]])
        ],
        "no answer": [dict(good, conversations=good["conversations"][:1])],
        # the bad example last: it is found before the first step, not when it is drawn
        "not an image": [good, good, dict(good, image="data.json")],
        "longer than the context": [good, dict(good, conversations=[long_question, good["conversations"][1]])],
    }.get(problem, [good])
    path = tmp_path / "data.json"
    path.write_text("{oops" if problem == "not json" else json.dumps(bad))
    out = tmp_path / "out"
    if problem == "output exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    extra = {
        "adapter without lora": ["--save-adapter"],
        "negative clipping": ["--max-grad-norm", "-1"],
        "infinite rate": ["--lr", "inf"],
        "unknown dtype": ["--dtype", "float13"],
        "unknown device": ["--device", "tpu"],
        "state inside output": ["--save-every", "1", "--state-dir", out / "state"],
        "eval without a split": ["--eval-every", "1"],
    }.get(problem, [])
    if problem == "not an image":
        images = tmp_path  # data.json itself stands as the third example's image
        path_images = ["images/0.png"]
        (tmp_path / "images").mkdir()
        (tmp_path / "images" / "0.png").write_bytes((Path(data).parent / path_images[0]).read_bytes())
    mode = "sideways" if problem == "bad mode" else "connector"
    args = ["--model", model, "--data", path, "--images", images, "--train", mode, "--output", out, *extra]
    if problem == "bad mode":
        with pytest.raises(SystemExit):
            run(*args)
    else:
        assert run(*args) == 1
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err, err
    assert not out.exists() or [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out.partial*"))


def test_the_question_matches_the_task():
    assert QUESTION.endswith("?") and len(COLORS) == 4


def test_text_only_rows_train_beside_image_rows(task, tmp_path):
    """A step whose rows are all text gives the connector no gradient (nothing trainable is in
    their path): it is skipped, not an error; with rows of both kinds the batch is padded as one."""
    model, data = task
    rows = json.loads(Path(data).read_text())[:4]
    text = [{"conversations": [{"from": "human", "value": "Say a colour."}, {"from": "gpt", "value": "blue"}]}] * 4
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(text + rows))
    common = ["--model", model, "--data", mixed, "--images", Path(data).parent, "--max-steps", 4]
    assert run(*common, "--train", "connector", "--batch-size", 2, "--output", tmp_path / "connector") == 0
    assert run(*common, "--train", "lora", "--batch-size", 3, "--output", tmp_path / "lora") == 0


def test_resuming_with_other_settings_is_refused(task, tmp_path, capsys):
    model, data = task
    common = ["--model", model, "--data", data, "--train", "connector", "--batch-size", 2, "--save-every", 1]
    assert run(*common, "--max-steps", 1, "--output", tmp_path / "a", "--state-dir", tmp_path / "s") == 0
    args = [*common, "--max-steps", 2, "--output", tmp_path / "b", "--resume", tmp_path / "s"]
    assert run(*args) == 1
    err = capsys.readouterr().err
    assert "saved by a run with other settings {'max_steps': '1'}" in err and "Traceback" not in err, err
    cut = tmp_path / "cut.safetensors"  # a state file cut short: named, one line
    cut.write_bytes((tmp_path / "s" / "step-1.safetensors").read_bytes()[:100])
    assert run(*common, "--max-steps", 1, "--output", tmp_path / "c", "--resume", cut) == 1
    err = capsys.readouterr().err
    assert "not a training state file" in err and "Traceback" not in err, err
