"""Bad checkpoints end in one clear error, fast, in bounded memory: never a traceback, a hang or a
wrong answer (issue 15, the checkpoint side). And `minivlm doctor` lists every problem at once.

The tiny checkpoints are built once per module and copied per test. Each test runs under an alarm:
a FIFO that blocked an open() would fail the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import struct

import pytest
import torch

import minivlm
from minivlm import CheckpointError, ConfigError, ProcessorError
from minivlm.__main__ import main
from minivlm.bench.tiny import tiny_checkpoint
from minivlm.bench.tiny.models import read_folder_tensors, save_sharded


@pytest.fixture(autouse=True)
def within_ten_seconds():
    def fail(*_):
        raise TimeoutError("took over 10 s: a hang?")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    return {family: tiny_checkpoint(family, root / family) for family in ("qwen2-text", "llava-interleave")}


@pytest.fixture
def text(built, tmp_path):
    return shutil.copytree(built["qwen2-text"], tmp_path / "text")


@pytest.fixture
def vlm(built, tmp_path):
    return shutil.copytree(built["llava-interleave"], tmp_path / "vlm")


def edit_json(path, change):
    d = json.loads(path.read_text())
    d.update(change)
    path.write_text(json.dumps(d))


def edit_header(file, edit):
    """Rewrite a safetensors file's header with `edit(header)`, keeping its data bytes."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


# -- config.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"num_hidden_layers": 1e8},
            r"num_hidden_layers is 100000000, implausibly large \(expected at most 1,024\); .*MINIVLM_TRUST_CONFIG=1",
        ),
        ({"hidden_size": 10**6}, r"hidden_size is 1000000, implausibly large \(expected at most 65,536\)"),
        ({"vocab_size": 10**9}, r"vocab_size is 1000000000, implausibly large \(expected at most 4,194,304\)"),
        (
            {"intermediate_size": 10**7},
            r"intermediate_size is 10000000, implausibly large \(expected at most 262,144\)",
        ),
        ({"num_attention_heads": 4096}, r"num_attention_heads is 4096, implausibly large \(expected at most 1,024\)"),
        ({"max_position_embeddings": 10**12}, r"max_position_embeddings is 1000000000000, implausibly large"),
        ({"hidden_size": "big"}, r"hidden_size is 'big'; expected an integer"),
        ({"num_attention_heads": 0}, r"num_attention_heads is 0; expected an integer of at least 1"),
        ({"num_attention_heads": -2}, r"num_attention_heads is -2; expected an integer of at least 1"),
        ({"num_key_value_heads": 0}, r"num_key_value_heads is 0; expected an integer of at least 1"),
        ({"intermediate_size": -5}, r"intermediate_size is -5; expected an integer of at least 1"),
        ({"hidden_size": 145}, r"hidden_size 145 is not divisible by num_attention_heads 2"),
        (
            {"num_key_value_heads": 3, "num_attention_heads": 2},
            r"num_attention_heads 2 is not a multiple of num_key_value_heads 3",
        ),
        ({"vocab_size": 211.5}, r"vocab_size is 211.5; expected an integer"),
        ({"num_hidden_layers": True}, r"num_hidden_layers is True; expected an integer"),
        ({"num_hidden_layers": float("inf")}, r"num_hidden_layers is inf; expected an integer"),
        ({"rms_norm_eps": "x"}, r"rms_norm_eps is 'x'; expected a finite number"),
        ({"rope_theta": -1}, r"rope_theta is -1; expected a positive number"),
        ({"eos_token_id": "</s>"}, r"eos_token_id is '</s>'; expected an integer"),
        ({"layer_types": "full_attention"}, r"layer_types is 'full_attention'; expected a list of 2 layer types"),
        ({"model_type": ["qwen2"]}, r"model_type \['qwen2'\]; minivlm loads"),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else "",
)
def test_text_config_out_of_bounds_or_of_the_wrong_type(text, change, message):
    edit_json(text / "config.json", change)
    with pytest.raises(ConfigError, match=message):
        minivlm.load_model(text)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"text_config": [1]}, r"text_config is \[1\]; expected a JSON object"),
        ({"vision_config": "siglip"}, r"vision_config is 'siglip'; expected a JSON object"),
        (
            {"vision_config": {"model_type": "siglip_vision_model", "num_hidden_layers": 10**6}},
            r"vision_config: num_hidden_layers is 1000000, implausibly large",
        ),
        (
            {"vision_config": {"model_type": "siglip_vision_model", "num_attention_heads": 0}},
            r"vision_config: num_attention_heads is 0; expected an integer of at least 1",
        ),
        (
            {"vision_config": {"model_type": "siglip_vision_model", "image_size": 384, "patch_size": 1000}},
            r"patch_size 1000 is larger than image_size 384",
        ),
        ({"vision_feature_layer": "last"}, r"vision_feature_layer 'last' is out of range"),
        ({"image_token_index": -1}, r"image_token_index is -1; expected an integer of at least 0"),
    ],
    ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else "",
)
def test_vlm_config_out_of_bounds_or_of_the_wrong_type(vlm, change, message):
    edit_json(vlm / "config.json", change)
    with pytest.raises(ConfigError, match=message):
        minivlm.load_model(vlm)


