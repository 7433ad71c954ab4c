"""Every fused op, defined in plain PyTorch.

These functions are the definitions the Triton kernels in `minivlm.kernels` must equal, and the
signatures the kernels take over. Model code calls only these. Each mirrors the arithmetic of the
transformers module named beside it (including where it casts), because that is what parity means:
same dtype at the same step, not merely the same formula.

Two paths, as the calling module's `kernels` choice says:
  "off":  the reference: these definitions, everywhere. Parity is measured on it.
  "auto": the fast path, the default: minivlm's Triton kernels (`minivlm.kernels`) for RMSNorm,
          LayerNorm, RoPE and attention on CUDA tensors when triton imports; elsewhere attention
          runs torch's scaled_dot_product_attention (`sdpa_attention`), fp32 linear layers on the
          CPU oneDNN's matmul (`linear`), and the rest as defined here;
  "on":   the Triton kernels, even for CPU tensors, which triton runs only under
          TRITON_INTERPRET=1 (slowly: that is for tests).
A model makes the choice once, when it is built or loaded (`load_model(kernels=...)`, else the
environment variable MINIVLM_KERNELS: the same words, see KERNEL_WORDS), and `set_kernels` hands it
to each module that calls an op here.
"""

from __future__ import annotations

import functools
import math
import os
import platform

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn

from .config import RopeConfig


@functools.cache
def _triton_kernels():
    """minivlm.kernels, or None when triton cannot be imported (no warning: the plain path serves)."""
    try:
        from . import kernels
        from .kernels import attention, decode, norms, quant, rope  # noqa: F401  (loads the submodules onto `kernels`)
    except ImportError:
        return None
    return kernels


class KernelsError(ValueError):
    """A kernel choice minivlm cannot honour: a value it does not know, or the Triton kernels asked
    for where they cannot run."""


KERNEL_CHOICES = ("auto", "on", "off")
# What `kernels=` and MINIVLM_KERNELS accept (case and surrounding spaces aside) -> the choice.
KERNEL_WORDS = {"auto": "auto", "": "auto", "on": "on", "1": "on", "true": "on", "off": "off", "0": "off",
                "false": "off"}  # fmt: skip


def kernels_choice(value: str | bool | int | None = None) -> str:
    """ "auto", "on" or "off", from `value` (also True/False, 1/0, "1"/"0"), or else from the
    environment variable MINIVLM_KERNELS, read here: once per model, when it is built or loaded."""
    what = f"kernels={value!r}"
    if value is None:
        value = os.environ.get("MINIVLM_KERNELS", "")
        what = f"MINIVLM_KERNELS={value!r}"
    choice = KERNEL_WORDS.get(str(value).strip().lower()) if isinstance(value, (str, bool, int)) else None
    if choice is None:
        raise KernelsError(f"{what}: expected auto (or unset), on (1, true) or off (0, false)")
    if choice == "on" and _triton_kernels() is None:
        raise KernelsError(
            f"{what} asks for the Triton kernels, but triton cannot be imported; install it, or use auto"
        )
    return choice


def check_kernels_device(kernels: str, device: torch.device) -> None:
    """The kernels forced on run on CUDA, or on the CPU only under triton's interpreter: say so when
    the model is loaded, not at its first op."""
    if kernels == "on" and device.type != "cuda" and not _interpreting():
        raise KernelsError(
            f"the Triton kernels (kernels='on' or MINIVLM_KERNELS=1) run on CUDA; on {device} they need "
            "TRITON_INTERPRET=1 set before triton is imported (slow: for tests). Use auto"
        )


class ModelWithPath(nn.Module):
    """A model's top class (VisionLanguageModel, DecoderLM): it holds the path chosen at load in
    `kernels`. A module assigned to it afterwards (a swapped connector, `model.multi_modal_projector
    = build_connector(...)`, or add_module) takes that path too, as the modules built with it did,
    and `model.kernels = "off"` switches every module. (A module swapped in deeper, into a layer,
    needs `set_kernels(model, model.kernels)`.)"""

    def __setattr__(self, name: str, value) -> None:
        if name == "kernels":  # the choice itself: checked, and handed to every module
            super().__setattr__(name, kernels_choice(value))
            for child in self.children():
                self._adopt(child)
            return
        super().__setattr__(name, value)
        self._adopt(value)

    def add_module(self, name: str, module: nn.Module | None) -> None:
        super().add_module(name, module)
        self._adopt(module)

    def _adopt(self, value) -> None:
        if isinstance(value, nn.Module) and isinstance(self.__dict__.get("kernels"), str):
            set_kernels(value, self.kernels)


