"""VLM families: one small file each says where a family keeps its vision tower,
connector, token embeddings, decoder layers, final norm and lm_head, how it turns an
image into features, and how many image tokens an image gives. The split model, export,
the server half and training see only this interface (`Family`).

    family_of("idefics3")  -> the SmolVLM family
    FAMILIES               -> {model_type: Family}, checked at import
"""
from __future__ import annotations

from .base import Family, UnsupportedModelError, VLMParts
from .llava import LLAVA
from .onevision import ONEVISION
from .smolvlm import SMOLVLM

# Families whose checkpoints another tool converts first (`edgeqtl convert`): model_type -> the hint.
CONVERTED = {"tinyllava": "a TinyLLaVA Factory checkpoint: convert it once with "
                          "`edgeqtl convert --model DIR --out DIR` (no remote code runs)"}

# Families that cannot be split the way edgeqtl splits, and why (docs/MODELS.md).
REFUSED = {
    "paligemma": "PaliGemma attends to its prefix (image and prompt) bidirectionally; the cut's causal "
                 "layers would change what the model computes",
    "gemma3n": "Gemma 3n feeds per-layer embeddings of the token ids into every decoder layer, so the "
               "server would need the ids the codes are meant to replace",
    "lfm2_vl": "LFM2's short convolution layers carry a state that the cut's key/value protocol does not",
    "florence2": "Florence-2 is an encoder-decoder: there is no single decoder stack to cut",
    "qwen2_vl": "Qwen2-VL's M-RoPE needs 3-D positions from the image grid; not supported yet",
    "qwen2_5_vl": "Qwen2.5-VL's M-RoPE needs 3-D positions from the image grid; not supported yet",
}


def _registry(*families: Family) -> dict[str, Family]:
    table: dict[str, Family] = {}
    for family in families:
        for model_type in family.model_types:
            if model_type in table or model_type in REFUSED or model_type in CONVERTED:
                raise RuntimeError(f"model_type {model_type!r} is claimed twice in edgeqtl.models.families")
            table[model_type] = family
    return table


FAMILIES = _registry(LLAVA, SMOLVLM, ONEVISION)


def family_of(model_type: str | None) -> Family:
    """The family of a checkpoint's config.json `model_type`; an error naming the fix otherwise."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in CONVERTED:
        raise UnsupportedModelError(f"model_type {model_type!r} is {CONVERTED[model_type]}")
    if model_type in REFUSED:
        raise UnsupportedModelError(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported VLM family (supported: {', '.join(sorted(FAMILIES))}; "
        "docs/MODELS.md lists what each splits into)")


__all__ = ["FAMILIES", "Family", "VLMParts", "family_of"]