def test_trusting_the_config_lifts_the_bounds_and_the_parameter_count_still_refuses(text, monkeypatch):
    # 2,000 layers pass the config with MINIVLM_TRUST_CONFIG=1; the tensors (2 layers) do not match.
    edit_json(text / "config.json", {"num_hidden_layers": 2000})
    monkeypatch.setenv("MINIVLM_TRUST_CONFIG", "1")
    with pytest.raises(
        CheckpointError,
        match=r"tensors are missing .*config.json describes [\d,]+ parameters, the checkpoint's tensors hold 394,624",
    ):
        minivlm.load_model(text)


def test_whole_number_floats_are_sizes(text):
    # Some tools write 128.0 for 128: that is the same checkpoint, and it loads the same weights.
    want = minivlm.load_model(text).state_dict()
    edit_json(text / "config.json", {"hidden_size": 128.0, "num_hidden_layers": 2.0})
    got = minivlm.load_model(text)
    assert got.config.hidden_size == 128 and isinstance(got.config.hidden_size, int)
    assert all(torch.equal(got.state_dict()[k], v) for k, v in want.items())


# -- files that are not regular files ------------------------------------------------------------


def make_special(path, kind):
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "socket":
        cwd = os.getcwd()
        os.chdir(path.parent)  # a socket's path is limited to ~100 bytes: bind by the short name
        try:
            s = socket.socket(socket.AF_UNIX)
            s.bind(path.name)
            s.close()
        finally:
            os.chdir(cwd)


@pytest.mark.parametrize(
    "name,kind,error,message",
    [
        ("model.safetensors", "fifo", CheckpointError, r"model.safetensors: not a regular file \(a FIFO\)"),
        ("model.safetensors", "folder", CheckpointError, r"model.safetensors: not a regular file \(a folder\)"),
        (
            "model.safetensors",
            "socket",
            CheckpointError,
            r"model.safetensors: (not a regular file \(a socket\)|cannot read)",
        ),
        (
            "model.safetensors",
            "device",
            CheckpointError,
            r"model.safetensors lies outside the checkpoint folder .* resolves to /dev/zero",
        ),
        ("config.json", "fifo", ConfigError, r"config.json: not a regular file \(a FIFO\)"),
        ("config.json", "folder", ConfigError, r"config.json: not a regular file \(a folder\)"),
        ("config.json", "device", ConfigError, r"config.json: not a regular file \(a device\)"),
    ],
)
def test_special_files_are_refused_without_blocking(text, name, kind, error, message):
    make_special(text / name, kind)
    with pytest.raises(error, match=message):
        minivlm.load_model(text)