def set_kernels(model: torch.nn.Module, kernels: str | bool | None = None) -> str:
    """Give every module of `model` that calls an op here (those with a `kernels` attribute) the
    choice; returns it."""
    choice = kernels_choice(kernels)
    for module in model.modules():
        if hasattr(module, "kernels"):
            module.kernels = choice
    return choice


@functools.cache
def _interpreting() -> bool:
    """Whether triton runs kernels on the CPU: TRITON_INTERPRET=1, which triton reads when it is imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _recording(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on `tensors`: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_kernels(x: torch.Tensor, kernels: str, *others: torch.Tensor | None) -> bool:
    """Whether an op on `x` (and `others`, its other tensor inputs) runs the Triton kernel under the
    choice `kernels` ("auto", "on" or "off": see the module docstring)."""
    if kernels == "off":
        return False
    # The kernels have no backward: where autograd records (training), "auto" takes the torch path.
    recording = _recording(x, *others)
    if kernels == "on":
        check_kernels_device("on", x.device)
        if recording:
            raise KernelsError(
                "autograd is recording this op (grad mode is on and an input requires grad), and the Triton "
                "kernels have no backward pass: run inference under torch.no_grad(), or train with "
                "kernels='auto' or 'off'"
            )
        return True
    if kernels != "auto":
        raise KernelsError(f"kernels={kernels!r}: an op takes 'auto', 'on' or 'off' (kernels_choice reads the rest)")
    return x.is_cuda and not recording and _triton_kernels() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: str = "auto") -> torch.Tensor:
    """RMSNorm as transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale.

    The cast happens before the multiply by `weight`, so in bf16 the product is rounded twice; a
    kernel that multiplies in fp32 and rounds once is more accurate and would not match.
    """
    if use_kernels(x, kernels, weight):
        return _triton_kernels().norms.rms_norm(x, weight, eps)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32, with the checkpoint's scaling applied.

    Mirrors transformers' `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`
    and `_compute_llama3_parameters` (modeling_rope_utils.py).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, and the band in
        # between interpolated smoothly between the two.
        low_freq_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (batch, seq, head_dim) for integer positions (batch, seq), computed in fp32.

    As transformers' LlamaRotaryEmbedding: the angle table is duplicated (not interleaved), which is
    what `rotate_half` expects.
    """
    freqs = position_ids[..., None].float() * inv_freq.float()  # (batch, seq, head_dim // 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (batch, seq, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (batch, heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim) by cos and sin
    (batch, seq, head_dim)."""
    if use_kernels(q, kernels, k):
        return _triton_kernels().rope.apply_rope(q, k, cos, sin)
    cos, sin = cos[:, None], sin[:, None]  # (batch, 1, seq, head_dim): broadcast over heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    q_offset: int = 0,
    kv_valid: torch.Tensor | None = None,
    window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Which keys each query may see, as a boolean (batch or 1, 1, q_len, kv_len); None when all may.

    Query i sits at cache index `q_offset + i`; key j at cache index j. A key is visible when it is
    not in the future (`causal`), is a real token (`kv_valid[b, j]`, for left padding or padded
    patches), and lies within the last `window` indices (sliding-window layers, as transformers'
    `sliding_window_overlay`: j > i - window).
    """
    # A rule that hides nothing is dropped: causal when the first query already sits at or past
    # the last key (a decode step), the window when no query is `window` past the first key.
    if causal and q_offset >= kv_len - 1:
        causal = False
    if window is not None and q_offset + q_len - 1 < window:
        window = None
    if not causal and kv_valid is None and window is None:
        return None
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]  # (q_len, 1)
    kv_idx = torch.arange(kv_len, device=device)[None, :]  # (1, kv_len)
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (kv_idx <= q_idx)
    if window is not None:
        allowed = allowed & (kv_idx > q_idx - window)
    allowed = allowed[None, None]  # (1, 1, q_len, kv_len)
    if kv_valid is not None:
        allowed = allowed & kv_valid.bool()[:, None, None, :]  # (batch, 1, q_len, kv_len)
    return allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    q_offset: int = 0,
    kv_valid: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    kernels: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q (batch, heads, q_len, head_dim); k, v (batch, kv_heads, kv_len, head_dim), heads a multiple of
    kv_heads. Visibility as `attention_mask`. Returns (batch, heads, q_len, head_dim).

    The arithmetic is transformers' `eager_attention_forward`: scores in the input dtype, masked
    keys set to the dtype's most negative finite value (so a query with no visible key, such as a
    left-padding position, averages all keys instead of producing NaN), softmax in fp32, cast back.
    The Triton kernel keeps the scores in fp32 instead (closer to exact, not bit-equal in half
    precision) and gives a query with no visible key the mean of the keys it scanned.
    """
    if use_kernels(q, kernels, k, v):
        return _triton_kernels().attention.attention(
            q, k, v, causal=causal, q_offset=q_offset, kv_valid=kv_valid, window=window, scale=scale
        )
    if kernels == "auto":
        return sdpa_attention(q, k, v, causal=causal, q_offset=q_offset, kv_valid=kv_valid, window=window, scale=scale)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale

    # Each kv head serves `groups` consecutive query heads; view q so one matmul covers a group
    # instead of materialising the repeated keys.
    qg = q.reshape(batch, kv_heads, groups * q_len, head_dim)  # (batch, kv_heads, groups*q_len, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # (batch, kv_heads, groups*q_len, kv_len)
    scores = scores.view(batch, heads, q_len, kv_len)

    allowed = attention_mask(
        q_len, kv_len, causal=causal, q_offset=q_offset, kv_valid=kv_valid, window=window, device=q.device
    )
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)

    probs = probs.view(batch, kv_heads, groups * q_len, kv_len)
    out = torch.matmul(probs, v)  # (batch, kv_heads, groups*q_len, head_dim)
    return out.view(batch, heads, q_len, head_dim)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    *,
    kv_valid: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
    kernels: str = "auto",
) -> torch.Tensor:
    """A decode step's attention over a static cache: q (batch, heads, 1, head_dim) at cache slot
    `slot` (a (1,) long tensor, never read on the host), k_cache and v_cache (batch, kv_heads,
    max_len, head_dim) filled up to and including that slot. Key j is visible when j <= slot, j is a
    real token (kv_valid (batch, max_len), if given) and j > slot - window (if given): the rules of
    `attention` for one query, with the unfilled slots hidden. Returns (batch, heads, 1, head_dim).
    The caches may be the first slots of a longer cache (KVCache.reach); kv_valid is cut to them.

    On CUDA (and under "on") the Triton split-KV kernel (`minivlm.kernels.decode`) reads the slot on
    the device and touches only the filled keys; elsewhere the whole cache goes through SDPA ("auto")
    or the definition ("off") with the unfilled slots masked. The query's own slot is always visible,
    so no row is fully masked.
    """
    if kv_valid is not None:
        kv_valid = kv_valid[:, : k_cache.shape[2]]
    if use_kernels(q, kernels):
        return _triton_kernels().decode.decode_attention(
            q, k_cache, v_cache, slot, kv_valid=kv_valid, window=window, scale=scale
        )
    keys = torch.arange(k_cache.shape[2], device=q.device)
    visible = keys <= slot  # (max_len,)
    if window is not None:
        visible = visible & (keys > slot - window)
    visible = visible[None] if kv_valid is None else visible & kv_valid.bool()  # (batch or 1, max_len)
    if kernels == "off":
        return attention(q, k_cache, v_cache, causal=False, kv_valid=visible, scale=scale, kernels="off")
    grouped = q.shape[1] != k_cache.shape[1]
    return F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=grouped
    )


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    q_offset: int = 0,
    kv_valid: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """`attention` on the fast path without the Triton kernels: torch's scaled_dot_product_attention
    (a fused kernel, no (q_len, kv_len) score matrix in the input dtype), the same visibility.

    A query with no visible key (a left-padding position) is let see every key: a fully masked row
    would give NaN, which would reach the cache and, times a zero weight, every later query. Its
    output is never used, so it need not be the definition's (an average of all the keys). Not
    bit-equal to the definition elsewhere either: the kernel sums in another order (and in fp32 for
    half precision); tests/test_fast_path.py measures how close.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    grouped = q.shape[1] != k.shape[1]
    if causal and q_offset == 0 and q_len == kv_len and kv_valid is None and window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=grouped)
    allowed = attention_mask(
        q_len, kv_len, causal=causal, q_offset=q_offset, kv_valid=kv_valid, window=window, device=q.device
    )
    if allowed is not None:
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # (batch or 1, 1, q_len, kv_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=grouped)


