"""Vision-language models: images -> vision tower -> connector -> merged into the token embeddings
at the image-token positions -> decoder -> logits.

One module tree serves every family, named as transformers names LLaVA (`vision_tower`,
`multi_modal_projector`, `language_model`), so the hub's LLaVA keys load almost as they are and
the other families' keys are a few rows of their key tables. The families differ only in how
pixels become a list of feature sequences, one per image: that is `image_features`, which each
family's class below defines over the shared `VisionLanguageModel`.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import VLMConfig
from .connector import build_connector
from .decoder import DecoderLM, KVCache, check_inputs
from .processing.geometry import anyres_grid, unpadded_size
from .vision import VisionTower


class VisionLanguageModel(ops.ModelWithPath):
    """The parts every family shares, and the merge of image features into the token embeddings.
    A family's class defines `image_features`: its pixel inputs -> one feature sequence per image."""

    def __init__(self, config: VLMConfig, kernels: str | bool | None = None):
        """kernels: "auto", "on" (True) or "off" (False); None reads MINIVLM_KERNELS (ops.kernels_choice)."""
        super().__init__()
        self.config = config
        kernels = ops.kernels_choice(kernels)  # the choice, made once here for every part
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = build_connector(config.connector)
        self.language_model = DecoderLM(config.text, kernels)
        self.kernels = kernels  # ModelWithPath hands it to every module

    def image_features(self, pixel_values: torch.Tensor, **image_inputs) -> list[torch.Tensor]:
        """The processor's pixel inputs -> one (tokens, text hidden) tensor per image token run."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, pixel_values=None, **image_inputs) -> torch.Tensor:
        """Token embeddings (batch, seq, hidden) with the image features written over the image tokens.

        The features fill the image-token positions in reading order, row by row of the batch, as
        transformers' `masked_scatter` does: the first image's features go to the first image
        tokens of the first row.
        """
        embeds = self.language_model.model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        if pixel_values is None:
            if is_image.any():
                raise ValueError(
                    f"the prompt has {int(is_image.sum())} image tokens (id {self.config.image_token_id}) "
                    "but no pixel_values were given"
                )
            return embeds
        per_image = self.image_features(pixel_values, **image_inputs)
        counts = [len(f) for f in per_image]
        if sum(counts) != int(is_image.sum()):
            raise ValueError(
                f"the prompt has {int(is_image.sum())} image tokens (id {self.config.image_token_id}) but the "
                f"{len(per_image)} images give {sum(counts)} features ({'+'.join(map(str, counts))}); "
                "each image needs exactly its own count of image tokens in the prompt (after a connector "
                "swap, tell the processor: processor.connector = model.config.connector)"
            )
        embeds = embeds.clone()
        embeds[is_image] = torch.cat(per_image).to(embeds.dtype)
        return embeds

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.language_model.new_cache(batch_size, max_len)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """The names of transformers' processor outputs -> logits (batch, seq, vocab)."""
        hidden = self.hidden(
            input_ids,
            attention_mask,
            cache=cache,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            pixel_attention_mask=pixel_attention_mask,
        )
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return self.language_model.lm_head(hidden)

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache=None,
        pixel_values=None,
        **image_inputs,
    ) -> torch.Tensor:
        """The decoder's last hidden states (batch, seq, hidden), before `lm_head` (training's loss
        takes the logits of the labelled positions only)."""
        check_inputs(input_ids, attention_mask, self.config.text.vocab_size)
        embeds = self.embed(input_ids, pixel_values, **image_inputs)
        return self.language_model.model(embeds, attention_mask, cache)


class Llava(VisionLanguageModel):
    """LLaVA-1.5 and LLaVA-Interleave: one fixed-size image -> one feature sequence."""

    def image_features(self, pixel_values: torch.Tensor, **_) -> list[torch.Tensor]:
        """pixel_values (images, C, H, W) -> one (tokens, text hidden) tensor per image."""
        vision = self.config.vision
        expect = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expect:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (images, {', '.join(map(str, expect))})"
            )
        features = self.vision_tower(pixel_values, layers=self.config.feature_layers)
        if self.config.drop_cls:
            features = features[:, 1:]  # (images, patches, hidden): the CLS position is not an image token
        return list(self.multi_modal_projector(features))


