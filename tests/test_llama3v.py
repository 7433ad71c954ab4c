"""llama3v (the MiniCPM-Llama3-V 2.5 layout), which transformers has no class for. Each part is
checked against a reference built from other code: the NaViT vision tower against transformers'
Idefics2VisionTransformer, the resampler against torch.nn.MultiheadAttention and torch.nn.LayerNorm
with position embeddings written here in numpy from MiniCPM-V's definition, the slicing against
grids and sizes worked out by hand, and the whole model against those references composed with
transformers' LlamaForCausalLM."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

import minivlm
from minivlm.bench.tiny.llama3v import (
    QUERIES,
    VISION,
    ReferenceLlama3V,
    hf_tower,
    llama3v_checkpoint,
    minicpm_pos_embed,
    reference_resampler,
)
from minivlm.config import ConnectorConfig, VisionConfig
from minivlm.connector import Resampler
from minivlm.processing.geometry import SliceConfig, llama3v_placeholder, slice_sizes
from minivlm.vision import VisionTower


def our_tower(hf: Idefics2VisionTransformer) -> VisionTower:
    tower = VisionTower(VisionConfig.from_hf({"model_type": "idefics3_vision", **VISION}))
    tower.load_state_dict(hf.state_dict())
    return tower.eval()


# ---------------------------------------------------------------------------------------------
# The vision tower


def test_navit_tower_equals_idefics2_with_masks_and_sizes():
    """Slices of different sizes padded onto one canvas with a patch mask, as the llama3v model
    runs them: each equals transformers' tower on that slice alone and on the padded batch."""
    hf = hf_tower()
    ours = our_tower(hf)
    sizes = [(3, 7), (6, 4), (2, 2), (5, 5), (1, 9)]  # patches (rows, cols): smaller and larger than the 5x5 grid
    g = torch.Generator().manual_seed(1)
    rows, cols = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = torch.zeros(len(sizes), 3, rows * 14, cols * 14)
    mask = torch.zeros(len(sizes), rows, cols, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, : h * 14, : w * 14] = torch.randn(3, h * 14, w * 14, generator=g)
        mask[i, :h, :w] = True
    with torch.no_grad():
        batch = ours(pixels, mask)
        theirs_batch = hf(pixels, patch_attention_mask=mask).last_hidden_state
        for i, (h, w) in enumerate(sizes):
            alone = hf(pixels[i : i + 1, :, : h * 14, : w * 14]).last_hidden_state[0]  # (h*w, d)
            got = batch[i].view(rows, cols, -1)[:h, :w].reshape(h * w, -1)
            assert (got - alone).abs().max() < 1e-4, (h, w)  # fp32; only the summation order differs
        real = mask.view(len(sizes), -1)
        assert (batch[real] - theirs_batch[real]).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# The resampler


def test_sincos_table_equals_minicpm_definition():
    from minivlm.connector import sincos_2d

    for dim, h, w in [(256, 5, 7), (4096, 32, 32), (4096, 70, 70)]:
        ref = torch.from_numpy(minicpm_pos_embed(dim, h, w))
        assert (sincos_2d(h, w, dim) - ref).abs().max() < 2e-4 * max(h, w)  # float32 angles up to ~70 rad


@pytest.mark.parametrize("kv_dim", [144, 256])  # kv_proj a Linear, or (widths equal) the identity
def test_resampler_equals_multihead_attention_reference(kv_dim):
    ref = reference_resampler(num_queries=6, dim=256, heads=2, kv_dim=kv_dim)
    ours = Resampler(ConnectorConfig("resampler", kv_dim, 256, num_queries=6, num_heads=2)).eval()
    state = ref.state_dict()
    if kv_dim == 256:
        state = {k: v for k, v in state.items() if k != "kv_proj.weight"}
        ref.kv_proj = nn.Identity()
    ours.load_state_dict(state)
    sizes = [(3, 7), (6, 4), (2, 2), (5, 5)]
    g = torch.Generator().manual_seed(2)
    slices = [torch.randn(h * w, kv_dim, generator=g) for h, w in sizes]
    rows, cols = max(h for h, _ in sizes), max(w for _, w in sizes)
    canvas = torch.zeros(len(sizes), rows, cols, kv_dim)  # as the tower lays slices out: top-left, zero elsewhere
    mask = torch.zeros(len(sizes), rows, cols, dtype=torch.bool)
    for i, ((h, w), s) in enumerate(zip(sizes, slices)):
        canvas[i, :h, :w] = s.view(h, w, kv_dim)
        mask[i, :h, :w] = True
    with torch.no_grad():
        theirs = ref(slices, sizes)
        got = ours(canvas.view(len(sizes), rows * cols, kv_dim), mask)
    assert got.shape == (len(sizes), 6, 256)
    assert (got - theirs).abs().max() / theirs.abs().max() < 1e-5  # fp32