# Whether this torch has oneDNN's matmul op (`torch.ops.mkldnn._linear_pointwise`, what inductor's
# CPU backend calls for frozen linears), on an x86-64 CPU: the only kind it was measured on (on
# ARM, oneDNN runs through another backend, unmeasured here). Asked once here: torch.compile
# cannot trace the asking.
_ONEDNN = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


# oneDNN's call costs about 12 us more than F.linear's: below about half a million multiply-adds
# F.linear is as fast or faster (scripts/linear_paths.py --small measures where they cross).
ONEDNN_MIN_MACS = 1 << 19


def _onednn_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the fast path hands this product to oneDNN: fp32 on the CPU, shapes F.linear would
    take (else F.linear says what is wrong), large enough to pay for the call, and nothing that
    only F.linear honours: autograd recording (the op has no backward of its own), forward-mode AD,
    autocast, jit tracing, oneDNN switched off (torch.backends.mkldnn.flags(enabled=False)).
    (bf16 products already go to oneDNN through F.linear.)"""
    return (
        _ONEDNN
        and x.device.type == weight.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() >= 1
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        # oneDNN reads a bias as one contiguous row, whatever its strides say
        and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1] and bias.is_contiguous()))
        and x.numel() // max(x.shape[-1], 1) * weight.numel() >= ONEDNN_MIN_MACS
        and not _recording(x, weight, bias)
        and forward_ad._current_level < 0  # no dual level open: no tangent to carry
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and torch._C._get_mkldnn_enabled()
    )


@torch.library.custom_op("minivlm::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's matmul as one opaque op for torch.compile: inductor's own lowering of
    `_linear_pointwise` takes the weight for a frozen constant, which a compiled decode step's
    parameters are not."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, kernels: str = "auto"
) -> torch.Tensor:
    """nn.Linear's product: x (..., in) -> (..., out).

    The reference is F.linear, which on the CPU runs MKL's sgemm. The fast path runs fp32 products
    on the CPU through oneDNN instead, on the same weights (no copy, no new layout): on the AMD EPYC
    measured, where MKL is slow, oneDNN's matmul was 1.6-2.0x faster for a decode step's
    projections and 2.2x for a prefill's (BENCHMARKS.md, "Linear layers"). The sums run in another
    order, so the result is not bit-equal to F.linear (tests/test_fast_path.py measures how close).
    """
    if kernels != "off" and _onednn_fits(x, weight, bias):
        if torch.compiler.is_compiling():
            return _onednn_linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear on the model's path (`linear`): the same parameters, names and state dict."""

    kernels = "auto"  # set_kernels: the model's path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.kernels)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's elementwise part: silu(gate) * up, in the input dtype as transformers' LlamaMLP."""
    return F.silu(gate) * up


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, kernels: str = "auto"
) -> torch.Tensor:
    """LayerNorm over the last dim, as nn.LayerNorm (the vision towers)."""
    if use_kernels(x, kernels, weight, bias):
        return _triton_kernels().norms.layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activations the towers and connectors use, by their transformers names."""
    if name == "quick_gelu":  # CLIP: a sigmoid approximation of GELU
        return x * torch.sigmoid(1.702 * x)
    if name == "gelu_pytorch_tanh":  # SigLIP
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")