def test_a_fifo_shard_and_a_fifo_index(text):
    save_sharded(text, read_folder_tensors(text), 3)
    make_special(text / "model-00002-of-00003.safetensors", "fifo")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003.safetensors: not a regular file \(a FIFO\)"):
        minivlm.load_model(text)
    make_special(text / "model.safetensors.index.json", "fifo")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not a regular file \(a FIFO\)"):
        minivlm.load_model(text)


@pytest.mark.parametrize(
    "name,kind", [("tokenizer.json", "fifo"), ("tokenizer.json", "device"), ("tokenizer_config.json", "fifo")]
)
def test_special_tokenizer_files_are_refused(text, name, kind):
    make_special(text / name, kind)
    with pytest.raises(ProcessorError, match=rf"{name}: not a regular file \(a {'FIFO' if kind == 'fifo' else kind}\)"):
        minivlm.load_processor(text)


# -- safetensors headers -------------------------------------------------------------------------

NORM, OTHER = "model.norm.weight", "model.layers.0.input_layernorm.weight"


def test_overlapping_offsets_are_refused(text):
    # Before: model.norm.weight silently loaded the first layer norm's bytes.
    edit_header(text / "model.safetensors", lambda h: h[NORM].update(data_offsets=h[OTHER]["data_offsets"]))
    with pytest.raises(CheckpointError, match=r"the bytes of tensor '.+' \(\d+..\d+\) overlap those of '.+'"):
        minivlm.load_model(text)