# ---------------------------------------------------------------------------------------------
# Slicing: each expectation below is worked out by hand from MiniCPM-V's slice_image
# (scale 448, patch 14, at most 9 slices); the comments show the arithmetic.


SLICING = [
    # (width, height) -> (overview (w, h), grid (cols, rows) or None, slice (w, h) or None)
    # 448x448: area ratio 1 -> one slice: not sliced; scaled to 448 (already a multiple of 14).
    ((448, 448), (448, 448), None, None),
    # 100x50: ratio 0.06, not sliced but scaled up: h = int(448/sqrt 2) = 316, w = 632; to 14s: 630 x 322.
    ((100, 50), (630, 322), None, None),
    # 1000x500: ratio 2.49 -> 3; grids of 2, 3, 4 slices; log aspect ln 2 fits (2, 1) exactly.
    # Overview: 316 x 632 as above -> 630 x 322. Cells 500x500 scaled up to 448x448.
    ((1000, 500), (630, 322), (2, 1), (448, 448)),
    # 500x1000: the transpose: h = int(448/sqrt .5) = 633, w = int(316.5) = 316 -> 322 x 630; grid (1, 2).
    ((500, 1000), (322, 630), (1, 2), (448, 448)),
    # 1920x1000: ratio 9.57 -> capped at 9; grids of 8 and 9; ln 1.92 = .652 nearest ln 2 -> (4, 2).
    # Overview: h = int(448/1.3856) = 323, w = int(620.16) = 620 -> 616 x 322.
    # Cells 480x500: h = int(448/sqrt .96) = 457, w = int(438.7) = 438 -> 434 x 462.
    ((1920, 1000), (616, 322), (4, 2), (434, 462)),
    # 900x300: ratio 1.35 -> 2; grids of 2 and 3; ln 3 fits (3, 1). Overview: h = int(448/sqrt 3) = 258,
    # w = 774 -> 770 x 252. Cells 300x300 -> 448x448.
    ((900, 300), (770, 252), (3, 1), (448, 448)),
    # 4000x200: ratio 3.99 -> 4; grids of 3, 4, 5; ln 20 nearest ln 5 -> (5, 1). Overview: h = int(100.17) = 100,
    # w = 2000 -> 2002 x 98. Cells 800x200: h = int(448/2) = 224, w = 896 -> 896 x 224.
    ((4000, 200), (2002, 98), (5, 1), (896, 224)),
    # 1100x1100: ratio 6.03 -> 7; grids of 6, 7, 8; a square ties (2, 3) with (3, 2) on paper, but in
    # float64 |ln(2/3)| = .40546510810816444 > ln(3/2) = .4054651081081644, so (3, 2) wins.
    # Overview 448x448. Cells: width 1100 -> 1101 / 3 = 367, height 550; h = int(448/sqrt(.66727)) = 548,
    # w = int(365.67) = 365 -> 364 x 546.
    ((1100, 1100), (448, 448), (3, 2), (364, 546)),
    # 497x459: ratio 1.14 -> 2; grids of 2 and 3; ln 1.083 = .080 nearest ln 2 -> (2, 1). Overview:
    # h = int(448/1.0406) = 430, w = int(465.6) = 465 -> 462 x 434. Cells: width 497 -> round(248.5) = 248
    # (halves to even) * 2 = 496 / 2 = 248, height 459; h = int(448/sqrt(.5403)) = 609, w = int(329.05) = 329;
    # 329/14 = 23.5 and 609/14 = 43.5 round to even: 24 and 44 -> 336 x 616.
    ((497, 459), (462, 434), (2, 1), (336, 616)),
]


@pytest.mark.parametrize("size, overview, grid, cell", SLICING)
def test_slicing_matches_hand_worked_sizes(size, overview, grid, cell):
    assert slice_sizes(*size, SliceConfig()) == (overview, grid, cell)


