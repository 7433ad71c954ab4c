"""Checkpoints in huggingface_hub's cache layout load; files outside the folder (or its cache repo's
blobs/) are refused.

The cache is built by hand from a tiny checkpoint, as huggingface_hub lays out a download:
CACHE/models--ORG--NAME/{blobs/SHA, snapshots/COMMIT/FILE -> ../../blobs/SHA, refs/main}.
Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import minivlm
from minivlm import CheckpointError
from minivlm.bench.tiny import tiny_checkpoint
from minivlm.bench.tiny.models import read_folder_tensors, save_sharded

REPO_ID = "llava-hf/llava-interleave-qwen-0.5b-hf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def blob(repo: Path, content: bytes) -> str:
    """Store `content` in the cache repo's blobs/ under its sha256, as the cache names LFS files."""
    sha = hashlib.sha256(content).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / sha).write_bytes(content)
    return sha


def to_hub_cache(folder: Path, cache: Path, repo_id: str = REPO_ID) -> Path:
    """Move every file of `folder` into `cache` as a download of `repo_id`; the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        assert file.is_file() and not file.is_symlink(), file
        sha = blob(repo, file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", sha))
        file.unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def replace_in_snapshot(snapshot: Path, name: str, content: bytes) -> None:
    """Give a snapshot file new content the cache's way: a new blob, and the symlink pointed at it."""
    sha = blob(snapshot.parent.parent, content)
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(Path("..", "..", "blobs", sha))


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A tiny LLaVA-Interleave checkpoint: tokenizer, processor settings, chat template, weights."""
    return tiny_checkpoint("llava-interleave", tmp_path_factory.mktemp("original") / "interleave")


@pytest.fixture(scope="module")
def inputs(original) -> dict:
    """A prompt with an image, so that the logits depend on every weight, the vision tower's too."""
    image = Image.new("RGB", (64, 48), (200, 30, 90))
    return minivlm.load_processor(original)(text="<image>\nWhat is this?", images=[image])


@pytest.fixture(scope="module")
def original_logits(original, inputs) -> torch.Tensor:
    return minivlm.load_model(original)(**inputs)


def copy_of(original: Path, tmp_path: Path, shards: int = 1) -> Path:
    folder = shutil.copytree(original, tmp_path / "download")
    if shards > 1:
        save_sharded(folder, read_folder_tensors(folder), shards)
    return folder


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hub"


def test_unsharded_snapshot_loads_as_the_folder_does(original, inputs, original_logits, tmp_path, cache):
    snapshot = to_hub_cache(copy_of(original, tmp_path), cache)
    assert all(f.is_symlink() for f in snapshot.iterdir())
    assert torch.equal(minivlm.load_model(snapshot)(**inputs), original_logits)


def test_sharded_snapshot_loads(original, inputs, original_logits, tmp_path, cache):
    snapshot = to_hub_cache(copy_of(original, tmp_path, shards=3), cache)
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    assert (snapshot / "model-00002-of-00003.safetensors").is_symlink()
    assert torch.equal(minivlm.load_model(snapshot)(**inputs), original_logits)


def test_absolute_symlinks_into_the_repos_blobs_load(original, inputs, original_logits, tmp_path, cache):
    # huggingface_hub falls back to absolute symlinks where it cannot make relative ones.
    snapshot = to_hub_cache(copy_of(original, tmp_path, shards=2), cache)
    for file in snapshot.iterdir():
        target = file.resolve()
        file.unlink()
        file.symlink_to(target)
    assert torch.equal(minivlm.load_model(snapshot)(**inputs), original_logits)