def test_partially_overlapping_offsets_are_refused(text):
    def shift(h):
        begin, end = h[NORM]["data_offsets"]
        other_begin, _ = h[OTHER]["data_offsets"]
        h[NORM]["data_offsets"] = [other_begin + 4, other_begin + 4 + end - begin]

    edit_header(text / "model.safetensors", shift)
    with pytest.raises(CheckpointError, match="overlap those of"):
        minivlm.load_model(text)


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda h: h[NORM].update(data_offsets=[10**9, 10**9 + 512]),
            r"truncated: tensor 'model.norm.weight' ends at byte \d+, file has",
        ),
        (
            lambda h: h[NORM].update(data_offsets=[512, 0]),
            r"tensor 'model.norm.weight' of shape \[128\] F32 needs 512 bytes, header gives offsets 512..0",
        ),
        (
            lambda h: h[NORM].update(shape=[12, 13]),
            r"tensor 'model.norm.weight' of shape \[12, 13\] F32 needs 624 bytes",
        ),
        (lambda h: h[NORM].update(dtype="F16"), r"tensor 'model.norm.weight' of shape \[128\] F16 needs 256 bytes"),
        (
            lambda h: h[NORM].update(dtype="F33"),
            r"corrupt header entry for tensor 'model.norm.weight'.*expected a dtype of",
        ),
        (lambda h: h[NORM].update(shape=[-1, -128]), r"corrupt header entry for tensor 'model.norm.weight'"),
        (lambda h: h[NORM].update(shape=[128.5]), r"corrupt header entry for tensor 'model.norm.weight'"),
        (
            lambda h: h[NORM].update(data_offsets=[0, float("inf")]),
            r"corrupt header entry for tensor 'model.norm.weight'",
        ),
        (lambda h: h[NORM].update(data_offsets=[0]), r"corrupt header entry for tensor 'model.norm.weight'"),
        (lambda h: h.update({NORM: "F32"}), r"corrupt header entry for tensor 'model.norm.weight'"),
    ],
    ids=[
        "outside",
        "reversed",
        "shape",
        "dtype-size",
        "dtype-unknown",
        "negative",
        "fractional",
        "infinite",
        "one-offset",
        "not-an-object",
    ],
)
def test_header_entries_that_disagree(text, edit, message):
    edit_header(text / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        minivlm.load_model(text)


def test_float_weights_stored_as_integers_are_refused(text):
    # The same bytes: an F32 tensor whose header says I32 would load as integers.
    edit_header(text / "model.safetensors", lambda h: h[NORM].update(dtype="I32"))
    with pytest.raises(
        CheckpointError, match=r"tensor 'model.norm.weight' is stored as I32; expected a floating-point dtype"
    ):
        minivlm.load_model(text)


@pytest.mark.parametrize(
    "content,message",
    [
        (
            struct.pack("<Q", 2**40) + b"{}",
            r"corrupt or truncated safetensors file \(header claims 1099511627776 bytes",
        ),
        (struct.pack("<Q", 6) + b"not js", "corrupt safetensors header"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "corrupt safetensors header"),
        (struct.pack("<Q", 100000) + b"[" * 100000, r"corrupt safetensors header \(JSON nested too deeply\)"),
        (b"1234", r"not a safetensors file \(only 4 bytes\)"),
    ],
    ids=["header-too-long", "not-json", "not-utf8", "deep", "tiny"],
)
def test_headers_that_are_not_headers(text, content, message):
    (text / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        minivlm.load_model(text)


def test_deep_json_in_config_is_a_config_error(text):
    (text / "config.json").write_text("[" * 100000)
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(nested too deeply\)"):
        minivlm.load_model(text)


# -- minivlm doctor ------------------------------------------------------------------------------


def doctor(folder, capsys):
    status = main(["doctor", str(folder)])
    return status, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("family", ["qwen2-text", "llava-interleave"])
def test_doctor_passes_a_healthy_checkpoint(built, family, capsys):
    status, lines = doctor(built[family], capsys)
    assert status == 0, lines
    assert lines[-1].startswith("no problems found")


def test_doctor_lists_every_problem(vlm, capsys):
    tensors = read_folder_tensors(vlm)
    norm = "language_model.model.norm.weight"
    tensors[norm][3] = math.nan
    tensors[norm][5] = math.inf
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_sharded(vlm, tensors, 1)
    (vlm / "chat_template.jinja").write_text("{% for message in messages %}{{ message['role'] }")
    status, lines = doctor(vlm, capsys)
    assert status == 1
    problems = [line for line in lines if line.startswith("problem: ")]
    assert problems == [
        "problem: missing tensor (language_model.model.layers.1.mlp.up_proj.weight): a tensor of shape [160, 128]",
        "problem: config.json describes 925,072 parameters, the tensors hold 904,592 (config.json): the config of these weights",
        "problem: 2 NaN/Inf values (language_model.model.norm.weight in model.safetensors): finite weights",
        "problem: the chat template does not parse: unexpected '}' (line 1) (chat template): "
        "a template that renders a one-message conversation",
    ]
    assert lines[-1].startswith("4 problems found in ")


def test_doctor_goes_on_past_broken_files(text, capsys):
    edit_header(text / "model.safetensors", lambda h: h[NORM].update(data_offsets=h[OTHER]["data_offsets"]))
    make_special(text / "tokenizer.json", "fifo")
    edit_json(text / "config.json", {"rms_norm_eps": "tiny"})
    status, lines = doctor(text, capsys)
    assert status == 1
    text_out = "\n".join(lines)
    assert "problem: not a regular file (a FIFO) (tokenizer.json): a regular file" in text_out
    assert "rms_norm_eps is 'tiny'; expected a finite number (config.json)" in text_out
    assert "overlap those of" in text_out
    assert lines[-1].startswith(f"{len([x for x in lines if x.startswith('problem: ')])} problems found")


def test_doctor_on_a_folder_that_is_not_there(tmp_path, capsys):
    status, lines = doctor(tmp_path / "nope", capsys)
    assert status == 1
    assert lines[0].startswith("problem: ") and "no such checkpoint folder" in lines[0]
