"""LLaVA-OneVision (`model_type: llava_onevision`): the Llava parts (SigLIP tower,
feature layer, MLP projector) plus a learned `image_newline` vector. The device sends
the base view: one image at the tower's size (384 px: 729 tokens) followed by the
newline, 730 image tokens, which is what transformers computes for an image that is not
tiled (its multi-image path). Any-resolution tiling (the token count then depends on
the image's size) is not supported yet (docs/MODELS.md)."""
from __future__ import annotations

import torch
from torch import nn

from .base import VLMParts, llava_token_count, select_features
from .llava import LlavaFamily


class ProjectorWithNewline(nn.Module):
    """The projector, then the newline vector after the image's features."""

    def __init__(self, projector: nn.Module, image_newline: nn.Parameter):
        super().__init__()
        self.projector = projector
        self.image_newline = image_newline

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.projector(features)
        newline = self.image_newline.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        return torch.cat([x, newline], dim=1)


class OnevisionFamily(LlavaFamily):
    name = "llava_onevision"
    trailing_tokens = 1  # the newline
    pad_to_square = True  # what its processor does to an image it does not tile
    model_types = ("llava_onevision",)
    checkpoint_prefixes = LlavaFamily.checkpoint_prefixes + (("image_newline", "model.image_newline"),)

    def hf_class(self, model_type: str = "llava_onevision"):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def parts(self, model) -> VLMParts:
        parts = super().parts(model)
        newline = getattr(getattr(model, "model", model), "image_newline", None)
        if newline is not None:
            parts.projector = ProjectorWithNewline(parts.projector, newline)
        return parts

    def num_image_tokens(self, config) -> int:
        return llava_token_count(config, config.vision_feature_select_strategy) + 1

    def tile_spec(self, model):
        """Any-resolution tiling, on the checkpoint's grids of at most 9 tiles: there
        transformers never interpolates the tiles' features (anyres_max_9), so their
        layout is a plain index (edgeqtl.tiling.anyres_index)."""
        from edgeqtl.tiling import AnyresSpec

        vc = model.hf.config.vision_config
        tile = vc.image_size
        pinpoints = tuple((int(h), int(w)) for h, w in model.hf.config.image_grid_pinpoints
                          if (h // tile) * (w // tile) <= 9 and h % tile == 0 and w % tile == 0)
        return AnyresSpec(tile, tile // vc.patch_size, pinpoints) if pinpoints else None

    def tile_sources(self, parts, pixel_values):
        """(views x N + 1, hidden): every view's projected features, then the newline."""
        out = parts.vision_tower(pixel_values, output_hidden_states=True)
        proj = parts.projector
        feats = proj.projector(select_features(out, parts.feature_layer, parts.feature_strategy))
        return torch.cat([feats.reshape(-1, feats.shape[-1]), proj.image_newline.to(feats.dtype).view(1, -1)])


ONEVISION = OnevisionFamily()