class LlavaNext(Llava):
    """LLaVA-NeXT anyres: each image is a base view plus a grid of tiles; the tiles' features are
    stitched back into one grid, the padding cut away, and a learned newline ends every row."""

    def __init__(self, config: VLMConfig, kernels: str | bool | None = None):
        super().__init__(config, kernels)
        self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))

    def image_features(self, pixel_values: torch.Tensor, image_sizes=None, **_) -> list[torch.Tensor]:
        """pixel_values (images, max tiles, C, H, W) or (all tiles, C, H, W); image_sizes (images, 2),
        each image's (height, width)."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (images, 2): each image's original (height, width)")
        tile = self.config.vision.image_size
        image_sizes = torch.as_tensor(image_sizes)
        if image_sizes.dim() != 2 or image_sizes.shape[1] != 2 or image_sizes.is_floating_point():
            raise ValueError(
                f"image_sizes has shape {tuple(image_sizes.shape)} ({image_sizes.dtype}); expected "
                "(images, 2) whole numbers: each image's original (height, width)"
            )
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        for i, (h, w) in enumerate(sizes):
            if h < 1 or w < 1:
                raise ValueError(
                    f"image_sizes[{i}] is ({h}, {w}); expected an image's height and width, each at least 1 pixel"
                )
        grids = [anyres_grid(h, w, self.config.image_grid_pinpoints, tile) for h, w in sizes]
        tiles = [rows * cols + 1 for rows, cols in grids]  # + the base view
        if pixel_values.dim() == 5:  # padded per image: keep each image's real tiles
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images, image_sizes {len(sizes)}")
            if any(k > pixel_values.shape[1] for k in tiles):
                raise ValueError(f"pixel_values has {pixel_values.shape[1]} tiles per image; image_sizes need {tiles}")
            pixel_values = torch.cat([pv[:k] for pv, k in zip(pixel_values, tiles)])
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(tiles):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; image_sizes need {sum(tiles)} tiles "
                f"({'+'.join(map(str, tiles))}) of (C, {tile}, {tile})"
            )
        flat = super().image_features(pixel_values)  # one (side*side, hidden) per tile
        side = self.config.vision.grid

        out = []
        for (h, w), (rows, cols), k in zip(sizes, grids, tiles):
            base, grid_tiles, flat = flat[0], torch.stack(flat[1:k]), flat[k:]
            d = base.shape[-1]
            # (rows*cols, side*side, d) -> (d, rows*side, cols*side): the tiles as one feature image
            grid = (
                grid_tiles.view(rows, cols, side, side, d).permute(4, 0, 2, 1, 3).reshape(d, rows * side, cols * side)
            )
            keep_h, keep_w = unpadded_size(h, w, rows * side, cols * side)
            top, left = (rows * side - keep_h) // 2, (cols * side - keep_w) // 2
            grid = grid[:, top : top + keep_h, left : left + keep_w]  # (d, keep_h, keep_w)
            newline = self.image_newline[:, None, None].expand(d, keep_h, 1).to(grid.dtype)
            grid = torch.cat([grid, newline], dim=-1)  # (d, keep_h, keep_w + 1)
            out.append(torch.cat([base, grid.flatten(1).transpose(0, 1)]))  # base view first, then the rows
        return out


class Idefics3(VisionLanguageModel):
    """Idefics3 / SmolVLM: every tile (and the global view) is one image of the NaViT tower, padded
    to a common size with a pixel mask; all-zero images are batch padding and are skipped."""

    def image_features(self, pixel_values: torch.Tensor, pixel_attention_mask=None, **_) -> list[torch.Tensor]:
        """pixel_values (batch, images, C, H, W); pixel_attention_mask (batch, images, H, W)."""
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (batch, images, C, H, W)")
        b, k, c, height, width = pixel_values.shape
        p = self.config.vision.patch_size
        if height % p or width % p:
            raise ValueError(f"pixel_values are {height}x{width}; Idefics3 needs sides that are multiples of {p}")
        flat = pixel_values.reshape(b * k, c, height, width)
        real = flat.flatten(1).ne(0).any(dim=1)  # (b*k,): an image of zeros is padding
        flat = flat[real]
        mask = None
        if pixel_attention_mask is not None:
            if tuple(pixel_attention_mask.shape) != (b, k, height, width):
                raise ValueError(
                    f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}; expected "
                    f"{(b, k, height, width)}, one mask per image of pixel_values"
                )
            mask = pixel_attention_mask.reshape(b * k, height, width)
            # A real image whose mask has no pixel would give the tower no patch at all: NaN features.
            empty = real & ~mask.flatten(1).bool().any(dim=1)
            if bool(empty.any()):
                i = int(empty.nonzero()[0])
                raise ValueError(
                    f"pixel_attention_mask of image {i % k} of row {i // k} is all zeros, but its pixels are not: "
                    "expected 1 on the image's real pixels (at least one)"
                )
            mask = mask[real]
        features = self.vision_tower(flat, patch_mask_of(mask, flat, p))  # (n, patches, hidden), post-norm
        return list(self.multi_modal_projector(features))


def patch_mask_of(pixel_mask: torch.Tensor | None, pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """pixel mask (n, H, W) of the real pixels of padded images -> patch mask (n, H/p, W/p): a patch
    is real if any of its pixels is. No mask: every patch is real."""
    n, _, height, width = pixel_values.shape
    if pixel_mask is None:
        return torch.ones(n, height // patch, width // patch, dtype=torch.bool, device=pixel_values.device)
    return pixel_mask.bool().unfold(1, patch, patch).unfold(2, patch, patch).sum(dim=(-1, -2)) > 0


class Llama3V(VisionLanguageModel):
    """llama3v (the MiniCPM-Llama3-V 2.5 layout): every image is an overview plus slices of
    different sizes; each runs through the NaViT tower (padded to a common canvas, with a pixel
    mask) and the resampler turns it into `query_num` tokens, whatever its size."""

    def image_features(self, pixel_values: torch.Tensor, pixel_attention_mask=None, **_) -> list[torch.Tensor]:
        """pixel_values (slices, C, H, W): the overview and slices of every image in prompt order,
        zero-padded at the bottom and right; pixel_attention_mask (slices, H, W) marks real pixels."""
        p = self.config.vision.patch_size
        if pixel_values.dim() != 4 or pixel_values.shape[2] % p or pixel_values.shape[3] % p:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; "
                f"expected (slices, C, H, W) with H and W multiples of {p}"
            )
        if pixel_attention_mask is not None and pixel_attention_mask.shape != (
            pixel_values.shape[0],
            *pixel_values.shape[2:],
        ):
            raise ValueError(
                f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}; expected "
                f"{(pixel_values.shape[0], *pixel_values.shape[2:])}, one mask per slice"
            )
        patch_mask = patch_mask_of(pixel_attention_mask, pixel_values, p)
        features = self.vision_tower(pixel_values, patch_mask)  # (slices, h*w, hidden), post-norm
        return list(self.multi_modal_projector(features, patch_mask))  # each (query_num, text hidden)
