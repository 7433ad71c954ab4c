"""Weight-only quantization of linear layers: int8 per output channel, int4 in groups along the
input. Activations stay in the model's dtype; only the weights are stored small, which is what a
batch-1 decode step reads (it is bound by the bytes of weights it reads).

The schemes, and the reference arithmetic every fast path must equal:
- int8: symmetric per output channel. scale[n] = max |w[n, :]| / 127, q = round(w / scale) in
  [-127, 127]; w ~ q * scale.
- int4: asymmetric in groups of `group_size` (32, 64 or 128) consecutive inputs, the convention of
  torch's int4 kernels (tinygemm): scale = (max - min) / 15 and zero = min + 8 * scale per group,
  q = round((w - zero) / scale + 8) in [0, 15]; w ~ (q - 8) * scale + zero. A width the group does
  not divide (576 = 4.5 x 128) is padded at quantization with copies of the row's last input, so
  the last group's range is its real inputs'; the padded inputs meet zeros in the activations.
  With QuantConfig.search each group's range is then searched (quantize_int4): shrunk about its
  centre where that lowers the group's squared error, clipping its outliers. It is off by
  default: on the one real model measured it moved next-token agreement by under a point either
  way (BENCHMARKS.md).
Scales and zeros are rounded to the model's dtype before q is computed, so the dequantized weight
is exactly what the stored numbers say. The reference (`QuantLinear.dequantize` then a matmul,
kernels="off") dequantizes in fp32 and rounds once to the activations' dtype.

Fast paths (kernels="auto"): on the CPU, torch's weight-only kernels (`_weight_int8pack_mm`, or
from WIDEN_ROWS rows on the int8 weights widened to bf16 for oneDNN's matmul;
`_weight_int4pack_mm_for_cpu` over the weights repacked at load into its own layout); on CUDA,
the Triton dequantize-and-multiply kernel in minivlm.kernels.quant (kernels="on" forces it, on
the CPU under TRITON_INTERPRET=1). tests/test_quant.py and tests/test_kernels_quant.py measure
how close each is to the reference.

The stored layout (safetensors, quant_save.save_quantized), per quantized linear `NAME`:
  NAME.qweight  int8 (out, in) for int8; uint8 (out, padded in / 2) for int4, two inputs a byte:
                input 2j in the low nibble, 2j + 1 in the high one;
  NAME.scales   (out,) for int8, (out, groups) for int4, in the model's dtype;
  NAME.zeros    (out, groups), int4 only;
  NAME.bias     as the checkpoint had it.
A layer named in QuantConfig.keep is stored as the checkpoint had it (NAME.weight, NAME.bias).
config.json records the scheme under "minivlm_quantization" (see QuantConfig.to_json).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
# What can be quantized, by name: the decoder's layers (the default, as the seeds' 4- and 8-bit
# loaders do), its output projection, the vision tower, the connector.
PARTS = ("decoder", "lm_head", "vision", "connector")


class QuantError(ValueError):
    """A quantization setting minivlm does not offer; the message says what it offers."""


@dataclass(frozen=True)
class QuantConfig:
    scheme: str  # "int8" or "int4"
    group_size: int = 64  # int4: inputs per scale and zero
    parts: tuple[str, ...] = ("decoder",)
    search: bool = False  # int4: each group's range searched for the least error (quantize_int4)
    # Linear layers of `parts` left in the checkpoint's precision, by the names model.named_modules()
    # gives them ("model.layers.11.mlp.down_proj"): the most sensitive ones (quant_sensitivity.py).
    keep: tuple[str, ...] = ()

    @classmethod
    def parse(
        cls, quantize, group_size: int | None = None, parts=None, search: bool = False, keep=None
    ) -> "QuantConfig | None":
        """load_model's arguments -> a QuantConfig, or None for no quantization; QuantError names
        the values it takes."""
        if isinstance(quantize, QuantConfig):  # given whole: checked as the words are
            if group_size is not None or parts is not None or keep is not None:
                raise QuantError(
                    "give group_size, quantize_parts and quantize_keep inside the QuantConfig, not beside it"
                )
            return cls.parse(quantize.scheme, quantize.group_size, quantize.parts, quantize.search, quantize.keep)
        if quantize is None or quantize is False:
            if group_size is not None or parts is not None or keep is not None:
                raise QuantError("group_size, quantize_parts and quantize_keep need quantize='int8' or 'int4'")
            return None
        if quantize not in SCHEMES:
            raise QuantError(f"quantize={quantize!r}: expected one of {', '.join(SCHEMES)} (or None)")
        if group_size is None:
            group_size = 64
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
            raise QuantError(
                f"group_size={group_size!r}: expected a whole number, one of {', '.join(map(str, GROUP_SIZES))}"
            )
        group_size = int(group_size)
        if quantize == "int8" and group_size != 64:
            raise QuantError("group_size is int4's: int8 has one scale per output channel")
        if group_size not in GROUP_SIZES:
            raise QuantError(f"group_size={group_size!r}: expected one of {', '.join(map(str, GROUP_SIZES))}")
        if parts is not None and not isinstance(parts, (str, list, tuple)):
            raise QuantError(f"quantize_parts={parts!r}: expected a list of some of {', '.join(PARTS)}")
        parts = ("decoder",) if parts is None else ((parts,) if isinstance(parts, str) else tuple(parts))
        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise QuantError(f"quantize_parts={list(parts)!r}: expected some of {', '.join(PARTS)}")
        if not isinstance(search, bool):
            raise QuantError(f"search={search!r}: expected True or False")
        keep = () if keep is None else ((keep,) if isinstance(keep, str) else keep)  # one name, or several
        if not isinstance(keep, (list, tuple)) or not all(isinstance(k, str) and k for k in keep):
            raise QuantError(
                f"quantize_keep={keep!r}: expected names of linear layers, such as model.layers.0.mlp.down_proj"
            )
        parts = tuple(p for p in PARTS if p in parts)
        return cls(quantize, group_size, parts, search and quantize == "int4", tuple(dict.fromkeys(keep)))

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size, "parts": list(self.parts), "search": self.search,
                "keep": list(self.keep)}  # fmt: skip

    @classmethod
    def from_json(cls, d, source: str) -> "QuantConfig":
        if not isinstance(d, dict):
            raise QuantError(f"{source}: minivlm_quantization is a {type(d).__name__}; expected an object")
        if not isinstance(d.get("keep", []), list):  # the file holds a list; one bare name is the API's shorthand
            raise QuantError(f"{source}: minivlm_quantization: keep={d['keep']!r}: expected a list of layer names")
        try:
            return cls.parse(
                d.get("scheme"), d.get("group_size"), d.get("parts"), d.get("search", False), d.get("keep")
            )
        except QuantError as e:
            raise QuantError(f"{source}: minivlm_quantization: {e}") from None


# -- quantizing a weight -----------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """weight (out, in) -> {"qweight": int8 (out, in), "scales": (out,) in dtype}."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": q, "scales": scales}


