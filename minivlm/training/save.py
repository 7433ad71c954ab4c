"""A trained model -> a checkpoint folder in the hub's layout, which `minivlm.load_model` and
transformers' `from_pretrained` both read.

Each tensor is written under the name the source checkpoint gave it (the family's key table read
backwards, from the source's own keys), so the output has the source's layout, whichever it was
(the hub's or transformers 5's). Tensors the loader ignores (RoPE's inv_freq, SigLIP's unused
head) are copied as they were. A swapped connector's tensors, which the source lacks, go under
the source's prefix for the connector (LLaVA's `multi_modal_projector.`, Idefics3's
`model.connector.modality_projection.`), and its config row into config.json as
"minivlm_connector" (load.CONNECTOR_KEY), which minivlm reads back; transformers knows only its
own connectors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .. import saving
from ..checkpoint import find_tensors, read_as
from ..load import CONNECTOR_KEY, read_family_config
from .lora import lora_layers


class SaveError(ValueError):
    """A model that cannot be saved in the hub layout, or an output that cannot be written."""


def save_checkpoint(model: nn.Module, source, output, extra: dict | None = None) -> Path:
    """Write `model` (loaded from the checkpoint folder `source`, then trained) into the new folder
    `output`: config.json, safetensors in the source's key layout and dtype of the model, and the
    source's tokenizer, processor and template files. LoRA layers must be merged first (merge_lora),
    or saved as an adapter (lora.save_adapter). extra: file name -> text, written beside (a log)."""
    source, output = Path(source), Path(output)
    saving.check_output(source, output, SaveError)
    if lora_layers(model):
        raise SaveError("the model has LoRA layers: merge them first (training.lora.merge_lora) or save an adapter")
    if getattr(model, "quantization", None) is not None:
        raise SaveError("a quantized model is saved with quant_save.save_quantized, not in the hub layout")
    family, source_config, raw = read_family_config(source)
    table = family.keys
    ours = model.state_dict(keep_vars=True)

    hub_name, verbatim = {}, {}  # our name -> the source's key; source keys the loader ignores
    for key, entry in find_tensors(source).items():
        name = table.model_key(key)
        if name is None:
            verbatim[key] = read_as(entry, entry.dtype, torch.device("cpu"))
        elif name in ours:
            hub_name[name] = key
        # else: a tensor of a part the model no longer has (a swapped-out connector): dropped
    prefixes = _prefixes(hub_name)

    tensors, seen = {}, set()
    for name, tensor in ours.items():
        if id(tensor) in seen:  # a tied name whose tensor went out under another name
            continue
        group = [n for n, t in ours.items() if t is tensor]
        keys = [hub_name[n] for n in group if n in hub_name] or [_new_key(group[0], prefixes)]
        for key in keys:  # a tied pair the source stored under both names is written under both
            if table.model_key(key) not in group:
                raise SaveError(f"{name}: no key of the source's layout loads back into it (tried {key!r})")
            tensors[key] = tensor.detach().cpu().contiguous()
        seen.add(id(tensor))
    tensors.update(verbatim)

    dtype = next(t.dtype for t in ours.values() if t.is_floating_point())
    raw = saving.with_dtype(raw, dtype)
    connector = getattr(getattr(model, "config", None), "connector", None)
    if connector is not None and connector != getattr(source_config, "connector", None):
        raw[CONNECTOR_KEY] = dataclasses.asdict(connector)
    return saving.write_checkpoint(source, output, raw, tensors, SaveError, extra)


def _prefixes(hub_name: dict[str, str]) -> dict[str, str]:
    """Our top-level module name -> the source's prefix for it, from the names both share below it:
    {"multi_modal_projector": "model.connector.modality_projection."} for Idefics3."""
    out = {}
    for name, key in hub_name.items():
        top, _, rest = name.partition(".")
        if rest and key.endswith(rest):
            out.setdefault(top, key[: len(key) - len(rest)])
    return out


def _new_key(name: str, prefixes: dict[str, str]) -> str:
    top, _, rest = name.partition(".")
    return prefixes[top] + rest if top in prefixes and rest else name
