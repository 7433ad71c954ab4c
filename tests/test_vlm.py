"""The VLM families against transformers, stage by stage, on tiny random checkpoints in the hub layout.

Each stage is compared on the same inputs: the vision tower's selected features, the connector,
the per-image features after packing (anyres stitching, tiles), the merged input embeddings that
reach the decoder, and the logits.

Tolerances, relative to the largest value:
- fp32: 1e-5 (measured: 0 to 1e-6). The arithmetic is the same op for op.
- bf16: a CPU bf16 matmul rounds differently depending on its input's memory layout, and
  transformers' SigLIP hands the projector a transposed (non-contiguous) tensor where ours is
  contiguous: equal values, results an ulp (2^-8) apart, which the decoder layers grow to about
  1e-2 of the largest logit. So the bf16 test asks three things: that our bf16 logits are no
  further from the fp32 truth than transformers' bf16 logits are (within 1.5x), that the two
  agree within 3e-2, and that the greedy token agrees wherever the top-2 margin exceeds that.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from vlm_inputs import IMAGE_TOKEN, hf_feature_counts, idefics3_pixels, llava_pixels, next_pixels, prompt_with_images

import minivlm
from minivlm.bench.tiny.models import VLM_CONFIGS, build_vlm_model, save_checkpoint

FP32_TOL = 1e-5
BF16_TOL = 3e-2


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


@pytest.fixture(scope="module", params=sorted(VLM_CONFIGS))
def family(request, tmp_path_factory):
    hf = build_vlm_model(request.param)
    folder = save_checkpoint(hf, tmp_path_factory.mktemp(request.param), layout="hub", shards=3)
    return request.param, hf, folder, minivlm.load_model(folder)


def image_inputs(name: str, hf, images: list[int], g: torch.Generator) -> dict:
    """Image inputs for a batch whose rows hold `images[b]` images each (in processor layout)."""
    kind = VLM_CONFIGS[name]["cls"]
    if kind == "LlavaConfig":
        return llava_pixels(hf, sum(images), g)
    if kind == "LlavaNextConfig":
        # Odd sizes and every aspect ratio class: wide, tall, square, very wide, tiny.
        sizes = [(30, 50), (57, 23), (28, 28), (19, 91), (101, 33), (7, 5)]
        return next_pixels(hf, [sizes[i % len(sizes)] for i in range(sum(images))], g)
    size = hf.config.vision_config.image_size
    # Idefics3: tiles that fill the tile, and tiles with padding at the bottom or right.
    shapes = [(size, size), (size - 7, size), (size, size // 2 + 1), (size // 2, size // 3)]
    return idefics3_pixels(hf, [[shapes[(b + i) % 4] for i in range(n)] for b, n in enumerate(images)], g)


def batch(name: str, hf, images: list[int], seed: int = 0):
    """(input_ids (rows, seq) with right-aligned rows, attention_mask, image inputs, per-row prompts)."""
    g = torch.Generator().manual_seed(seed)
    inputs = image_inputs(name, hf, images, g)
    counts = hf_feature_counts(hf, inputs)
    if VLM_CONFIGS[name]["cls"] == "Idefics3Config":  # counts per row: split evenly over the row's tiles
        counts = [c // n for c, n in zip(counts, images) for _ in range(n)]
    rows, start = [], 0
    for b, n in enumerate(images):
        rows.append(prompt_with_images(counts[start : start + n], [3 + b] + [2] * n, g))
        start += n
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    return ids, mask, inputs, rows


def hf_merged_embeddings(hf, **kwargs) -> torch.Tensor:
    """The inputs_embeds that reach transformers' decoder."""
    seen = {}
    decoder = hf.model.text_model if hasattr(hf.model, "text_model") else hf.model.language_model  # Idefics3 : LLaVA

    def capture(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hook = decoder.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            hf(**kwargs)
    finally:
        hook.remove()
    return seen["embeds"]


def test_vision_tower_matches(family):
    name, hf, _, model = family
    ids, mask, inputs, _ = batch(name, hf, [2])
    with torch.no_grad():
        if VLM_CONFIGS[name]["cls"] == "Idefics3Config":
            px = inputs["pixel_values"][0]
            pm = inputs["pixel_attention_mask"][0].bool()
            patch = hf.config.vision_config.patch_size
            patch_mask = pm.unfold(1, patch, patch).unfold(2, patch, patch).sum((-1, -2)) > 0
            theirs = hf.model.vision_model(pixel_values=px, patch_attention_mask=patch_mask).last_hidden_state
            ours = model.vision_tower(px, patch_mask)
        else:
            px = inputs["pixel_values"]
            px = px.flatten(0, 1) if px.dim() == 5 else px
            hidden = hf.model.vision_tower(px, output_hidden_states=True).hidden_states
            layers = hf.config.vision_feature_layer
            layers = [layers] if isinstance(layers, int) else layers
            theirs = torch.cat([hidden[i] for i in layers], dim=-1)
            ours = model.vision_tower(px, layers=model.config.feature_layers)
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < FP32_TOL


def test_connector_matches(family):
    name, hf, _, model = family
    torch.manual_seed(0)
    layers = model.config.feature_layers or (None,)  # Idefics3: the last layer only
    x = torch.randn(3, model.config.vision.grid**2, model.config.vision.hidden_size * len(layers))
    theirs_module = (
        hf.model.connector if VLM_CONFIGS[name]["cls"] == "Idefics3Config" else hf.model.multi_modal_projector
    )
    with torch.no_grad():
        assert rel_err(model.multi_modal_projector(x), theirs_module(x)) < FP32_TOL


@pytest.mark.parametrize("images", [[1], [3], [2, 1]], ids=["one", "three", "batch_2_1"])
def test_image_features_embeddings_and_logits_match(family, images):
    name, hf, _, model = family
    ids, mask, inputs, _ = batch(name, hf, images)
    with torch.no_grad():
        theirs_features = hf.model.get_image_features(**inputs).pooler_output
        ours_features = model.image_features(**inputs)
        if VLM_CONFIGS[name]["cls"] == "Idefics3Config":  # transformers groups them per batch row
            ours_features = [
                torch.cat(ours_features[sum(images[:b]) : sum(images[: b + 1])]) for b in range(len(images))
            ]
        assert [f.shape for f in ours_features] == [f.shape for f in theirs_features]
        for o, t in zip(ours_features, theirs_features):
            assert rel_err(o, t) < FP32_TOL

        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs_embeds = hf_merged_embeddings(hf, input_ids=ids, attention_mask=mask, position_ids=positions, **inputs)
        assert rel_err(model.embed(ids, **inputs), theirs_embeds) < FP32_TOL

        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions, **inputs).logits
        ours = model(ids, attention_mask=mask, **inputs)
    real = mask.bool()
    assert rel_err(ours[real], theirs[real]) < FP32_TOL