def test_slicing_pixels_and_placeholder():
    from minivlm.processing.geometry import llama3v_slices
    from minivlm.processing.pixels import ImageConfig

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1920, 3), dtype=np.uint8))
    config = ImageConfig(processor_type="llama3v", image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    slices, grid = llama3v_slices(image, SliceConfig(), config)
    assert grid == (4, 2)
    assert [s.shape for s in slices] == [(3, 322, 616)] + [(3, 462, 434)] * 8
    # The slices are the image resized to 4 x 2 cells, cut row by row, scaled to [-1, 1].
    refined = np.asarray(image.resize((4 * 434, 2 * 462), Image.Resampling.BICUBIC), dtype=np.float32)
    top_right = refined[:462, 3 * 434 :].transpose(2, 0, 1) / 255 * 2 - 1
    assert np.abs(slices[4] - top_right).max() < 1e-5
    one = "<image>" + "<unk>" * 2 + "</image>"
    assert llama3v_placeholder(None, 2) == one
    assert llama3v_placeholder((2, 1), 2) == one + "<slice>" + one + one + "</slice>"
    assert llama3v_placeholder((1, 3), 2) == one + "<slice>" + one + "\n" + one + "\n" + one + "</slice>"


def test_slice_mode_off_never_slices():
    assert slice_sizes(1920, 1000, SliceConfig(slice_mode=False))[1:] == (None, None)
    assert slice_sizes(1920, 1000, SliceConfig(max_slices=1))[1:] == (None, None)


# ---------------------------------------------------------------------------------------------
# The whole model: a tiny checkpoint in llama3v's key layout against the reference parts


def photo(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3v")
    return folder, llama3v_checkpoint(folder)


def test_checkpoint_runs_end_to_end_as_the_reference(checkpoint):
    folder, ref = checkpoint
    model = minivlm.load_model(folder)
    processor = minivlm.load_processor(folder)
    # A wide photo sliced 2 x 1, a small one not sliced, a tall one 1 x 3 (scale 56: 3136-pixel slices).
    images = [photo(100, 50, 0), photo(40, 30, 1), photo(50, 160, 2)]
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=images)
    slices = 3 + 1 + 4
    assert inputs["pixel_values"].shape[0] == slices
    assert int((inputs["input_ids"] == ref.unk_id).sum()) == slices * QUERIES
    text = processor.decode(inputs["input_ids"][0])
    assert "<slice><image>" in text and "</image>\n<image>" in text  # the tall photo's rows

    with torch.no_grad():
        embeds = ref.embeds(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
        theirs = ref.llm(inputs_embeds=embeds).logits
        ours = model(**inputs)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5  # fp32

    # Greedy decoding: transformers' generate from the reference embeddings, token for token;
    # then with the 6th of those tokens as an end token, which must stop both at its first use.
    expected = reference_greedy(ref, inputs, eos=[])
    assert minivlm.generate(model, **inputs, max_new_tokens=NEW).tolist() == expected.tolist()
    end = int(expected[0, 5])
    stopped = reference_greedy(ref, inputs, eos=[end])
    assert stopped.shape[1] <= 6 and stopped[0, -1] == end
    assert minivlm.generate(model, **inputs, max_new_tokens=NEW, stop=[end]).tolist() == stopped.tolist()


NEW = 12


def reference_greedy(ref: ReferenceLlama3V, inputs: dict, eos: list[int]) -> torch.Tensor:
    with torch.no_grad():
        embeds = ref.embeds(inputs["input_ids"], inputs["pixel_values"], inputs["pixel_attention_mask"])
        return ref.llm.generate(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )


def test_batch_rows_equal_each_row_alone(checkpoint):
    """Two prompts of different lengths and image counts, left-padded: each row's answer is the
    one it gets alone. llama3v's tokenizer_config pads on the right, which generation refuses."""
    folder, ref = checkpoint
    model, processor = minivlm.load_model(folder), minivlm.load_processor(folder)
    prompts = ["<image>What is it?", "<image> and <image>: which one is larger, and why?"]
    images = [[photo(120, 40, 3)], [photo(30, 30, 4), photo(60, 130, 5)]]
    batch = processor(text=prompts, images=[i for group in images for i in group], padding_side="left")
    rows = minivlm.generate(model, **batch, max_new_tokens=NEW)
    for i, (prompt, group) in enumerate(zip(prompts, images)):
        alone = processor(text=prompt, images=group)
        expected = minivlm.generate(model, **alone, max_new_tokens=NEW)
        assert rows[i, : expected.shape[1]].tolist() == expected[0].tolist()
        assert expected.tolist() == reference_greedy(ref, alone, eos=[]).tolist()
    right = processor(text=prompts, images=[i for group in images for i in group])  # the checkpoint's side
    with pytest.raises(minivlm.GenerationError, match="padded on the right"):
        minivlm.generate(model, **right, max_new_tokens=NEW)


def test_cli_generate_prints_the_reference_answer(checkpoint, capsys, tmp_path):
    from minivlm.__main__ import main

    folder, ref = checkpoint
    path = tmp_path / "photo.png"
    photo(90, 60, 6).save(path)
    assert (
        main(
            [
                "generate",
                "--model",
                str(folder),
                "--image",
                str(path),
                "--prompt",
                "What is in it?",
                "--max-new-tokens",
                str(NEW),
            ]
        )
        == 0
    )
    out, _ = capsys.readouterr()
    processor = minivlm.load_processor(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in it?"}]}]
    inputs = processor(
        text=processor.apply_chat_template(messages, add_generation_prompt=True), images=[Image.open(path)]
    )
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    expected = reference_greedy(ref, inputs, eos=eos)[0].tolist()
    assert out == processor.decode(expected, skip_special_tokens=True) + "\n"


def test_chat_template_joins_image_and_text_as_minicpm(checkpoint):
    """MiniCPM-V joins a message's image placeholders and text with newlines into one string."""
    folder, _ = checkpoint
    processor = minivlm.load_processor(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  Hi there "}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\n  Hi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_bad_inputs_name_the_problem(checkpoint):
    folder, _ = checkpoint
    model, processor = minivlm.load_model(folder), minivlm.load_processor(folder)
    with pytest.raises(minivlm.ProcessorError, match="2 <image> tokens"):
        processor(text="<image><image>", images=[photo(50, 50, 0)])
    inputs = processor(text="<image>x", images=[photo(100, 50, 0)])  # 3 slices
    with pytest.raises(ValueError, match="image tokens"):
        model(
            inputs["input_ids"][:, : -QUERIES - 3],
            pixel_values=inputs["pixel_values"],
            pixel_attention_mask=inputs["pixel_attention_mask"],
        )
    with pytest.raises(ValueError, match="multiples of 14"):
        model(inputs["input_ids"], pixel_values=inputs["pixel_values"][..., :-1])
    config = json.loads((folder / "config.json").read_text())
    broken = folder.parent / "broken_llama3v"
    shutil.copytree(folder, broken, dirs_exist_ok=True)
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": 200}))
    with pytest.raises(minivlm.ConfigError, match="multiple of 128"):
        minivlm.load_model(broken)


# The hub checkpoint's own facts (mustafaaljadery/llama3v): its config.json, some of its keys, and
# the total_size its model.safetensors.index.json records (float32 bytes).
HUB_CONFIG = {
    "attention_bias": False,
    "query_num": 96,
    "rms_norm_eps": 1e-5,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "slice_mode": True,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_size": 448,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama3v",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "patch_size": 14,
    "vocab_size": 128256,
}
HUB_KEYS = [
    "llm.lm_head.weight",
    "llm.model.embed_tokens.weight",
    "llm.model.norm.weight",
    "llm.model.layers.31.self_attn.k_proj.weight",
    "projection.attn.in_proj_bias",
    "projection.attn.in_proj_weight",
    "projection.attn.out_proj.weight",
    "projection.kv_proj.weight",
    "projection.ln_kv.bias",
    "projection.proj",
    "projection.query",
    "vison.embeddings.patch_embedding.bias",
    "vison.embeddings.position_embedding.weight",
    "vison.encoder.layers.26.self_attn.out_proj.weight",
    "vison.post_layernorm.weight",
]
HUB_TOTAL_SIZE = 34148369344


def test_hub_config_builds_the_hub_checkpoint_exactly():
    """The defaults llama3v's config.json leaves out (the so400m tower at 980 with 27 layers, the
    resampler's widths) give a model of exactly the checkpoint's size, under its key names."""
    from minivlm.load import config_from_hf
    from minivlm.vlm import Llama3V
    from minivlm.weights import LLAMA3V_KEYS

    config = config_from_hf(HUB_CONFIG)
    with torch.device("meta"):
        model = Llama3V(config)
    state = model.state_dict()
    assert sum(t.numel() for t in state.values()) * 4 == HUB_TOTAL_SIZE
    assert all(LLAMA3V_KEYS.model_key(k) in state for k in HUB_KEYS)
    assert config.text.eos_token_id == (128001, 128009) and config.image_token_id == 128002
    assert config.connector.num_heads == 32 and config.connector.num_queries == 96
