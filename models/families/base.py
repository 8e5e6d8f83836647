"""What every VLM family tells the split (models/split.py).

A family is a stateless description. `parts(model)` finds the pieces of a loaded
transformers model; `image_features(parts, pixel_values)` computes what the image
positions of the sequence get (the connector's output, in order); `num_image_tokens`
and `image_size` come from the config alone, so that export, the bundle and the server
know them without running the tower.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from edgeqtl.errors import EdgeqtlError


class UnsupportedModelError(EdgeqtlError, ValueError):
    """The checkpoint or config cannot be split; the message says what is missing."""


@dataclasses.dataclass
class VLMParts:
    """The pieces of a VLM that the split needs, whatever the family calls them."""

    vision_tower: nn.Module | None
    projector: nn.Module | None  # the connector: Llava's MLP, SmolVLM's pixel shuffle + linear
    decoder: nn.Module  # the LLM's base model: .embed_tokens, .layers, .norm, .rotary_emb
    lm_head: nn.Module
    image_token_id: int
    family: "Family | None" = None
    feature_layer: int | list[int] = -1  # Llava-style towers: which hidden states
    feature_strategy: str = "full"  # "default": transformers drops the first token


class Family:
    name: str = ""
    model_types: tuple[str, ...] = ()
    # Where the image tokens are written in the prompt (SmolVLM wraps them in markers).
    image_wrap: str = "{image}"
    # Old checkpoint names -> the model's (transformers renamed Llava-style models in 4.52).
    checkpoint_prefixes: tuple[tuple[str, str], ...] = ()

    def hf_class(self, model_type: str) -> type:
        """The transformers class of a checkpoint of this family's `model_type`."""
        raise NotImplementedError

    def parts(self, model) -> VLMParts:
        raise NotImplementedError

    def image_features(self, parts, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, hidden): what the N image positions get. `parts` has .vision_tower,
        .projector, .feature_layer, .feature_strategy (a VLMParts or a ClientHalf)."""
        raise NotImplementedError

    def image_features_and_attention(self, parts, pixel_values):
        """(features, attention): the attention the image tokens receive in the tower's
        feature layer, (B, heads, N, N) over the same N tokens, for the `attention`
        reducer (models/reduce.py); None where the image tokens are not the tower's."""
        return self.image_features(parts, pixel_values), None

    def num_image_tokens(self, config) -> int:
        raise NotImplementedError

    def tile_spec(self, model):
        """The family's image splitting (edgeqtl.tiling.TileSpec), or None where it has none."""
        return None

    def token_grid(self, config) -> int | None:
        """The side of the square grid the image tokens form (pooling needs it), or None."""
        return None

    # Tokens the family always appends after an image's features (LLaVA-OneVision's newline).
    trailing_tokens: int = 0
    # Whether the image tokens are the tower's own (the attention reducer ranks them by it).
    tower_attention: bool = True
    # Whether an untiled image is padded to a square (in the mean colour) before its resize.
    pad_to_square: bool = False

    def image_size(self, config) -> int:
        return int(config.vision_config.image_size)

    def __repr__(self) -> str:
        return f"<family {self.name}>"


def check_decoder(decoder) -> None:
    """The LLM must be a decoder-only stack the halves can drive layer by layer."""
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, attr):
            raise UnsupportedModelError(
                f"the language model ({type(decoder).__name__}) has no .{attr}; edgeqtl needs a decoder-only "
                "LLM exposing embed_tokens, layers, norm and rotary_emb (Qwen2, Llama, Phi3, Gemma, ...)")
    layer_types = getattr(decoder.config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError("sliding-window attention layers are not supported across the cut yet")


def base_model(model):
    """transformers 5.x nests the parts under `.model`."""
    return getattr(model, "model", model)


def lm_head_of(model):
    return getattr(model, "lm_head", None) or getattr(getattr(base_model(model), "language_model", None),
                                                       "lm_head", None)


def select_features(out, feature_layer, strategy: str) -> torch.Tensor:
    """Llava's choice of the tower's hidden states: one layer or several concatenated,
    without the first token where the strategy is "default" (as transformers does)."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    feats = [out.hidden_states[i] for i in layers]
    if strategy == "default":
        feats = [f[:, 1:] for f in feats]
    return torch.cat(feats, dim=-1)


def has_cls(vision_config) -> bool:
    # CLIP prepends a class token; SigLIP does not.
    return getattr(vision_config, "model_type", "") in ("clip_vision_model", "clip")


def llava_token_count(config, strategy: str) -> int:
    """The tower's tokens, plus CLIP's class token, minus the first token where the
    strategy is "default" (transformers drops it whatever it is: for SigLIP, which has
    no class token, that is a patch)."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2 + (1 if has_cls(vc) else 0)
    return n - (1 if strategy == "default" else 0)