def test_prefill_then_decode_with_images_matches_full_forward(family):
    name, hf, _, model = family
    ids, mask, inputs, _ = batch(name, hf, [2, 1], seed=1)
    extra = torch.randint(0, IMAGE_TOKEN, (2, 4), generator=torch.Generator().manual_seed(5))
    full_ids = torch.cat([ids, extra], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    with torch.no_grad():
        full = model(full_ids, attention_mask=full_mask, **inputs)
        cache = model.new_cache(batch_size=2, max_len=full_ids.shape[1])
        steps = [model(ids, attention_mask=mask, cache=cache, **inputs)]
        for t in range(extra.shape[1]):
            width = ids.shape[1] + t + 1
            steps.append(model(extra[:, t : t + 1], attention_mask=full_mask[:, :width], cache=cache))
    stitched = torch.cat(steps, dim=1)
    real = full_mask.bool()
    assert rel_err(stitched[real], full[real]) < FP32_TOL


def test_left_padded_batch_with_different_image_counts_matches_rows_alone(family):
    name, hf, _, model = family
    images = [1, 3, 2]
    ids, mask, inputs, rows = batch(name, hf, images, seed=2)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, **inputs)
        for b, row in enumerate(rows):
            # The same row alone, with only its own images.
            _, _, own, _ = batch(name, hf, images, seed=2)
            own = select_images(name, own, images, b)
            alone = model(row[None], **own)[0]
            theirs = hf(input_ids=row[None], **own).logits[0]
            assert rel_err(batched[b, ids.shape[1] - len(row) :], alone) < FP32_TOL, f"row {b}"
            assert rel_err(alone, theirs) < FP32_TOL, f"row {b}"


