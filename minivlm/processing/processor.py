"""The processor: chat messages and images in, the model's inputs out, as transformers' processors
produce them (same keys, same values): the prompt with each image token expanded to the number of
features its image gives, tokenized and padded, and the pixels of every image.

    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image])   # input_ids, attention_mask, pixel_values, ...
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..config import ConnectorConfig
from ..connector import ConnectorError
from .chat import ChatTemplateError, check_prompt_length, find_chat_template, render
from .files import read_json
from .geometry import SliceConfig
from .image import ImageError, load_image, load_video_frames, pixel_limit
from .pixels import ImageConfig
from .tiling import ImageTokens, build_tiling
from .tokenizer import Tokenizer, load_tokenizer

VIDEO_TOKEN = "<video>"  # stands for a video's frames in a LLaVA-Interleave prompt


class ProcessorError(ValueError):
    """Inputs the processor cannot turn into model inputs; the message says which and why."""


def _count_error(token: str, per_text: list[int], given: int, what: str) -> ProcessorError:
    """The prompts hold per_text[i] `token`s each, and `given` images or videos came with them."""
    prompts = "prompts have" if len(per_text) > 1 else "prompt has"
    return ProcessorError(
        f"the {prompts} {sum(per_text)} {token} tokens ({', '.join(map(str, per_text))}) but {given} {what}s "
        f"were given; give one {what} per {token}"
    )


class Processor:
    """A text-only checkpoint's processor. Each family is a subclass (family_processors.py) that
    says how its settings are read and names its tiling; its row of load.FAMILIES names it."""

    family: str | None = None  # the family's name in messages; None: text-only, no images
    hf_name: str | None = None  # transformers' processor_class, which a processor saved alone names
    tiling: str | None = None  # a row of tiling.TILINGS; an instance may name another
    videos = False  # whether a <video> may stand in a prompt (as its frames)
    rows_first = False  # pixel inputs are (batch rows, images, ...) (Idefics3), not (images, ...)

    def __init__(
        self,
        tokenizer: Tokenizer,
        tokenizer_config: dict,
        chat_template: str | None,
        image_config: ImageConfig | None,
        tokens: ImageTokens,
        slicing: SliceConfig | None = None,
    ):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.image_config, self.tokens, self.slicing = image_config, tokens, slicing
        self.special_tokens = self.special_tokens_of(tokenizer_config)
        self.padding_side = tokenizer_config.get("padding_side", tokenizer.padding_side)
        # The most pixels one image may hold, decoded or resized; None: $MINIVLM_MAX_IMAGE_PIXELS,
        # else image.MAX_PIXELS. A prompt's length is bounded by $MINIVLM_MAX_PROMPT_CHARS (chat.py).
        self.max_image_pixels: int | None = None
        # The model's connector, when it is not the family's own: a connector that merges patches
        # (model.config.connector after a swap) changes each view's token count. None: as the hub's.
        self.connector: ConnectorConfig | None = None

    @classmethod
    def load(cls, folder: Path) -> "Processor":
        """This class's processor of a checkpoint folder (load.load_processor picks the class)."""
        folder = Path(folder)
        tokenizer = load_tokenizer(folder)
        tokenizer_config = read_json(folder / "tokenizer_config.json", ProcessorError)
        settings = read_json(folder / "processor_config.json", ProcessorError)
        image_config, slicing = cls.image_settings(folder, settings)
        tokens = ImageTokens(
            image_token=settings.get("image_token", "<image>"),
            patch_size=int(settings.get("patch_size") or 14),
            num_additional_image_tokens=int(settings.get("num_additional_image_tokens") or 0),
            drop_cls=settings.get("vision_feature_select_strategy", "default") == "default",
            image_seq_len=int(settings.get("image_seq_len") or 169),
            unk_token=Processor.special_tokens_of(tokenizer_config).get("unk_token", "<unk>"),
        )
        processor = cls(tokenizer, tokenizer_config, find_chat_template(folder), image_config, tokens, slicing)
        if cls.tiling is not None and tokens.image_token not in tokenizer.token_to_id:
            raise ProcessorError(f"{folder}: the tokenizer has no {tokens.image_token!r} token")
        missing = [t for t in processor.needed_tokens() if t not in tokenizer.token_to_id]
        if missing:
            raise ProcessorError(f"{folder}: a {cls.family} tokenizer needs the tokens {missing}, which it lacks")
        return processor

    @classmethod
    def image_settings(cls, folder: Path, settings: dict) -> tuple[ImageConfig | None, SliceConfig | None]:
        """The image processor's settings (none for text) and llama3v's slicing, from the checkpoint's files."""
        if cls.tiling is None:
            return None, None
        # transformers 5 nests the image processor's settings; the hub keeps preprocessor_config.json.
        image_d = settings.get("image_processor") or read_json(folder / "preprocessor_config.json", ProcessorError)
        if not image_d:
            raise ProcessorError(f"{folder}: a {cls.family} checkpoint without preprocessor_config.json")
        return ImageConfig.from_hf(image_d, str(folder / "preprocessor_config.json")), None

    def needed_tokens(self) -> list[str]:
        """The tokens besides the image token that the tokenizer must hold for this family's placeholders."""
        return []

    @staticmethod
    def special_tokens_of(tokenizer_config: dict) -> dict[str, str]:
        return {
            name: (v["content"] if isinstance(v, dict) else v)
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (v := tokenizer_config.get(name)) is not None
        }

    @property
    def unk_token(self) -> str:
        return self.special_tokens.get("unk_token", "<unk>")

    # -- text ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(
                "this checkpoint ships no chat template (chat_template.jinja/.json or tokenizer_config.json)"
            )
        return render(
            self.chat_template,
            self.chat_messages(messages),
            add_generation_prompt,
            **{**self.special_tokens, **variables},
        )

    def chat_messages(self, messages: list[dict]) -> list[dict]:
        """The messages as this family's chat template takes them. A text model's template takes
        each message's content as one string (SmolLM2's, Llama-3's and Qwen2's concatenate it):
        a content list of text parts becomes its parts joined by newlines."""
        if self.family is None:
            return [joined_content(m, self.tokens.image_token) for m in messages]
        return messages

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else ids, skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in rows]

    # -- text and images -> model inputs -------------------------------------------------------

    def __call__(
        self,
        text=None,
        images=None,
        videos=None,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict:
        """text: a prompt or a list of prompts; images: the images of all prompts, in order (paths,
        PIL images, arrays); videos: one per <video> in the prompts, each a list of frames or a
        folder of frame images. Returns input_ids and attention_mask, and the family's pixel inputs."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ProcessorError(f"padding_side {side!r}: expected 'left' or 'right'")
        if return_tensors not in ("pt", None):
            raise ProcessorError(f"return_tensors {return_tensors!r}: expected 'pt' or None")
        expanded, out, _ = self.expand(text, images, videos)
        ids = [self.tokenizer.encode(t, add_special_tokens) for t in expanded]
        out = {**self._pad(ids, side), **out}
        if return_tensors == "pt":
            return {key: torch.as_tensor(np.asarray(v)) for key, v in out.items()}
        return out

    def expand(self, text, images=None, videos=None) -> tuple[list[str], dict, list[str]]:
        """`__call__` before tokenizing: the prompts with each image token replaced by the text its
        image becomes (its tiles' tokens), the family's pixel inputs (unpadded lists), and those
        replacements in order (training's labels find where each turn went through them)."""
        texts = _texts(text)
        images = _flat_images(images, texts, self.tokens.image_token)
        for i, t in enumerate(texts):  # before tokenizing: a runaway prompt costs time and memory there
            check_prompt_length(t, f"prompt {i}", ProcessorError)
        if videos is not None:
            texts, images = self._expand_videos(texts, images, videos)
        token = self.tokens.image_token
        per_text = [t.count(token) for t in texts]
        if self.family is None and images:
            raise ProcessorError("this checkpoint is text-only; it takes no images")
        if self.family is not None and sum(per_text) != len(images):
            raise _count_error(token, per_text, len(images), "image")
        with pixel_limit(self.max_image_pixels):
            pil = [load_image(img, _image_name(i, img)) for i, img in enumerate(images)]
            out, replacements = self._images(pil, per_text)

        expanded, k = [], 0
        for t in texts:
            pieces = t.split(token)
            for i in range(1, len(pieces)):
                pieces[i] = replacements[k] + pieces[i]
                k += 1
            expanded.append("".join(pieces))
        return expanded, out, replacements

    def check_video_support(self) -> None:
        if not self.videos:
            raise ProcessorError(
                f"videos are read by LLaVA-Interleave (llava) checkpoints; this one is "
                f"{self.family or 'text-only'}, which has no video support"
            )

    def _expand_videos(self, texts: list[str], images: list, videos: list) -> tuple[list[str], list]:
        """LLaVA-Interleave reads a video as its frames, one image each (the recipe of the model's
        authors): every <video> becomes one image token per frame of its video, and the frames
        join the images at the place the <video> stands."""
        self.check_video_support()
        if not isinstance(videos, (list, tuple)):
            raise ProcessorError(
                f"videos: expected a list with one video per {VIDEO_TOKEN} (each a list of frames or a "
                f"folder of frame images), got {type(videos).__name__}"
            )
        for i, v in enumerate(videos):
            if not isinstance(v, (str, Path, list, tuple, np.ndarray)):
                raise ProcessorError(
                    f"video {i}: expected a list of frames or a folder of frame images, got {type(v).__name__}"
                )
        token = self.tokens.image_token
        counts = [t.count(VIDEO_TOKEN) for t in texts]
        if sum(counts) != len(videos):
            raise _count_error(VIDEO_TOKEN, counts, len(videos), "video")
        frames = [load_video_frames(v) if isinstance(v, (str, Path)) else list(v) for v in videos]
        if not all(frames):
            raise ProcessorError(f"video {[len(f) for f in frames].index(0)} has no frames")
        split = re.compile(f"({re.escape(token)}|{re.escape(VIDEO_TOKEN)})")
        out_texts, out_images, next_image, next_video = [], [], iter(images), iter(frames)
        for t in texts:
            pieces = split.split(t)
            for i, piece in enumerate(pieces):
                if piece == VIDEO_TOKEN:
                    video = next(next_video)
                    pieces[i] = token * len(video)
                    out_images.extend(video)
                elif piece == token:
                    out_images.append(next(next_image, None))  # None: fewer images than tokens, refused below
            out_texts.append("".join(pieces))
        out_images.extend(next_image)  # more images than tokens: the count check below names it
        return out_texts, [img for img in out_images if img is not None]

    def _pad(self, ids: list[list[int]], side: str) -> dict:
        width = max(len(row) for row in ids)
        if all(len(row) == width for row in ids):
            return {"input_ids": ids, "attention_mask": [[1] * width for _ in ids]}
        pad = self.special_tokens.get("pad_token")
        if pad is None:
            raise ProcessorError("prompts of different lengths need padding, and this tokenizer has no pad_token")
        pad_id = self.tokenizer.token_to_id[pad]
        input_ids, mask = [], []
        for row in ids:
            fill = width - len(row)
            input_ids.append(([pad_id] * fill + row) if side == "left" else (row + [pad_id] * fill))
            mask.append(([0] * fill + [1] * len(row)) if side == "left" else ([1] * len(row) + [0] * fill))
        return {"input_ids": input_ids, "attention_mask": mask}

    def _images(self, images: list, per_text: list[int]) -> tuple[dict, list[str]]:
        """The family's pixel inputs, and the text each image token becomes. An image the
        family's tiling cannot take within the pixel limit is an ImageError that names it."""
        if not images:
            return {}, []
        sizes = [img.size for img in images]
        try:
            return self._family_images(images, per_text)
        except ImageError as e:
            if str(e).startswith("image "):
                raise
            # Which image: the first whose tiling alone fails (a stack of several may fail together).
            for i, img in enumerate(images):
                try:
                    self._family_images([img], [1])
                except ImageError:
                    w, h = sizes[i]
                    raise ImageError(f"image {i} ({w}x{h}, {self.family}): {e}") from None
            raise ImageError(f"images {', '.join(f'{w}x{h}' for w, h in sizes)} ({self.family}): {e}") from None

    def _family_images(self, images: list, per_text: list[int]) -> tuple[dict, list[str]]:
        try:
            tiling = build_tiling(self.tiling, self.image_config, self.tokens, self.slicing, self.connector)
        except KeyError as e:
            raise ProcessorError(e.args[0]) from None
        if self.connector is not None:
            if not isinstance(self.connector, ConnectorConfig):
                raise ProcessorError(
                    f"processor.connector is a {type(self.connector).__name__}; expected the model's "
                    "ConnectorConfig (model.config.connector after a swap), or None for the checkpoint's own"
                )
            if not tiling.follows_connector:
                raise ProcessorError(
                    f"processor.connector ({self.connector.kind!r}): the token count of {self.family}'s "
                    f"tiling {self.tiling!r} does not follow a connector; a swapped connector is supported "
                    "with LLaVA's one-view tiling (leave processor.connector None for the checkpoint's own)"
                )
        try:
            return tiling(images, per_text)
        except ConnectorError as e:
            raise ProcessorError(f"processor.connector: {e}") from None


def _texts(text) -> list[str]:
    """A prompt or a non-empty list of prompts, each a str."""
    if text is None:
        raise ProcessorError("no text: pass the prompt (with one image token per image), or a list of prompts")
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)) or not text:
        raise ProcessorError(f"text: expected a prompt (str) or a non-empty list of prompts, got {_describe(text)}")
    for i, t in enumerate(text):
        if not isinstance(t, str):
            raise ProcessorError(f"text[{i}]: expected a str, got {_describe(t)}")
    return list(text)


def _flat_images(images, texts: list[str], token: str) -> list:
    """The images of all prompts in order: a flat list, one image alone, or one list per prompt (whose
    lengths must then fit the prompts, so that no image silently moves to another prompt)."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    nested = [isinstance(group, (list, tuple)) for group in images]
    if not any(nested):
        return list(images)
    if not all(nested):
        raise ProcessorError(
            "images: expected either a flat list of images or one list of images per prompt, not a mix"
        )
    if len(images) != len(texts):
        raise ProcessorError(
            f"images: {len(images)} lists of images for {len(texts)} prompts; give one list per prompt"
        )
    for i, (t, group) in enumerate(zip(texts, images)):
        if t.count(token) != len(group):
            raise ProcessorError(
                f"prompt {i} has {t.count(token)} {token} tokens but its list holds {len(group)} images; "
                f"give each prompt's list one image per {token} in that prompt"
            )
    return [img for group in images for img in group]


def _image_name(i: int, image) -> str:
    """How errors name an image: its place among the images, and its file when it is one."""
    return f"image {i} ({image})" if isinstance(image, (str, Path)) else f"image {i}"


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def joined_content(message: dict, image_token: str) -> dict:
    """llama3v's chat template takes each message's content as one string: a content list becomes
    its parts joined by newlines, an image part as the image token (as MiniCPM-V's chat joins them)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    if not all(isinstance(part, dict) for part in content):
        raise ChatTemplateError(
            f"a message's content list holds {[type(p).__name__ for p in content]}; expected dicts "
            "such as {'type': 'text', 'text': ...} and {'type': 'image'}"
        )
    parts = [image_token if part.get("type") == "image" else str(part.get("text", "")) for part in content]
    return {**message, "content": "\n".join(parts)}
