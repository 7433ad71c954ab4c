"""The public surface end to end, as the README shows it: one checkpoint folder (weights, tokenizer,
processor settings, chat template), minivlm's processor and model against transformers' processor
and model on the same folder."""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

import minivlm
from minivlm.bench.tiny.models import randomize_, save_checkpoint
from minivlm.bench.tiny.processors import TEMPLATE
from minivlm.bench.tiny.vocab import train_bpe


def interleave_checkpoint(folder) -> transformers.LlavaForConditionalGeneration:
    """A complete tiny LLaVA-Interleave checkpoint folder (weights in the hub layout, tokenizer,
    processor settings, chat template, generation config); returns transformers' model of it."""
    train_bpe("qwen2", folder)  # tokenizer.json with <image> among its special tokens
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.pad_token = "<|endoftext|>"
    processor = transformers.LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 42, "width": 42}),
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=TEMPLATE,
    )
    processor.save_pretrained(folder)
    config = transformers.LlavaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=144,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=42,
            patch_size=14,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tok),
            hidden_size=128,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(0)
    hf_model = randomize_(transformers.LlavaForConditionalGeneration(config)).eval()
    save_checkpoint(hf_model, folder, layout="hub")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos}))
    return hf_model


def test_interleave_checkpoint_from_files_to_logits(tmp_path):
    hf_model = interleave_checkpoint(tmp_path)
    config = hf_model.config
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}, {"type": "image"}]}
    ]
    images = [
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (50 + 9 * i, 70, 3), dtype=np.uint8))
        for i in range(2)
    ]

    ours_processor = minivlm.load_processor(tmp_path)
    model = minivlm.load_model(tmp_path)
    prompt = ours_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = ours_processor(text=prompt, images=images)
    hf_processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    hf_inputs = hf_processor(
        text=hf_processor.apply_chat_template(messages, add_generation_prompt=True), images=images, return_tensors="pt"
    )
    with torch.no_grad():
        ours = model(**inputs)
        theirs = hf_model(**hf_inputs).logits
    assert torch.equal(inputs["input_ids"], hf_inputs["input_ids"])
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 2 * 9  # 3 x 3 patches per image
