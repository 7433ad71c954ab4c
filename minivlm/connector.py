"""Connectors: vision features (n, tokens, vision hidden) -> text embeddings (n, tokens', text hidden).

Each is one class, chosen by `ConnectorConfig.kind` through `CONNECTORS`. A new connector is a
class here and a row there (and, to load a checkpoint, the rows of its keys in the family's table).
A connector also says how many tokens it makes of a view's patches (`Connector.tokens`): the
processor asks it, so the prompt carries one image token per feature.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .config import ConnectorConfig
from .vision import LayerNorm


class Connector(nn.Module):
    """A connector's token count: one token per patch feature, unless a subclass merges them."""

    @staticmethod
    def tokens(config: ConnectorConfig, patches: int) -> int:
        """The tokens this connector makes of one view's `patches` features."""
        return patches


class ConnectorError(ValueError):
    """A connector that cannot take the features it is given; the message says why."""


def connector_tokens(config: ConnectorConfig, patches: int) -> int:
    """The tokens `config`'s connector class makes of `patches` features (a class outside
    `Connector`, such as a bare nn.Module, keeps the count)."""
    if config.kind not in CONNECTORS:
        raise ConnectorError(f"unknown connector {config.kind!r}; minivlm has {sorted(CONNECTORS)}")
    cls = CONNECTORS[config.kind]
    return cls.tokens(config, patches) if isinstance(cls, type) and issubclass(cls, Connector) else patches


class Linear(Connector):
    """One projection."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.proj = ops.Linear(config.in_dim, config.out_dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLP2xGELU(Connector):
    """LLaVA's `mlp2x_gelu` projector: Linear, GELU, Linear."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.act = config.act
        self.linear_1 = ops.Linear(config.in_dim, config.out_dim, bias=config.bias)
        self.linear_2 = ops.Linear(config.out_dim, config.out_dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(ops.activation(self.act, self.linear_1(x)))


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(n, side*side, d) -> (n, side*side / scale^2, d * scale^2): each scale x scale block of
    patches becomes one token, as transformers' Idefics3Connector.pixel_shuffle (same element order)."""
    n, seq, d = x.shape
    side = int(seq**0.5)
    x = x.view(n, side, side // scale, d * scale)  # merge `scale` neighbours along a row
    x = x.permute(0, 2, 1, 3)  # (n, side/scale, side, d*scale)
    x = x.reshape(n, side // scale, side // scale, d * scale * scale)  # merge `scale` rows
    x = x.permute(0, 2, 1, 3)  # back to row-major blocks
    return x.reshape(n, seq // scale**2, d * scale * scale)


class PixelShuffle(Connector):
    """Idefics3 / SmolVLM: pixel shuffle by `scale_factor`, then one Linear without bias."""

    @staticmethod
    def tokens(config: ConnectorConfig, patches: int) -> int:
        side, scale = math.isqrt(patches), config.scale_factor
        if side * side != patches or scale < 1 or side % scale:
            raise ConnectorError(
                f"a pixel shuffle by {scale} merges {scale}x{scale} blocks of a square patch grid; "
                f"{patches} patches are not a square grid whose side it divides"
            )
        return patches // scale**2

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.scale = config.scale_factor
        self.proj = ops.Linear(config.in_dim, config.out_dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(x, self.scale))


def sincos_2d(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings (height, width, dim) of a patch grid, as MiniCPM-V's
    resampler builds them: the first dim/2 channels encode the column, the last dim/2 the row,
    each as [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)), k < dim/4. float32."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # (dim/4,)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, dim/2)
        angles = pos[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    cols = encode(torch.arange(width, dtype=torch.float32, device=device))  # (width, dim/2)
    rows = encode(torch.arange(height, dtype=torch.float32, device=device))  # (height, dim/2)
    return torch.cat([cols[None].expand(height, -1, -1), rows[:, None].expand(-1, width, -1)], dim=-1)


class PackedAttention(nn.Module):
    """Multi-head attention with q/k/v packed in one `in_proj_weight` (3*d, d), as
    torch.nn.MultiheadAttention stores it (and so the llama3v checkpoint)."""

    kernels = "auto"  # ops.set_kernels: the model's path (fast "auto", reference "off", Triton "on")

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = ops.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None) -> torch.Tensor:
        """q (n, queries, d), k and v (n, keys, d), kv_valid (n, keys) bool or None -> (n, queries, d)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (n, seq, d) -> (n, heads, seq, head_dim)
            return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        out = ops.attention(
            heads(ops.linear(q, w_q, b_q, self.kernels)),
            heads(ops.linear(k, w_k, b_k, self.kernels)),
            heads(ops.linear(v, w_v, b_v, self.kernels)),
            causal=False,
            kv_valid=kv_valid,
            kernels=self.kernels,
        )
        n, _, queries, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, queries, -1))


class Resampler(Connector):
    """llama3v / MiniCPM-Llama3-V 2.5: a perceiver resampler. `num_queries` learned queries attend,
    in one multi-head cross-attention, over the patch features of one slice (plus the 2D sin-cos
    embedding of each patch's place in the slice's own grid, on the keys only), whatever the
    slice's size; then LayerNorm and a square projection. Every slice becomes num_queries tokens."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        dim = config.out_dim
        self.query = nn.Parameter(torch.empty(config.num_queries, dim))
        self.kv_proj = ops.Linear(config.in_dim, dim, bias=False) if config.in_dim != dim else nn.Identity()
        self.attn = PackedAttention(dim, config.num_heads)
        self.ln_q = LayerNorm(dim, eps=1e-6)
        self.ln_kv = LayerNorm(dim, eps=1e-6)
        self.ln_post = LayerNorm(dim, eps=1e-6)
        self.proj = nn.Parameter(torch.empty(dim, dim))  # applied as x @ proj

    @staticmethod
    def tokens(config: ConnectorConfig, patches: int) -> int:
        return config.num_queries

    def forward(self, x: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, h*w, in_dim): each slice's patch features on an h x w canvas, row-major;
        patch_mask (n, h, w) marks each slice's real patches (top-left, as the NaViT tower pads).
        -> (n, num_queries, out_dim)."""
        n, seq, _ = x.shape
        if patch_mask is None:
            side = int(seq**0.5)
            patch_mask = torch.ones(n, side, side, dtype=torch.bool, device=x.device)
        h, w = patch_mask.shape[1:]
        kv = self.ln_kv(self.kv_proj(x))  # (n, h*w, d)
        # A real patch at (i, j) of its slice gets the embedding of (i, j): the same table serves
        # every slice size, since slices are padded at the bottom and right.
        pos = sincos_2d(h, w, kv.shape[-1], device=x.device).reshape(1, h * w, -1).to(kv.dtype)  # (1, h*w, d)
        kv_valid = patch_mask.reshape(n, h * w)
        q = self.ln_q(self.query).expand(n, -1, -1)  # (n, queries, d)
        out = self.attn(q, kv + pos, kv, None if bool(kv_valid.all()) else kv_valid)
        return self.ln_post(out) @ self.proj


CONNECTORS: dict[str, type[nn.Module]] = {
    "linear": Linear,
    "mlp2x_gelu": MLP2xGELU,
    "pixel_shuffle": PixelShuffle,
    "resampler": Resampler,
}


def build_connector(config: ConnectorConfig) -> nn.Module:
    if config.kind not in CONNECTORS:
        raise ValueError(f"unknown connector {config.kind!r}; minivlm has {sorted(CONNECTORS)}")
    return CONNECTORS[config.kind](config)
