"""Saving a quantized model as a checkpoint folder that load_model reads back without quantizing
again: the stored layout of quant.py in model.safetensors, and "minivlm_quantization" in config.json.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from torch import nn

from .quant import QuantError, model_dtype

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def save_quantized(model: nn.Module, source, output) -> Path:
    """Write a model loaded with quantize= as a checkpoint folder that load_model reads back without
    quantizing again: model.safetensors in the stored layout (quant.py's docstring) under minivlm's
    module names, config.json with "minivlm_quantization", and the source folder's other files
    (tokenizer, processor, chat template, generation config) copied. transformers cannot read it.

    The folder is written beside `output` and renamed into place at the end, so a failure leaves
    nothing half-written; an existing non-empty `output` is refused."""
    from safetensors.torch import save_file  # looked up here, so that a test can replace it

    config = getattr(model, "quantization", None)
    if config is None:
        raise QuantError("the model is not quantized: load it with load_model(..., quantize='int8' or 'int4')")
    source, output = Path(source), Path(output)
    check_output(source, output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))  # never a folder of yours
    try:
        for f in source.iterdir():
            if f.is_file() and f.name not in WEIGHT_FILES and f.suffix != ".safetensors" and f.name != "config.json":
                shutil.copy2(f, partial / f.name)
        raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
        raw["minivlm_quantization"] = config.to_json()
        # The dtype the model was loaded in (its scales, norms and embeddings are saved in it) is
        # the one it loads back in.
        dtype = str(model_dtype(model)).removeprefix("torch.")
        raw["torch_dtype"] = dtype
        if "dtype" in raw:
            raw["dtype"] = dtype
        (partial / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
        tensors, seen = {}, set()
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in seen:  # a tied name: the loader takes one name of a tied pair
                continue
            seen.add(id(tensor))
            tensors[name] = tensor.detach().cpu().contiguous()
        save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
        if output.is_dir() and not output.is_symlink():
            output.rmdir()  # empty: checked above
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output


def check_output(source: Path, output: Path) -> None:
    """Before any work: the source is a checkpoint folder, and the output a new or empty folder."""
    if not (Path(source) / "config.json").is_file():
        raise QuantError(f"{source}: no config.json; expected the checkpoint folder the model was loaded from")
    if output.is_symlink() or (output.exists() and (not output.is_dir() or any(output.iterdir()))):
        raise QuantError(f"{output} exists and is not an empty folder; choose a new one")
    if output.parent.exists() and not output.parent.is_dir():
        raise QuantError(f"{output.parent} is not a folder")
