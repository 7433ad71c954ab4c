"""One Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2 (Qwen1.5), SmolLM2.

The families differ only in configuration (biases, GQA, head_dim, RoPE scaling, sliding windows,
tied embeddings), which `TextConfig` has already resolved; the code here is one path. Attribute
names follow transformers' LlamaForCausalLM so the hub's keys load as they are.

The KV cache is static: preallocated for a batch size and a maximum length, written at the cache
index of each token, so a prefill followed by one-token decode steps computes exactly what one full
forward computes.

Two ways through the decoder:
- `forward`: any number of tokens at the cache's host-side length (a prefill; also every decode step
  of the reference path, which slices the cache to its filled slots, as transformers' cache does);
- `DecoderLM.decode_step`: one token per row on the fast path, with static shapes and no host
  value: the slot to write is a device tensor, the KV write is in place by index, attention covers
  the whole cache with the unfilled slots masked, cos/sin are rows of a precomputed table. That is
  what torch.compile (and CUDA graphs) can capture once and replay every step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import TextConfig


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> None:
    """Refuse what the embedding and the mask would turn into an index error (a device assert on
    CUDA) or a silently wrong answer: ids that are not integers or lie outside the vocabulary, a
    mask that is not 0/1 or has a hole (a 0 between 1s: positions would skip it, transformers'
    forward would not). Costs one host sync; generation's decode steps skip it."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids is a {type(input_ids).__name__}; expected a tensor of token ids (batch, length)")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids are {input_ids.dtype}; expected integer token ids (torch.long)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected (batch, length)")
    if input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids hold the id {bad}; the model's vocabulary has ids 0 to {vocab_size - 1}")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask is a {type(attention_mask).__name__}; expected a tensor of 0s and 1s")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask holds values other than 0 and 1; expected 1 for a token, 0 for padding")
    mask = attention_mask.long()
    if mask.dim() == 2 and mask.shape[1] > 2:
        # a hole: a 0 with a 1 somewhere before it and somewhere after it in its row
        before = mask.cummax(dim=1).values.bool()
        after = mask.flip(1).cummax(dim=1).values.flip(1).bool()
        hole = before & after & (mask == 0)
        if bool(hole.any()):
            row, col = (int(i) for i in hole.nonzero()[0])
            raise ValueError(
                f"attention_mask row {row} has a 0 at position {col} between 1s; padding goes on the left "
                "or the right of a row, never inside it"
            )


class RMSNorm(nn.Module):
    kernels = "auto"  # ops.set_kernels: the model's path (fast "auto", reference "off", Triton "on")

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.kernels)