def test_processor_of_a_snapshot(original, tmp_path, cache):
    snapshot = to_hub_cache(copy_of(original, tmp_path), cache)
    names = ["tokenizer.json", "tokenizer_config.json", "config.json", "processor_config.json", "chat_template.jinja"]
    assert all((snapshot / name).is_symlink() for name in names)
    ours, theirs = minivlm.load_processor(snapshot), minivlm.load_processor(original)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.new("RGB", (64, 48), (200, 30, 90))
    a, b = ours(text=prompt, images=[image]), theirs(text=prompt, images=[image])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_huggingface_hub_recognises_the_layout(original, tmp_path, cache):
    """Evidence that the layout these tests build is the cache's own: huggingface_hub scans it cleanly."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    snapshot = to_hub_cache(copy_of(original, tmp_path, shards=2), cache)
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type) == (REPO_ID, "model")
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})
    assert revision.snapshot_path == snapshot
    assert sorted(f.file_name for f in revision.files) == sorted(f.name for f in snapshot.iterdir())


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("where", ["a file elsewhere", "another cache repo's blobs", "/etc/passwd"])
def test_snapshot_file_linking_out_of_its_repo_is_refused(original, tmp_path, cache, shards, where):
    snapshot = to_hub_cache(copy_of(original, tmp_path, shards=shards), cache)
    name = "model.safetensors" if shards == 1 else "model-00002-of-00003.safetensors"
    content = (snapshot / name).read_bytes()  # a valid file: only where it lies is wrong
    if where == "a file elsewhere":
        target = tmp_path / "elsewhere.safetensors"
        target.write_bytes(content)
    elif where == "another cache repo's blobs":
        target = cache / "models--someone--else" / "blobs" / blob(cache / "models--someone--else", content)
    else:
        target = Path("/etc/passwd")
        if not target.is_file():
            pytest.skip("no /etc/passwd here")
    (snapshot / name).unlink()
    (snapshot / name).symlink_to(target)
    who = f"shard {name!r}" if shards > 1 else str(snapshot / name)  # named by the index, or found
    expected = (
        f"{who} lies outside the checkpoint folder {snapshot} and outside its hub cache repo's "
        f"{snapshot.parent.parent / 'blobs'}: it resolves to {target.resolve()}"
    )
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        minivlm.load_model(snapshot)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "../../blobs/SHA", "/abs/model-00001-of-00003.safetensors"])
def test_snapshot_index_naming_a_file_outside_is_refused(original, tmp_path, cache, evil):
    snapshot = to_hub_cache(copy_of(original, tmp_path, shards=3), cache)
    shard = snapshot / "model-00001-of-00003.safetensors"
    (snapshot.parent / "outside.safetensors").write_bytes(shard.read_bytes())
    # Even a name that climbs into the repo's own blobs is refused: an index names files of the snapshot.
    # The absolute name is the shard's own path: refused for being absolute, wherever it points.
    evil = evil.replace("SHA", shard.resolve().name).replace("/abs", str(snapshot))
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: evil if v == shard.name else v for k, v in index["weight_map"].items()}
    replace_in_snapshot(snapshot, "model.safetensors.index.json", json.dumps(index).encode())
    expected = f"shard {evil!r} lies outside the checkpoint folder {snapshot}"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        minivlm.load_model(snapshot)


def test_plain_folder_shard_linking_outside_is_refused(original, tmp_path):
    folder = copy_of(original, tmp_path, shards=3)
    name, outside = "model-00002-of-00003.safetensors", tmp_path / "elsewhere.safetensors"
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)
    expected = f"shard {name!r} lies outside the checkpoint folder {folder}: it resolves to {outside}"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        minivlm.load_model(folder)


def test_a_snapshots_folder_outside_a_cache_repo_gets_no_blobs(original, tmp_path):
    """Only a snapshot of a models--/datasets--/spaces-- repo may read from its repo's blobs/."""
    snapshot = to_hub_cache(copy_of(original, tmp_path), tmp_path / "hub")
    plain = tmp_path / "not-a-cache-repo"
    snapshot.parent.parent.rename(plain)
    folder = plain / "snapshots" / COMMIT
    assert folder.is_dir() and (folder / "config.json").is_file()  # the relative links still work
    expected = f"model.safetensors lies outside the checkpoint folder {folder}: "
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        minivlm.load_model(folder)


def test_snapshot_without_weights_says_how_to_download(original, tmp_path, cache):
    folder = copy_of(original, tmp_path)
    (folder / "model.safetensors").unlink()  # as if the download stopped after the small files
    snapshot = to_hub_cache(folder, cache)
    expected = re.escape("no weights found") + ".*" + re.escape(f"`python -m minivlm download {REPO_ID}`")
    with pytest.raises(CheckpointError, match=expected):
        minivlm.load_model(snapshot)


def test_plain_folder_without_weights_says_how_to_download(original, tmp_path):
    folder = copy_of(original, tmp_path)
    (folder / "model.safetensors").unlink()
    expected = re.escape("no weights found") + ".*" + re.escape("`python -m minivlm download <hub id>`")
    with pytest.raises(CheckpointError, match=expected):
        minivlm.load_model(folder)
