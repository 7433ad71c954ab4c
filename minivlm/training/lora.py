"""LoRA on the decoder's projections (Hu et al. 2021), in PEFT's arithmetic and file layout.

A targeted linear layer keeps its frozen weight W and gains two small ones, A (rank x in) and
B (out x rank): y = x W^T + b + (dropout(x) A^T B^T) * alpha / rank. B starts at zero, so training
starts from the unchanged model; A starts as PEFT's (kaiming-uniform, a = sqrt(5)).

The layer keeps its parameters' names (`q_proj.weight`), so the checkpoint's keys still fit, and
the adapter's are `q_proj.lora_A.weight` / `q_proj.lora_B.weight`, as in PEFT. Saved as an adapter,
each key is prefixed with "base_model.model." and transformers' module name of the layer (PEFT's
adapter_model.safetensors), with adapter_config.json beside it; merged, W + B A * alpha / rank
replaces W and the model is a plain checkpoint again.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import ops

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraError(ValueError):
    """A LoRA setting or adapter folder that cannot be used, with what was expected."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # of PROJECTIONS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise LoraError(f"LoRA rank {self.rank!r}: expected a whole number of at least 1")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LoraError(f"LoRA alpha {self.alpha!r}: expected a positive number")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LoraError(f"LoRA dropout {self.dropout!r}: expected a number in [0, 1)")
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if not self.targets or bad:
            raise LoraError(f"LoRA targets {list(self.targets)}: expected some of {list(PROJECTIONS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(ops.Linear):
    """A linear layer with a LoRA update beside its (frozen) weight."""

    def __init__(self, base: nn.Linear, config: LoraConfig):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the base layer's own parameters, not copies
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(config.dropout)
        self.scaling = config.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            ops.linear(x, self.weight, self.bias, self.kernels)
            + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        )

    def merged(self) -> ops.Linear:
        """A plain linear layer whose weight is W + B A * scaling (computed in fp32, stored in W's dtype)."""
        layer = ops.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.kernels = self.kernels
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling  # (out, in)
        layer.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
        layer.bias = self.bias
        return layer


def decoder_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(the decoder's module name, the decoder: transformers' `LlamaModel`) of a VLM or a text model."""
    if hasattr(model, "language_model"):
        return "language_model.model", model.language_model.model
    return "model", model.model


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Put a LoRA update on `config.targets` of every decoder layer, in place; returns the names of
    the layers changed. The rest of the model is untouched (freezing it is the caller's choice)."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LoraError("the model has LoRA layers already; merge them (merge_lora) before adding more")
    prefix, decoder = decoder_of(model)
    names = []
    for name, module in list(decoder.named_modules()):
        owner, _, attr = name.rpartition(".")
        if attr in config.targets:
            # Exact types: a quantized layer has no float weight to add to, and a tensor-parallel
            # one (parallel.RowParallelLinear, an ops.Linear) would lose its all-reduce.
            if type(module) not in (nn.Linear, ops.Linear):
                raise LoraError(
                    f"{prefix}.{name} is a {type(module).__name__}; LoRA goes on a full-precision nn.Linear"
                )
            layer = LoraLinear(module, config)
            layer.kernels = getattr(model, "kernels", layer.kernels)  # the model's path, whatever the base had
            setattr(decoder.get_submodule(owner), attr, layer)
            names.append(f"{prefix}.{name}")
    return names


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its layer's weight, in place; returns how many layers were merged."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, layer.merged())
    return len(layers)


# ---------------------------------------------------------------------------------------------
# PEFT's adapter layout


def hf_module_name(name: str, hf_decoder: str) -> str:
    """Our module name of a decoder layer's projection -> transformers' (PEFT keys by it):
    language_model.model.layers.0.self_attn.q_proj -> model.language_model.layers.0.self_attn.q_proj."""
    return re.sub(r"^(language_model\.model|model)\.layers\.", f"{hf_decoder}.layers.", name)


def save_adapter(
    model: nn.Module, config: LoraConfig, output, hf_decoder: str, base_model: str = "", extra: dict | None = None
) -> Path:
    """Write the LoRA weights as PEFT does into the new folder `output`: adapter_model.safetensors
    and adapter_config.json (and `extra`, file name -> text), whole or not at all.

    hf_decoder: transformers' module name of the decoder (load.Family.hf_decoder), so that PEFT
    finds each layer in transformers' model. target_modules is a regular expression that names
    exactly the decoder's projections (a plain list would also match the vision tower's q_proj)."""
    from safetensors.torch import save_file

    from ..saving import check_new_folder, write_folder

    layers = lora_layers(model)
    if not layers:
        raise LoraError("the model has no LoRA layers to save")
    output = Path(output)
    check_new_folder(output, LoraError)
    tensors = {}
    for name, layer in layers.items():
        key = f"base_model.model.{hf_module_name(name, hf_decoder)}"
        tensors[f"{key}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    targets = "|".join(config.targets)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": rf"{re.escape(hf_decoder)}\.layers\.\d+\.(self_attn|mlp)\.({targets})",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }

    def fill(folder: Path) -> None:
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")

    return write_folder(output, fill, extra)


def load_adapter(model: nn.Module, folder, hf_decoder: str) -> LoraConfig:
    """Put the LoRA layers of a PEFT adapter folder (save_adapter's, or PEFT's own for a plain
    LoRA on the decoder's projections) on the model, with its weights; returns its config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        raw = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise LoraError(f"{folder}: cannot read adapter_config.json ({e})") from None
    if raw.get("peft_type") != "LORA" or raw.get("use_dora") or raw.get("bias", "none") != "none":
        raise LoraError(f"{folder}: a plain LoRA adapter (peft_type LORA, no DoRA, bias 'none') is supported")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    targets = sorted({k.split(".")[-3] for k in weights if k.endswith(".lora_A.weight")})
    config = LoraConfig(int(raw["r"]), float(raw["lora_alpha"]), float(raw.get("lora_dropout") or 0.0), tuple(targets))
    names = apply_lora(model, config)
    expected = {}
    for name in names:
        key = f"base_model.model.{hf_module_name(name, hf_decoder)}"
        expected[f"{key}.lora_A.weight"] = f"{name}.lora_A.weight"
        expected[f"{key}.lora_B.weight"] = f"{name}.lora_B.weight"
    if set(weights) != set(expected):
        merge_lora(model)  # undo: nothing half-applied (B is still zero, so merging changes nothing)
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise LoraError(f"{folder}: the adapter does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, name in expected.items():
            if params[name].shape != weights[key].shape:
                raise LoraError(
                    f"{folder}: {key} has shape {list(weights[key].shape)}, the model's is {list(params[name].shape)}"
                )
            params[name].copy_(weights[key])
    return config
