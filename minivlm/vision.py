"""The vision towers: one ViT for CLIP, SigLIP and the NaViT-style SigLIP of Idefics3.

    pixels (n, 3, H, W) -> patch convolution -> (+ CLS) + position embeddings -> (pre-norm)
    -> encoder layers (LayerNorm, bidirectional attention, LayerNorm, MLP) -> (post-norm)

Attribute names are transformers' (`embeddings.patch_embedding`, `encoder.layers.N.self_attn.q_proj`,
`pre_layrnorm` with its typo) so the hub's keys load as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import VisionConfig


class LayerNorm(nn.LayerNorm):
    kernels = "auto"  # ops.set_kernels: the model's path (fast "auto", reference "off", Triton "on")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, self.kernels)


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, bias=config.patch_bias
        )
        num_positions = config.grid**2 + (1 if config.class_token else 0)
        self.position_embedding = nn.Embedding(num_positions, config.hidden_size)
        if config.class_token:
            self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        """pixel_values (n, C, H, W) -> (n, patches (+1), hidden)."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (n, hidden, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (n, patches, hidden), row-major over the patch grid
        if self.config.variable_size:
            positions = navit_position_ids(patch_mask, self.config.grid)  # (n, patches)
        else:
            positions = torch.arange(self.position_embedding.num_embeddings, device=x.device)[None]
        if self.config.class_token:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (n, 1, hidden)
            x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding(positions)


def navit_position_ids(patch_mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Position ids (n, h*w) for images of any size, from their patch masks (n, h, w).

    An image of h' x w' real patches is laid onto the `grid` x `grid` table the tower was trained
    with: patch (i, j) takes the position of the fractional coordinate (i/h', j/w') on that table.
    Padding patches get position 0 (they are masked out of attention anyway). Mirrors
    transformers' Idefics3VisionEmbeddings, down to the float32 arithmetic and bucketize.
    """
    n, h, w = patch_mask.shape
    boundaries = torch.arange(1 / grid, 1.0, 1 / grid, device=patch_mask.device)
    rows = patch_mask[:, :, 0].sum(dim=1)  # (n,) real patch rows of each image
    cols = patch_mask[:, 0, :].sum(dim=1)  # (n,) real patch columns
    frac_h = torch.arange(h, device=patch_mask.device, dtype=torch.float32)[None] * (1.0 / rows)[:, None]  # (n, h)
    frac_w = torch.arange(w, device=patch_mask.device, dtype=torch.float32)[None] * (1.0 / cols)[:, None]  # (n, w)
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    positions = (bucket_h[:, :, None] * grid + bucket_w[:, None, :]).reshape(n, h * w)  # (n, h*w)
    return torch.where(patch_mask.reshape(n, h * w), positions, torch.zeros_like(positions))


class Attention(nn.Module):
    kernels = "auto"  # ops.set_kernels: the model's path (fast "auto", reference "off", Triton "on")

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.hidden_size // config.num_heads
        self.q_proj = ops.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = ops.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = ops.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = ops.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, kv_valid: torch.Tensor | None) -> torch.Tensor:
        n, seq, hidden = x.shape
        # (n, seq, hidden) -> (n, heads, seq, head_dim)
        q = self.q_proj(x).view(n, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, seq, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, seq, self.num_heads, self.head_dim).transpose(1, 2)
        out = ops.attention(q, k, v, causal=False, kv_valid=kv_valid, kernels=self.kernels)
        return self.out_proj(out.transpose(1, 2).reshape(n, seq, hidden))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = config.hidden_act
        self.fc1 = ops.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = ops.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ops.activation(self.act, self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_valid: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), kv_valid)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        if config.pre_norm:
            self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False  # training: recompute activations in the backward pass

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        *,
        layers: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """pixel_values (n, C, H, W) -> features (n, patches (+1 CLS), hidden * len(layers)).

        patch_mask (n, H/p, W/p) marks real patches of padded images (NaViT towers only).
        layers None: the last layer's output through post_layernorm (Idefics3, llama3v).
        layers (i, ...): the outputs of those layers, concatenated on the feature dim (LLaVA's
        vision_feature_layer). They are hidden states, as transformers' `hidden_states[i]`, so
        taken before the post-norm, which then does not run.
        """
        if layers is None:
            return self.post_layernorm(self.hidden_states(pixel_values, (len(self.encoder.layers),), patch_mask)[0])
        return torch.cat(self.hidden_states(pixel_values, layers, patch_mask), dim=-1)

    def hidden_states(
        self, pixel_values: torch.Tensor, layers: tuple[int, ...], patch_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The outputs of `layers`, as transformers' `hidden_states[i]`: index 0 is the embedding
        output, i the output of layer i, negative indices count from the end. Layers past the last
        one asked for are not run: their output would be thrown away."""
        wanted = self.layer_indices(layers)  # checked before any work
        n = pixel_values.shape[0]
        if patch_mask is None and self.config.variable_size:
            h, w = pixel_values.shape[2] // self.config.patch_size, pixel_values.shape[3] // self.config.patch_size
            patch_mask = torch.ones(n, h, w, dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values, patch_mask)
        if self.config.pre_norm:
            x = self.pre_layrnorm(x)
        kv_valid = patch_mask.reshape(n, -1) if patch_mask is not None and not bool(patch_mask.all()) else None

        states = {0: x} if 0 in wanted else {}  # only the wanted layers' outputs are kept
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            if self.gradient_checkpointing and torch.is_grad_enabled():  # keep each layer's input only
                x = checkpoint(layer, x, kv_valid, use_reentrant=False)
            else:
                x = layer(x, kv_valid)
            if i in wanted:
                states[i] = x
        return [states[i] for i in wanted]

    def layer_indices(self, layers) -> list[int]:
        """`layers` (an index or a non-empty tuple of them, each from -(N+1) to N for N layers) as
        indices into (embeddings, layer 1, ..., layer N)."""
        n = len(self.encoder.layers)
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        if not isinstance(layers, (tuple, list)) or not layers:
            raise ValueError(f"layers {layers!r}: expected a layer index or a non-empty tuple of them")
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -(n + 1) <= i <= n:
                raise ValueError(
                    f"layers {tuple(layers)!r}: each must be a whole number from {-(n + 1)} to {n} "
                    f"(0 the embeddings, i layer i's output, negative from the end; the tower has {n} layers)"
                )
        return [i % (n + 1) for i in layers]
