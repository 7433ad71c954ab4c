"""A tiny llama3v (MiniCPM-Llama3-V 2.5 layout) checkpoint, which transformers has no class for,
built from reference parts written with other code: transformers' Idefics2VisionTransformer for
the NaViT tower, a resampler from torch.nn.MultiheadAttention and torch.nn.LayerNorm with
MiniCPM-V's 2D sin-cos position table written here in numpy, and transformers' LlamaForCausalLM.
`llama3v_checkpoint` saves their weights in the hub repository's layout and returns the parts
composed (`ReferenceLlama3V`), which the tests compare minivlm's model against.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers
from torch import nn
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig, Idefics2VisionTransformer

from .models import randomize_, save_sharded
from .vocab import train_bpe

# The tower's head_dim is so400m's 72; the resampler's heads are MiniCPM-V's 128 wide.
VISION = dict(
    hidden_size=144, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2, image_size=70, patch_size=14
)
TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)  # llama3v's own template
QUERIES = 4


def hf_tower(seed: int = 0, vision: dict = VISION) -> Idefics2VisionTransformer:
    torch.manual_seed(seed)
    config = Idefics2VisionConfig(**vision)
    config._attn_implementation = "eager"
    return randomize_(Idefics2VisionTransformer(config)).eval()


def minicpm_pos_embed(dim: int, height: int, width: int) -> np.ndarray:
    """MiniCPM-V's 2D sin-cos table (height, width, dim), written from its definition: a meshgrid
    with the column coordinate first; half the channels for each coordinate, [sin, cos] of
    pos * 10000^(-k / (dim/4))."""
    grid = np.stack(np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)))

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=-1)


class ReferenceResampler(nn.Module):
    """MiniCPM-Llama3-V 2.5's resampler from torch's own modules: sequence-first MultiheadAttention
    over each slice's patches in row-major order, padded with a key padding mask."""

    def __init__(self, num_queries: int, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.proj = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, slices: list[torch.Tensor], sizes: list[tuple[int, int]]) -> torch.Tensor:
        """slices: each (h*w, kv_dim) row-major; sizes: each (h, w) -> (n, num_queries, dim)."""
        dim = self.query.shape[1]
        x = nn.utils.rnn.pad_sequence(slices, batch_first=True)  # (n, longest, kv_dim)
        pos = [torch.from_numpy(minicpm_pos_embed(dim, h, w)).reshape(h * w, dim) for h, w in sizes]
        pos = nn.utils.rnn.pad_sequence(pos, batch_first=True).permute(1, 0, 2)  # (longest, n, dim)
        padding = torch.tensor([[j >= h * w for j in range(x.shape[1])] for h, w in sizes])
        kv = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # (longest, n, dim)
        q = self.ln_q(self.query)[:, None].repeat(1, len(slices), 1)  # (queries, n, dim)
        out = self.attn(q, kv + pos, kv, key_padding_mask=padding)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


def reference_resampler(num_queries: int, dim: int, heads: int, kv_dim: int, seed: int = 0) -> ReferenceResampler:
    torch.manual_seed(seed)
    return randomize_(ReferenceResampler(num_queries, dim, heads, kv_dim)).eval()


class ReferenceLlama3V:
    """llama3v composed from its references: transformers' Idefics2 tower on each slice alone,
    the MultiheadAttention resampler, transformers' LlamaForCausalLM on embeddings whose <unk>
    positions hold the slices' features in order."""

    def __init__(self, tower, resampler, llm, unk_id: int):
        self.tower, self.resampler, self.llm, self.unk_id = tower, resampler, llm, unk_id

    def embeds(self, input_ids, pixel_values, pixel_attention_mask):
        slices, sizes = [], []
        for pixels, mask in zip(pixel_values, pixel_attention_mask):
            h, w = int(mask[:, 0].sum()) // 14, int(mask[0].sum()) // 14
            slices.append(self.tower(pixels[None, :, : h * 14, : w * 14]).last_hidden_state[0])
            sizes.append((h, w))
        features = self.resampler(slices, sizes).flatten(0, 1)  # (slices * queries, hidden)
        embeds = self.llm.get_input_embeddings()(input_ids).clone()
        embeds[input_ids == self.unk_id] = features
        return embeds


def llama3v_checkpoint(folder, image_size: int = 56, vision: dict = VISION, queries: int = QUERIES) -> ReferenceLlama3V:
    """A complete tiny llama3v checkpoint folder, in the hub repository's layout (llm./vison./projection.
    keys in two shards with an index, top-level Llama fields in config.json, tokenizer with <unk>,
    <image>, <slice> and the llama3v chat template); returns the reference model of it.

    image_size is the slices' size (448 on the hub), vision the tower's config, queries the
    resampler's query count (96 on the hub)."""
    train_bpe("llama3v", folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(chat_template=TEMPLATE, pad_token="!")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|end_of_text|>"),
    )
    torch.manual_seed(0)
    llm = randomize_(transformers.LlamaForCausalLM(text)).eval()
    tower = hf_tower(seed=1, vision=vision)
    resampler = reference_resampler(queries, 256, 2, vision["hidden_size"], seed=2)
    tensors = {f"llm.{k}": v for k, v in llm.state_dict().items()}
    tensors.update({f"vison.{k}": v for k, v in tower.state_dict().items()})
    tensors.update({f"projection.{k}": v for k, v in resampler.state_dict().items()})
    save_sharded(folder, tensors, shards=2)
    unk = tok.convert_tokens_to_ids("<unk>")
    config = {
        "model_type": "llama3v",
        "architectures": ["Llama3v"],
        "hidden_size": 256,
        "intermediate_size": 320,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "vocab_size": len(tok),
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "query_num": queries,
        "image_size": image_size,
        "patch_size": 14,
        "slice_mode": True,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": text.eos_token_id,
        # The tiny tower and the tiny vocabulary's <unk>; the real checkpoint relies on the defaults.
        "vision_config": vision,
        "image_token_id": unk,
    }
    (folder / "config.json").write_text(json.dumps(config))
    eos = [text.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return ReferenceLlama3V(tower, resampler, llm, unk)
