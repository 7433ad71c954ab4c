"""transformers' processors of each family, as the tiny checkpoints save them: the image processor
with the family's real sizes, the processor settings (patch size, CLS handling, tokens per tile)
and a plain chat template."""

from __future__ import annotations

import transformers
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

CLIP_336 = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for p in m['content'] %}{% if p['type'] == 'image' %}"
    "<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# name -> a transformers processor around a tokenizer, as the checkpoints of each family save it
PROCESSORS = {
    "llava15": lambda tok: transformers.LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**CLIP_336), tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=TEMPLATE),
    "clip_full": lambda tok: transformers.LlavaProcessor(  # CLS kept: 577 tokens, the count terms do not cancel
        image_processor=CLIPImageProcessorPil(**CLIP_336), tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="full", num_additional_image_tokens=1, chat_template=TEMPLATE),
    "interleave": lambda tok: transformers.LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": 384, "width": 384}), tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="full", num_additional_image_tokens=0, chat_template=TEMPLATE),
    "next": lambda tok: transformers.LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(**CLIP_336), tokenizer=tok, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=TEMPLATE),
    "idefics3": lambda tok: transformers.Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": 728}), tokenizer=tok, image_seq_len=169,
        chat_template=TEMPLATE),
}  # fmt: skip
