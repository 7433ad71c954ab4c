"""The families' processors: how each reads its image settings, which tiling it uses, and what its
prompts need. Each is named by its family's row of load.FAMILIES; a new family, or a variant, is
a subclass here (or anywhere) and a row there.
"""

from __future__ import annotations

from pathlib import Path

from .files import read_json
from .geometry import SliceConfig
from .pixels import ImageConfig
from .processor import Processor, ProcessorError, joined_content


class LlavaProcessor(Processor):
    """LLaVA-1.5 and LLaVA-Interleave: one view per image; Interleave reads videos as frames."""

    family, hf_name, tiling, videos = "llava", "LlavaProcessor", "one_view", True


class LlavaNextProcessor(Processor):
    """LLaVA-NeXT: anyres tiles."""

    family, hf_name, tiling = "llava_next", "LlavaNextProcessor", "anyres"


class Idefics3Processor(Processor):
    """Idefics3 / SmolVLM: split into tiles plus a global image, with row/col markers."""

    family, hf_name, tiling = "idefics3", "Idefics3Processor", "idefics3"
    rows_first = True


class Llama3VProcessor(Processor):
    """llama3v: LLaVA-UHD slices, each `query_num` placeholders between <image> and </image>."""

    family, tiling = "llama3v", "llama3v_slices"

    @classmethod
    def image_settings(cls, folder: Path, settings: dict) -> tuple[ImageConfig, SliceConfig]:
        return _llama3v_settings(read_json(folder / "config.json", ProcessorError), folder)

    def needed_tokens(self) -> list[str]:
        return ["</image>", "<slice>", "</slice>", self.unk_token]

    def chat_messages(self, messages: list[dict]) -> list[dict]:
        return [joined_content(m, self.tokens.image_token) for m in messages]


def _llama3v_settings(config: dict, folder: Path) -> tuple[ImageConfig, SliceConfig]:
    """llama3v ships no preprocessor_config.json: MiniCPM-V normalises with mean = std = 0.5 after
    scaling to [0, 1], resizes with bicubic, and takes the slicing settings from config.json."""
    image_config = ImageConfig(processor_type="llama3v", resample=3, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    try:
        slicing = SliceConfig(
            scale_resolution=int(config.get("image_size", 448)),
            patch_size=int(config.get("patch_size", 14)),
            max_slices=int(config.get("max_slice_nums", 9)),
            query_num=int(config.get("query_num", 96)),
            slice_mode=bool(config.get("slice_mode", True)),
        )
    except (TypeError, ValueError):
        raise ProcessorError(
            f"{folder / 'config.json'}: image_size, patch_size, max_slice_nums and query_num must be integers"
        ) from None
    if min(slicing.scale_resolution, slicing.patch_size, slicing.max_slices, slicing.query_num) < 1:
        raise ProcessorError(
            f"{folder / 'config.json'}: image_size, patch_size, max_slice_nums and query_num must be positive"
        )
    return image_config, slicing
