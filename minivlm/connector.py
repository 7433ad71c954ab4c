"""Connectors: vision features (n, tokens, vision hidden) -> text embeddings (n, tokens', text hidden).

Each is one class, chosen by `ConnectorConfig.kind` through `CONNECTORS`. A new connector is a
class here and a row there (and, to load a checkpoint, the rows of its keys in the family's table).
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import ConnectorConfig


class Linear(nn.Module):
    """One projection."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.proj = nn.Linear(config.in_dim, config.out_dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLP2xGELU(nn.Module):
    """LLaVA's `mlp2x_gelu` projector: Linear, GELU, Linear."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.act = config.act
        self.linear_1 = nn.Linear(config.in_dim, config.out_dim, bias=config.bias)
        self.linear_2 = nn.Linear(config.out_dim, config.out_dim, bias=config.bias)

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


class PixelShuffle(nn.Module):
    """Idefics3 / SmolVLM: pixel shuffle by `scale_factor`, then one Linear without bias."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        self.scale = config.scale_factor
        self.proj = nn.Linear(config.in_dim, config.out_dim, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(x, self.scale))


CONNECTORS: dict[str, type[nn.Module]] = {
    "linear": Linear,
    "mlp2x_gelu": MLP2xGELU,
    "pixel_shuffle": PixelShuffle,
}


def build_connector(config: ConnectorConfig) -> nn.Module:
    if config.kind not in CONNECTORS:
        raise ValueError(f"unknown connector {config.kind!r}; minivlm has {sorted(CONNECTORS)}")
    return CONNECTORS[config.kind](config)