class KVCache:
    """Keys and values of every layer: (batch, kv_heads, max_len, head_dim) each, plus how much is filled.

    `length` counts cache slots in use, padding included: with left padding, slot j holds sequence
    index j of every row, and the attention mask says which slots are real tokens.
    """

    def __init__(self, config: TextConfig, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0
        # How many slots a decode step's attention reads (write_at's view); None: all max_len, the
        # static shape a compiled step needs. An eager step sets it to the filled slots, so its
        # cost follows the tokens so far, not the room made for the longest answer.
        self.reach: int | None = None

    def reserve(self, max_len: int) -> None:
        """Make room for max_len slots, keeping what is filled (a chat's next turn)."""
        if max_len <= self.max_len:
            return
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros(*old.shape[:2], max_len, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new
        self.max_len = max_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, kv_heads, new, head_dim) at the next slots; return all filled slots."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def write_at(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slot: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's write: k, v (batch, kv_heads, 1, head_dim) into the slot held by the
        device tensor `slot` (1,), in place; returns the layer's cache (batch, kv_heads, reach or
        max_len, head_dim): its first `reach` slots, or all of them (static shape)."""
        self.keys[layer].index_copy_(2, slot, k)
        self.values[layer].index_copy_(2, slot, v)
        if self.reach is None:
            return self.keys[layer], self.values[layer]
        return self.keys[layer][:, :, : self.reach], self.values[layer][:, :, : self.reach]


class Attention(nn.Module):
    kernels = "auto"  # ops.set_kernels: the model's path (fast "auto", reference "off", Triton "on")

    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.window = config.sliding_windows[layer]
        hidden, q_dim, kv_dim = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.q_proj = ops.Linear(hidden, q_dim, bias=config.qkv_bias)
        self.k_proj = ops.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = ops.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = ops.Linear(q_dim, hidden, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_valid: torch.Tensor | None,
        cache: KVCache | None,
        slot: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """slot: a decode step on the fast path (DecoderLM.decode_step): the new token goes to cache
        slot `slot` (a device tensor) and attends to the whole cache, kv_valid (batch, max_len)
        marking the real tokens; slots past `slot` are not filled yet and are hidden."""
        batch, seq, _ = x.shape
        # (batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = ops.apply_rope(q, k, cos, sin, self.kernels)

        if slot is not None:
            k, v = cache.write_at(self.layer, k, v, slot)  # (batch, kv_heads, max_len, head_dim)
            out = ops.decode_attention(q, k, v, slot, kv_valid=kv_valid, window=self.window, kernels=self.kernels)
            return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
        offset = 0
        if cache is not None:
            offset = cache.length
            k, v = cache.write(self.layer, k, v)  # (batch, kv_heads, offset + seq, head_dim)
        out = ops.attention(
            q, k, v, causal=True, q_offset=offset, kv_valid=kv_valid, window=self.window, kernels=self.kernels
        )
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = ops.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = ops.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = ops.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_valid, cache, slot=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_valid, cache, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embeddings, the decoder layers and the final norm (transformers' `LlamaModel`)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Derived from the config, not stored in checkpoints. Made on the CPU even while the loader
        # builds the tree on the meta device (real values are needed), and moved with the model.
        inv_freq = ops.rope_inv_freq(config.rope, config.head_dim, device="cpu")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Training: recompute each layer's activations in the backward pass instead of storing them.
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (batch, seq, hidden) -> hidden states (batch, seq, hidden).

        attention_mask (batch, past + seq), 1 for real tokens and 0 for padding, covers the cached
        tokens too (as transformers' `generate` passes it). Positions count real tokens only, so a
        left-padded row sees the same positions it would see alone.
        """
        batch, seq, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if cache is not None and (cache.batch_size != batch or past + seq > cache.max_len):
            raise ValueError(
                f"the KV cache holds {cache.batch_size} rows of {cache.max_len} slots with {past} filled; "
                f"this step brings {batch} rows of {seq} tokens"
            )
        if attention_mask is None:
            kv_valid = None
            position_ids = torch.arange(past, past + seq, device=inputs_embeds.device).expand(batch, seq)
        else:
            if attention_mask.shape != (batch, past + seq):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new) = "
                    f"({batch}, {past + seq})"
                )
            kv_valid = attention_mask.bool()
            # A padding slot gets position 0 (it is masked out anyway); real tokens count from 0.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (batch, seq)

        cos, sin = ops.rope_cos_sin(self.inv_freq, position_ids, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():  # keep each layer's input only
                x = checkpoint(layer, x, cos, sin, kv_valid, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, kv_valid, cache)
        if cache is not None:
            cache.length += seq
        return self.norm(x)

    def rope_table(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (length, head_dim) of positions 0 .. length - 1, for decode steps to index."""
        positions = torch.arange(length, device=self.inv_freq.device)[None]  # (1, length)
        cos, sin = ops.rope_cos_sin(self.inv_freq, positions, dtype)
        return cos[0], sin[0]

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        slot: torch.Tensor,
        kv_valid: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
    ) -> torch.Tensor:
        """One token per row on the fast path: inputs_embeds (batch, 1, hidden) -> hidden (batch, 1, hidden).

        positions (batch, 1): each row's RoPE position (real tokens before it); slot (1,): the cache
        slot to write, as a device tensor; kv_valid (batch, max_len) or None: which slots hold real
        tokens; rope: `rope_table(max_len)`. Nothing here reads a host value that changes from step
        to step, and no shape depends on the step, so one compiled graph serves every step. The
        caller advances positions, slot and cache.length.
        """
        cos, sin = rope[0][positions], rope[1][positions]  # (batch, 1, head_dim)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, kv_valid, cache, slot)
        return self.norm(x)


class DecoderLM(ops.ModelWithPath):
    """A text-only checkpoint (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM): ids -> logits."""

    def __init__(self, config: TextConfig, kernels: str | bool | None = None):
        """kernels: "auto", "on" (True) or "off" (False); None reads MINIVLM_KERNELS (ops.kernels_choice)."""
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        self.lm_head = ops.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.kernels = kernels  # the choice, made once here; ModelWithPath hands it to every module

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache on the model's device and in its dtype."""
        weight = self.model.embed_tokens.weight  # never quantized: the model's dtype and device
        return KVCache(self.config, batch_size, max_len, weight.dtype, weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """input_ids (batch, seq) -> logits (batch, seq, vocab); only the last `logits_to_keep` if > 0.
        check_ids: refuse bad ids and masks first (check_inputs); generation's decode steps skip it."""
        if check_ids:
            check_inputs(input_ids, attention_mask, self.config.vocab_size)
        hidden = self.model(self.model.embed_tokens(input_ids), attention_mask, cache)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, seq) -> the last hidden states (batch, seq, hidden), before `lm_head`
        (training's loss takes the logits of the labelled positions only)."""
        check_inputs(input_ids, attention_mask, self.config.vocab_size)
        return self.model(self.model.embed_tokens(input_ids), attention_mask)

    def decode_step(
        self,
        token: torch.Tensor,
        positions: torch.Tensor,
        slot: torch.Tensor,
        kv_valid: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache,
    ) -> torch.Tensor:
        """The fast path's decode step (TextModel.decode): token (batch,) -> next logits (batch, vocab).
        The function `torch.compile` wraps (generation's `compile=True`)."""
        hidden = self.model.decode(self.model.embed_tokens(token[:, None]), positions, slot, kv_valid, rope, cache)
        return self.lm_head(hidden[:, -1])
