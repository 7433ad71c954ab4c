"""Saving a quantized model as a checkpoint folder that load_model reads back without quantizing
again: the stored layout of quant.py in model.safetensors, and "minivlm_quantization" in config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from . import saving
from .quant import QuantError, model_dtype


def save_quantized(model: nn.Module, source, output) -> Path:
    """Write a model loaded with quantize= as a checkpoint folder that load_model reads back without
    quantizing again: model.safetensors in the stored layout (quant.py's docstring) under minivlm's
    module names, config.json with "minivlm_quantization", and the source folder's other files
    (tokenizer, processor, chat template, generation config) copied. transformers cannot read it.

    The folder is written beside `output` and renamed into place at the end, so a failure leaves
    nothing half-written; an existing non-empty `output` is refused."""
    config = getattr(model, "quantization", None)
    if config is None:
        raise QuantError("the model is not quantized: load it with load_model(..., quantize='int8' or 'int4')")
    source, output = Path(source), Path(output)
    check_output(source, output)
    raw = json.loads((source / "config.json").read_text(encoding="utf-8"))
    raw["minivlm_quantization"] = config.to_json()
    # The dtype the model was loaded in (its scales, norms and embeddings are saved in it) is the
    # one it loads back in.
    raw = saving.with_dtype(raw, model_dtype(model))
    tensors, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied name: the loader takes one name of a tied pair
            continue
        seen.add(id(tensor))
        tensors[name] = tensor.detach().cpu().contiguous()
    return saving.write_checkpoint(source, output, raw, tensors, QuantError)


def check_output(source: Path, output: Path) -> None:
    """Before any work: the source is a checkpoint folder, and the output a new or empty folder."""
    saving.check_output(source, output, QuantError)
