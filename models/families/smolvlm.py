"""SmolVLM and SmolVLM2 (`model_type: idefics3` and `smolvlm`): a SigLIP-B/16 tower at
512 px, a connector that pixel-shuffles the 32 x 32 patch grid by `scale_factor` (4:
16 patches into one token of 16x the width) and projects it to the LLM's width with one
linear layer, and a SmolLM2 (Llama) trunk. 64 image tokens per image; the prompt wraps
them as <fake_token_around_image><global-img> ... <fake_token_around_image>; 1-D
positions.

The device takes one global 512 x 512 view (the processor's image splitting off). The
tower's embeddings are computed here for that full-size view: HF's own code handles
padded images with `torch.bucketize`, which the ONNX exporter does not take, and for a
full image it reduces to position ids 0..N-1, computed once with HF's arithmetic.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Family, UnsupportedModelError, VLMParts, base_model, check_decoder, lm_head_of


class SmolVisionTower(nn.Module):
    """HF's SmolVLM/Idefics3 vision transformer on a full-size image, exportable."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model
        self.register_buffer("position_ids", _full_image_positions(vision_model.embeddings), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.vision_model.embeddings
        x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding(self.position_ids)
        x = self.vision_model.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state
        return self.vision_model.post_layernorm(x)


def _full_image_positions(embeddings) -> torch.Tensor:
    """(1, N) the position ids HF's embeddings give an unpadded image of the tower's size
    (the same operations, run once, eagerly)."""
    n = embeddings.num_patches_per_side
    boundaries = torch.arange(1 / n, 1.0, 1 / n)
    coords = torch.clamp(torch.arange(n, dtype=torch.float32) * (1.0 / n), max=1.0 - 1e-6)
    bucket = torch.bucketize(coords, boundaries, right=True)
    return (bucket[:, None] * n + bucket[None, :]).reshape(1, -1)


class SmolVLMFamily(Family):
    name = "smolvlm"
    model_types = ("idefics3", "smolvlm")
    image_wrap = "<fake_token_around_image><global-img>{image}<fake_token_around_image>"
    tower_attention = False  # the pixel shuffle merges 16 of the tower's tokens into each image token

    def hf_class(self, model_type: str = "smolvlm"):
        if model_type == "idefics3":
            from transformers import Idefics3ForConditionalGeneration

            return Idefics3ForConditionalGeneration
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration

    def parts(self, model) -> VLMParts:
        base = base_model(model)
        vision, connector = getattr(base, "vision_model", None), getattr(base, "connector", None)
        decoder, lm_head = getattr(base, "text_model", None), lm_head_of(model)
        missing = [n for n, m in [("vision_model", vision), ("connector", connector), ("text_model", decoder),
                                  ("lm_head", lm_head)] if m is None]
        if missing:
            raise UnsupportedModelError(f"the model has no {', '.join(missing)}; the {self.name} family needs them")
        check_decoder(decoder)
        return VLMParts(SmolVisionTower(vision), connector, decoder, lm_head, int(model.config.image_token_id), self)

    def image_features(self, parts, pixel_values):
        return parts.projector(parts.vision_tower(pixel_values))

    def num_image_tokens(self, config) -> int:
        vc = config.vision_config
        return (vc.image_size // vc.patch_size) ** 2 // config.scale_factor ** 2

    def tile_spec(self, model):
        from edgeqtl.tiling import TileSpec

        tile = self.image_size(model.hf.config)
        edge = getattr(model.image_spec, "longest_edge", None) or 4 * tile
        return TileSpec(tile, edge, self.num_image_tokens(model.hf.config))

    def token_grid(self, config) -> int | None:
        return config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor


SMOLVLM = SmolVLMFamily()