def select_images(name: str, inputs: dict, images: list[int], b: int) -> dict:
    """The image inputs of batch row b alone."""
    start, stop = sum(images[:b]), sum(images[: b + 1])
    kind = VLM_CONFIGS[name]["cls"]
    if kind == "LlavaConfig":
        return {"pixel_values": inputs["pixel_values"][start:stop]}
    if kind == "LlavaNextConfig":
        return {"pixel_values": inputs["pixel_values"][start:stop], "image_sizes": inputs["image_sizes"][start:stop]}
    n = images[b]
    return {
        "pixel_values": inputs["pixel_values"][b : b + 1, :n],
        "pixel_attention_mask": inputs["pixel_attention_mask"][b : b + 1, :n],
    }


def test_bf16_stays_close_to_transformers_bf16(family, tmp_path):
    name, hf, folder, _ = family
    v5 = save_checkpoint(hf, tmp_path, layout="v5")
    theirs_model = transformers.AutoModelForImageTextToText.from_pretrained(
        v5, dtype=torch.bfloat16, attn_implementation="eager"
    )
    model = minivlm.load_model(folder, dtype="bfloat16")
    ids, mask, inputs, _ = batch(name, hf, [2, 1], seed=3)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        truth = hf(input_ids=ids, attention_mask=mask, position_ids=positions, **inputs).logits  # fp32
        theirs = theirs_model(input_ids=ids, attention_mask=mask, position_ids=positions, **inputs).logits.float()
        ours = model(ids, attention_mask=mask, **inputs).float()
    real = mask.bool()
    ours, theirs, truth = ours[real], theirs[real], truth[real]
    assert rel_err(ours, truth) <= 1.5 * rel_err(theirs, truth), "our bf16 strays further from fp32 than theirs"
    assert rel_err(ours, theirs) < BF16_TOL
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > BF16_TOL * theirs.abs().max()
    assert clear.any(), "the greedy check would be vacuous"
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


@pytest.mark.parametrize(
    "vision",
    [
        dict(model_type="siglip_vision_model", hidden_size=144, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=2, image_size=378, patch_size=14),  # 27 x 27 = 729 patches, head_dim 72
        dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=160, num_hidden_layers=2,
             num_attention_heads=2, image_size=336, patch_size=14),  # 24 x 24 + CLS = 577, head_dim 64
    ],
    ids=["siglip_729", "clip_577"],
)  # fmt: skip
def test_real_token_counts(vision, tmp_path):
    """The real towers' sequence lengths and head dims (not block multiples), end to end."""
    text = dict(TEXT_CONFIGS_FOR_REAL)
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=transformers.Qwen2Config(**text).to_dict(),
        image_token_index=200,
        vision_feature_layer=-1 if vision["model_type"].startswith("siglip") else -2,
        vision_feature_select_strategy="full" if vision["model_type"].startswith("siglip") else "default",
    )
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    model = minivlm.load_model(save_checkpoint(hf, tmp_path, layout="hub"))
    g = torch.Generator().manual_seed(0)
    inputs = llava_pixels(hf, 1, g)
    ids = prompt_with_images(hf_feature_counts(hf, inputs), [3, 4], g)[None]
    assert int((ids == IMAGE_TOKEN).sum()) == 729 if vision["image_size"] == 378 else 576
    with torch.no_grad():
        assert rel_err(model(ids, **inputs), hf(input_ids=ids, **inputs).logits) < FP32_TOL


TEXT_CONFIGS_FOR_REAL = dict(
    vocab_size=211,
    hidden_size=128,
    intermediate_size=160,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)
