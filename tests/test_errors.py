"""Bad checkpoints get one clear error that names the file, the key or the field, and what was expected."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

import minivlm
from minivlm import CheckpointError, ConfigError
from minivlm.bench.tiny.models import build_text_model, read_folder_tensors, save_checkpoint, save_sharded
from minivlm.config import TextConfig
from minivlm.decoder import DecoderLM
from minivlm.weights import KeyTable, load_weights


@pytest.fixture(scope="module")
def hf_model():
    return build_text_model("llama")


@pytest.fixture
def sharded(hf_model, tmp_path):
    return save_checkpoint(hf_model, tmp_path / "ckpt", layout="hub", shards=3)


@pytest.fixture
def single(hf_model, tmp_path):
    return save_checkpoint(hf_model, tmp_path / "ckpt", layout="hub", shards=1)


def edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_missing_shard(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard 'model-00002-of-00003.safetensors', which is missing"):
        minivlm.load_model(sharded)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_naming_a_file_outside_the_folder(sharded, evil):
    (sharded.parent / "outside.safetensors").write_bytes(b"")
    edit_json(sharded / "model.safetensors.index.json", lambda d: d["weight_map"].update({"model.norm.weight": evil}))
    with pytest.raises(CheckpointError, match=re.escape(f"shard {evil!r} lies outside the checkpoint folder")):
        minivlm.load_model(sharded)


def test_index_that_is_not_an_index(sharded):
    (sharded / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a valid index"):
        minivlm.load_model(sharded)


def test_truncated_safetensors(single):
    file = single / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: truncated: tensor '.+' ends at byte \d+, file has \d+"
    ):
        minivlm.load_model(single)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "not a safetensors file"),
        (struct.pack("<Q", 10**12) + b"{}", "corrupt or truncated safetensors file"),
        (struct.pack("<Q", 5) + b"{{{{{", "corrupt safetensors header"),
        (struct.pack("<Q", 2) + b"[]", "corrupt safetensors header"),
    ],
)
def test_corrupt_safetensors(single, content, message):
    (single / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        minivlm.load_model(single)


def test_header_entry_with_wrong_byte_count(single):
    file = single / "model.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [7, 7, 7]
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' of shape \[7, 7, 7\] F32 needs 1372 bytes"):
        minivlm.load_model(single)


def test_missing_tensor(single):
    tensors = read_folder_tensors(single)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_sharded(single, tensors, 1)
    with pytest.raises(CheckpointError, match=r"1 tensors are missing .*'model.layers.1.mlp.up_proj.weight'"):
        minivlm.load_model(single)


def test_wrongly_shaped_tensor(single):
    tensors = read_folder_tensors(single)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(128, 128)  # as if num_key_value_heads were 2
    save_sharded(single, tensors, 1)
    expected = "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [128, 128], the config asks for [64, 128]"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        minivlm.load_model(single)


def test_wrongly_shaped_tensor_names_both_shapes(single):
    tensors = read_folder_tensors(single)
    tensors["model.norm.weight"] = torch.zeros(130)
    save_sharded(single, tensors, 1)
    with pytest.raises(
        CheckpointError, match=re.escape("'model.norm.weight' has shape [130], the config asks for [128]")
    ):
        minivlm.load_model(single)


def test_tensor_that_fits_nothing(single):
    tensors = read_folder_tensors(single)
    tensors["model.layers.7.mlp.up_proj.weight"] = torch.zeros(3)
    save_sharded(single, tensors, 1)
    with pytest.raises(CheckpointError, match=r"1 tensors in the checkpoint fit no part of the model.*layers\.7"):
        minivlm.load_model(single)


def test_two_keys_loading_into_one_parameter(single):
    tensors = read_folder_tensors(single)
    tensors["old.norm.weight"] = tensors["model.norm.weight"].clone()
    save_sharded(single, tensors, 1)
    table = KeyTable(renames=((r"old\.", "model."),))
    config = TextConfig.from_hf(json.loads((single / "config.json").read_text()))
    with pytest.raises(
        CheckpointError,
        match=r"tensors '(old|model).norm.weight' and '(old|model).norm.weight' both load into 'model.norm.weight'",
    ):
        load_weights(lambda: DecoderLM(config), single, table, torch.float32, torch.device("cpu"))


def test_no_weights_at_all(single):
    (single / "model.safetensors").unlink()
    (single / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="no model.safetensors.*safetensors only"):
        minivlm.load_model(single)


def test_unknown_model_type(single):
    edit_json(single / "config.json", lambda d: d.update(model_type="gpt2"))
    with pytest.raises(
        ConfigError,
        match=r"model_type 'gpt2'; minivlm loads \['idefics3', 'llama', 'llama3v', 'llava', 'llava_next', 'mistral', 'qwen2'\]",
    ):
        minivlm.load_model(single)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_config_without_a_required_field(single, field):
    edit_json(single / "config.json", lambda d: d.pop(field))
    with pytest.raises(ConfigError, match=f"config.json: missing required field '{field}' for model_type 'llama'"):
        minivlm.load_model(single)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_key_value_heads": 3}, "num_attention_heads 2 is not a multiple of num_key_value_heads 3"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, r"rope type 'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
        ({"hidden_size": 129, "head_dim": None}, "hidden_size 129 is not divisible by num_attention_heads 2"),
    ],
)
def test_config_that_makes_no_sense(single, change, message):
    edit_json(single / "config.json", lambda d: d.update(change))
    with pytest.raises(ConfigError, match=message):
        minivlm.load_model(single)


def test_config_json_missing_or_broken(single):
    (single / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        minivlm.load_model(single)
    (single / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json in the checkpoint folder"):
        minivlm.load_model(single)


def test_path_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        minivlm.load_model(tmp_path / "nope")


def test_hub_id_that_cannot_be_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIVLM_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CheckpointError,
        match=r"no-such-org/no-such-model: no such local folder, not in .*, and the hub could not be reached",
    ):
        minivlm.load_model("no-such-org/no-such-model")


def test_hub_id_found_under_weights(hf_model, tmp_path, monkeypatch):
    save_checkpoint(hf_model, tmp_path / "tiny-llama", layout="hub")
    monkeypatch.setenv("MINIVLM_WEIGHTS", str(tmp_path))
    assert minivlm.load_model("some-org/tiny-llama").config.hidden_size == 128


def test_unknown_dtype(single):
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'"):
        minivlm.load_model(single, dtype="float8")
    with pytest.raises(ValueError, match="not a floating-point type"):
        minivlm.load_model(single, dtype=torch.int8)
