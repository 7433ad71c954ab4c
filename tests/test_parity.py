"""`python -m minivlm parity`: the per-stage table on a tiny checkpoint of every family transformers
has, and the stage it names when one of our layers is deliberately changed."""

from __future__ import annotations

import re

import pytest
import torch

from minivlm import load
from minivlm.__main__ import main
from minivlm.bench.tiny import tiny_checkpoint

TWINS = ["llava-1.5", "llava-next", "llava-interleave", "idefics3", "qwen2-text"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {family: tiny_checkpoint(family, root / family) for family in TWINS + ["llama3v"]}


def table(out: str) -> dict[str, str]:
    """The printed table: stage label -> the rest of its line."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"((?:vision|decoder) [\w ()-]+?|connector|token embeddings|final norm|logits)\s{2,}(.*)", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


@pytest.mark.parametrize("family", TWINS)
def test_every_stage_of_every_family_is_listed_and_agrees(folders, family, capsys):
    assert main(["parity", "--model", str(folders[family])]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    model = load.load_model(folders[family])
    decoder = model.model if family == "qwen2-text" else model.language_model.model
    expected = [f"decoder layer {i}" for i in range(len(decoder.layers))]
    expected += ["decoder input (merged)", "token embeddings", "final norm", "logits"]
    if family != "qwen2-text":
        run = len(model.vision_tower.encoder.layers) - (1 if family in ("llava-1.5", "llava-next") else 0)
        expected += [f"vision layer {i}" for i in range(run)] + ["vision embeddings", "connector"]
    assert set(expected) <= set(rows), out
    number = r"\d\.\d\de[-+]\d\d"
    assert all(re.match(rf"\S+\s+{number}\s+{number}", rows[stage]) for stage in expected), out  # both sides ran
    assert all("beyond" not in rows[stage] for stage in expected), out
    compared = sum(1 for rest in rows.values() if "not run by" not in rest)
    assert f"all {compared} compared stages agree" in out
    # A stage our model skips (LLaVA's last vision layer under vision_feature_layer -2) is shown, not compared.
    if family in ("llava-1.5", "llava-next"):
        assert "not run by minivlm" in rows["vision layer 2"]


# (what to change in our model, the stage that must be named first)
PERTURBATIONS = {
    "vision layer 1": lambda m: m.vision_tower.encoder.layers[1].mlp.fc2.weight,
    "connector": lambda m: m.multi_modal_projector.linear_2.weight,
    "decoder layer 1": lambda m: m.language_model.model.layers[1].self_attn.o_proj.weight,
}


@pytest.mark.parametrize("stage", sorted(PERTURBATIONS))
def test_a_perturbed_layer_is_named(folders, stage, capsys, monkeypatch):
    original = load.load_model

    def perturbed(*args, **kwargs):
        model = original(*args, **kwargs)
        with torch.no_grad():
            PERTURBATIONS[stage](model)[1, 2] += 0.5  # one weight of one layer
        return model

    monkeypatch.setattr(load, "load_model", perturbed)
    assert main(["parity", "--model", str(folders["llava-interleave"])]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^first divergence: {stage} \(", out, re.M), out
    rows = table(out)
    order = list(rows)
    assert all("beyond" not in rows[s] for s in order[: order.index(stage)]), out  # everything before agrees
    assert "beyond" in rows[stage] and "beyond" in rows["logits"]


def test_nan_is_a_divergence(folders, capsys, monkeypatch):
    original = load.load_model

    def broken(*args, **kwargs):
        model = original(*args, **kwargs)
        with torch.no_grad():
            model.language_model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(load, "load_model", broken)
    assert main(["parity", "--model", str(folders["llava-interleave"])]) == 1
    assert re.search(r"^first divergence: decoder layer 0 \(", capsys.readouterr().out, re.M)


def test_images_from_files(folders, capsys, tmp_path):
    from PIL import Image

    for i, size in enumerate([(500, 300), (200, 640)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    args = [
        "parity",
        "--model",
        str(folders["llava-next"]),
        "--image",
        str(tmp_path / "0.png"),
        "--image",
        str(tmp_path / "1.png"),
    ]
    assert main(args) == 0
    assert "compared stages agree" in capsys.readouterr().out


@pytest.mark.parametrize(
    "family, extra, message",
    [
        ("llama3v", [], "transformers has no llama3v"),
        ("qwen2-text", ["--image", "x.png"], "text-only qwen2 model; it takes no --image"),
    ],
)
def test_what_parity_cannot_compare_is_one_line(folders, family, extra, message, capsys, tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 10)).save(tmp_path / "x.png")
    extra = [str(tmp_path / e) if e.endswith(".png") else e for e in extra]
    assert main(["parity", "--model", str(folders[family]), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_without_transformers_it_says_how_to_install_it(folders, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(["parity", "--model", str(folders["llava-interleave"])]) == 1
    assert 'pip install "minivlm[test]"' in capsys.readouterr().err
