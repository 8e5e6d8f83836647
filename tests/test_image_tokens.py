"""The image-token count of the split model is the HF model's own, for every vision
tower and feature strategy (a SigLIP tower with strategy "default" loses its first
patch, as transformers does), and a wrong count is caught."""
from __future__ import annotations

import pytest
import torch

from edgeqtl.models.split import SplitConfig, SplitModel


def _llava(tower: str, strategy: str):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision_cls = SiglipVisionConfig if tower == "siglip" else CLIPVisionConfig
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8, **({"vision_use_head": False} if tower == "siglip" else {}))
    text = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=60, vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("tower", ["siglip", "clip"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_image_token_count_matches_the_hf_model_and_its_forward(tower, strategy):
    llava = _llava(tower, strategy)
    model = SplitModel(llava, SplitConfig(quantizer="identity"))
    pix = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = llava.model.get_image_features(pixel_values=pix, vision_feature_layer=-2,
                                               vision_feature_select_strategy=strategy)
    feats = getattr(feats, "pooler_output", feats)
    hf_count = (feats[0] if isinstance(feats, (list, tuple)) else feats[0]).shape[0]
    assert model.num_image_tokens == hf_count, (tower, strategy)
    n = model.num_image_tokens
    ids = torch.randint(1, 59, (2, n + 6))
    ids[:, 2:2 + n] = 60
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = llava(input_ids=ids, attention_mask=mask, pixel_values=pix).logits
        logits = model.server(model.client(ids, mask, pix).wire, mask)
    assert (logits - ref).abs().max().item() < 1e-4
    bad = ids.clone()
    bad[:, 2] = 5  # one image token short: the HF model itself refuses the count
    with pytest.raises(ValueError):
        llava(input_ids=bad, attention_mask=mask, pixel_values=pix)