# int4's range search: each group's range shrunk about its centre by these factors, the one with
# the least squared error kept (1.0 is plain round-to-nearest over the full range).
RANGE_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_int4(
    weight: torch.Tensor, group_size: int, dtype: torch.dtype, search: bool = False
) -> dict[str, torch.Tensor]:
    """weight (out, in) -> {"qweight": uint8 (out, padded in / 2), "scales", "zeros": (out, groups) in dtype}.

    search False: each group's grid spans its range (round-to-nearest). True: the range shrunk
    about its centre by each of RANGE_FACTORS, each group keeping the grid whose dequantized
    weights are closest (squared error) to its own: clipping a few outliers buys a finer step
    for the rest. No data is needed."""
    out_features, in_features = weight.shape
    groups = math.ceil(in_features / group_size)
    w = weight.float()
    if groups * group_size != in_features:  # copies of the last input: the last group's range stays its own
        w = torch.cat([w, w[:, -1:].expand(out_features, groups * group_size - in_features)], dim=1)
    w = w.view(out_features, groups, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (out, groups)
    centre, half = (high + low) / 2, (high - low) / 2
    best = None
    for factor in RANGE_FACTORS if search else (1.0,):
        scales = (2 * half * factor / 15).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
        zeros = (centre - half * factor + 8 * scales.float()).to(dtype)
        s, z = scales.float()[..., None], zeros.float()[..., None]
        q = torch.round((w - z) / s + 8).clamp(0, 15)
        error = ((q - 8) * s + z - w).square().sum(dim=-1)  # (out, groups)
        if best is None:
            best = [error, scales, zeros, q]
            continue
        better = error < best[0]
        best = [torch.where(better, error, best[0]), torch.where(better, scales, best[1]),
                torch.where(better, zeros, best[2]), torch.where(better[..., None], q, best[3])]  # fmt: skip
    _, scales, zeros, q = best
    q = q.to(torch.uint8).view(out_features, groups * group_size)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scales, "zeros": zeros}


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 (out, n / 2) -> the 4-bit values (out, n) as uint8, in input order."""
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).view(qweight.shape[0], -1)


# -- the module --------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight: the buffers of the stored layout (module docstring), the
    bias as a parameter. `dequantize` is the reference; `forward` takes the model's path."""

    kernels = "auto"  # ops.set_kernels: the model's path

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str, group_size: int, dtype):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.group_size = (
            in_features,
            out_features,
            scheme,
            group_size,
        )
        if scheme == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype))
        else:
            groups = math.ceil(in_features / group_size)
            self.register_buffer("qweight", torch.empty(out_features, groups * group_size // 2, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.cpu_pack = None  # int4 on the CPU's fast path: the weights in torch's kernel layout (pack_for_cpu)
        # The shapes torch's CPU kernels take (probed on torch 2.13): int8 gives wrong sums, or
        # crashes, when the inputs are not a multiple of 16. (int4 refuses outputs that are not;
        # pack_for_cpu pads them.)
        self.cpu_kernel_fits = in_features % 16 == 0 if scheme == "int8" else True

    @classmethod
    def like(cls, linear: nn.Linear, config: QuantConfig, dtype: torch.dtype) -> "QuantLinear":
        """An empty QuantLinear of `linear`'s shape (on the device being built on: meta in the loader)."""
        return cls(
            linear.in_features, linear.out_features, linear.bias is not None, config.scheme, config.group_size, dtype
        )

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{group}"

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out, in) the stored numbers say, computed in fp32 and rounded once to dtype."""
        dtype = dtype or self.scales.dtype
        if self.scheme == "int8":
            return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)
        q = (
            unpack_int4(self.stored_qweight()).float().view(self.out_features, -1, self.group_size)
        )  # (out, groups, group)
        w = (q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.view(self.out_features, -1)[:, : self.in_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is None and x.device.type != "cpu":  # moved off the CPU after loading: unpack
            self.qweight, self.cpu_pack = self.stored_qweight().to(x.device), None
        if ops.use_kernels(x, self.kernels):  # CUDA (or kernels="on"): the Triton kernel
            return ops._triton_kernels().quant.quant_linear(x, self)
        if self.kernels == "auto" and x.device.type == "cpu" and self.cpu_kernel_fits:
            return self._cpu_forward(x)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """torch's weight-only kernels on the CPU (x (..., in) -> (..., out)). They are fast for
        bf16 activations only (fp32 ones take a slow generic loop, 5-10x slower than the fp32
        matmul itself), so fp32 and fp16 activations are rounded to bf16 for the product and the
        result returned in their dtype: an error of about 2^-9 of each activation, well under the
        weights' own (int8: up to 2^-8 of a row's largest weight)."""
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.scheme == "int8" and rows.shape[0] >= WIDEN_ROWS and _BF16_MATMUL:
            out = self._widened_int8(rows)
        elif self.scheme == "int8":
            out = torch._weight_int8pack_mm(rows, self.qweight, self.scales.to(torch.bfloat16))
        else:
            if self.cpu_pack is None:
                self.pack_for_cpu()
            padded = self.scales.shape[1] * self.group_size
            if padded != self.in_features:  # the padded inputs of the last group meet zeros
                rows = F.pad(rows, (0, padded - self.in_features))
            out = torch._weight_int4pack_mm_for_cpu(rows, self.cpu_pack[0], self.group_size, self.cpu_pack[1])
            out = out[:, : self.out_features]
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _widened_int8(self, rows: torch.Tensor) -> torch.Tensor:
        """int8 at a prefill: torch's int8 kernel takes a row at a time (its time grows with the
        rows), so for many rows the integers are widened to bf16 (exactly: |q| <= 127) and oneDNN's
        bf16 matmul runs, then each output is scaled in fp32. One bf16 rounding of each output, as
        the kernel's; the widened copy is made ROWS_AT_ONCE output rows at a time."""
        pieces = []
        for start in range(0, self.out_features, ROWS_AT_ONCE):
            q = self.qweight[start : start + ROWS_AT_ONCE].to(torch.bfloat16)
            pieces.append(F.linear(rows, q).float() * self.scales[start : start + ROWS_AT_ONCE].float())
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def pack_for_cpu(self, keep_stored: bool = True) -> None:
        """The int4 weights in the layout of torch's CPU kernel (which depends on the CPU's
        instruction set), with scales and zeros as it takes them: (groups, out, 2). keep_stored
        False drops the stored layout (qweight None) so that the weights are held once; it is
        recovered from the kernel's when needed (stored_qweight: saving, the reference)."""
        scales_zeros = torch.stack([self.scales, self.zeros], dim=-1)  # (out, groups, 2)
        extra = -self.out_features % 16  # the kernel takes outputs in 16s: rows of zero weight, cut after
        scales_zeros = F.pad(scales_zeros, (0, 0, 0, 0, 0, extra))
        # The kernel's layout packs blocks of 64 rows on their own (checked: packing in row chunks
        # equals packing at once), so the int32 copy it starts from is made a chunk at a time, and
        # the chunks go straight into one buffer.
        packed = None
        for start in range(0, self.out_features, ROWS_AT_ONCE):
            rows = self.qweight[start : start + ROWS_AT_ONCE]
            if start + ROWS_AT_ONCE >= self.out_features and extra:
                rows = F.pad(rows, (0, 0, 0, extra), value=0x88)  # 8 | 8 << 4: (8 - 8) * 0 + 0
            chunk = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(rows).to(torch.int32), 1)
            if packed is None:
                packed = torch.empty(self.out_features + extra, *chunk.shape[1:], dtype=chunk.dtype)
            packed[start : start + chunk.shape[0]] = chunk
        self.cpu_pack = (packed, scales_zeros.transpose(0, 1).to(torch.bfloat16).contiguous())  # (groups, out, 2)
        if not keep_stored:
            self.qweight = None

    def stored_qweight(self) -> torch.Tensor:
        """qweight in the stored layout; when only the CPU kernel's layout is held, recovered from
        it exactly: the kernel run on the identity with every scale 1 and zero 0 gives each weight's
        q - 8 (small integers, exact in bf16)."""
        if self.qweight is not None:
            return self.qweight
        packed = self.cpu_pack[0]
        groups = self.scales.shape[1]
        unit = torch.zeros(groups, packed.shape[0], 2, dtype=torch.bfloat16)
        unit[..., 0] = 1  # scale 1, zero 0
        identity = torch.eye(groups * self.group_size, dtype=torch.bfloat16)
        rows = []
        # Blocks of 64 rows pack on their own (pack_for_cpu), so a chunk of the packed rows is the
        # packed chunk of those rows: the temporaries stay ROWS_AT_ONCE rows.
        for start in range(0, self.out_features, ROWS_AT_ONCE):
            chunk = slice(start, start + ROWS_AT_ONCE)
            w = torch._weight_int4pack_mm_for_cpu(identity, packed[chunk], self.group_size, unit[:, chunk].contiguous())
            q = (w.t()[: min(ROWS_AT_ONCE, self.out_features - start)].float() + 8).round().to(torch.uint8)
            rows.append(q[:, 0::2] | (q[:, 1::2] << 4))
        return torch.cat(rows)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packed = self.qweight is None
        if packed:  # held in the CPU kernel's layout only: take the stored layout in, then pack again
            self.qweight, self.cpu_pack = self.stored_qweight(), None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if packed:
            self.pack_for_cpu(keep_stored=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:  # held in the CPU kernel's layout only: the stored one, recovered
            destination[prefix + "qweight"] = self.stored_qweight()


ROWS_AT_ONCE = 4096  # quantizing and repacking go this many output rows at a time (a multiple of 64)
# int8 on the CPU: from this many rows on, widening the weights to bf16 for oneDNN's matmul beats
# torch's int8 kernel, whose time grows with the rows (measured on 1024x2816, 2816x1024 and
# 576x1536 weights: the two cross between 16 and 32 rows; at 761 rows the matmul is 2-3x faster,
# BENCHMARKS.md). Only where oneDNN has bf16 arithmetic (an emulated bf16 matmul is no gain).
WIDEN_ROWS = 32
_BF16_MATMUL = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def quantize_weight(weight: torch.Tensor, config: QuantConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One linear weight (out, in) -> the buffers of its QuantLinear. Rows are independent, so they
    go ROWS_AT_ONCE at a time: the fp32 temporaries stay small beside a vocabulary-sized weight."""
    pieces = []
    for rows in weight.split(ROWS_AT_ONCE):
        if config.scheme == "int8":
            pieces.append(quantize_int8(rows, dtype))
        else:
            pieces.append(quantize_int4(rows, config.group_size, dtype, config.search))
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


# -- which modules, and swapping them in -------------------------------------------------------


def quant_targets(
    model: nn.Module, parts: tuple[str, ...], check: bool = False, keep: tuple[str, ...] = ()
) -> list[str]:
    """The names of the nn.Linear modules that `parts` cover in this model (text-only or VLM), less
    those in `keep`. check: a part with no linear layer in this model (vision on a text-only one),
    or a kept name that is not one of the parts' layers, is a QuantError."""
    lm = "language_model." if hasattr(model, "language_model") else ""
    roots = {"decoder": f"{lm}model.layers", "lm_head": f"{lm}lm_head", "vision": "vision_tower",
             "connector": "multi_modal_projector"}  # fmt: skip
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    found = {p: [n for n in linear if n == roots[p] or n.startswith(roots[p] + ".")] for p in parts}
    if check:
        empty = [p for p, names in found.items() if not names]
        if empty:
            raise QuantError(f"quantize_parts names {', '.join(empty)}, which this model has no linear layers in")
    covered = [n for n in linear if any(n in names for names in found.values())]
    strange = [k for k in keep if k not in covered]
    if check and strange:
        raise QuantError(
            f"quantize_keep names {', '.join(map(repr, strange))}: not a linear layer of quantize_parts "
            f"({', '.join(parts)}) in this model; its layers are named like {covered[0]}"
        )
    targets = [n for n in covered if n not in keep]
    if check and not targets:
        raise QuantError(
            f"quantize_keep names every linear layer of quantize_parts ({', '.join(parts)}): nothing to quantize"
        )
    return targets


def swap_in(model: nn.Module, names: list[str], config: QuantConfig, dtype: torch.dtype) -> None:
    """Replace each named nn.Linear by an empty QuantLinear of its shape (built on the current
    default device: meta while loading). A weight tied to another (lm_head to the embedding) is
    untied: the embedding keeps its full-precision copy."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner)
        setattr(parent, attr, QuantLinear.like(getattr(parent, attr), config, dtype))
    ops.set_kernels(model, getattr(model, "kernels", None))


def prepare(model: nn.Module) -> None:
    """After loading: int4 layers on the CPU's fast path repack their weights for torch's kernel."""
    from .weights import release_freed_memory

    for module in model.modules():
        if isinstance(module, QuantLinear) and module.scheme == "int4" and module.kernels == "auto":
            if module.qweight.device.type == "cpu" and module.cpu_kernel_fits:
                module.pack_for_cpu(keep_stored=False)
                release_freed_memory()


def quantized_bytes(model: nn.Module) -> int:
    """The bytes of the model's parameters and buffers: the quantized layout as stored (an int4
    layer held only in the CPU kernel's layout counts that, the same size)."""
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    packed = [m.cpu_pack[0] for m in model.modules() if isinstance(m, QuantLinear) and m.qweight is None]
    return held + sum(t.numel() * t.element_size() for t in packed)


def saved_quantization(raw: dict, source: str) -> QuantConfig | None:
    """The QuantConfig a checkpoint was saved with (its config.json's "minivlm_quantization",
    `raw` that file's dict), or None."""
    if "minivlm_quantization" not in raw:
        return None
    return QuantConfig.from_json(raw["minivlm_quantization"], source)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The model's dtype: that of its token embedding, which is never quantized."""
    lm = getattr(model, "language_model", model)
    return lm.model.embed_tokens.weight.dtype
