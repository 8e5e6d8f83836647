"""Llava (`model_type: llava`): llava-interleave, LLaVA-1.5, TinyLLaVA after `edgeqtl
convert`. Vision tower -> hidden states of `vision_feature_layer` -> multi-modal
projector (an MLP); one image token per feature, spliced in at the image token's places;
1-D positions."""
from __future__ import annotations

from .base import (Family, UnsupportedModelError, VLMParts, base_model, check_decoder, has_cls, lm_head_of,
                   llava_token_count, select_features)


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    checkpoint_prefixes = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                           ("vision_tower.", "model.vision_tower."),
                           ("multi_modal_projector.", "model.multi_modal_projector."))

    def hf_class(self, model_type: str = "llava"):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def parts(self, model) -> VLMParts:
        cfg = model.config
        base = base_model(model)
        vision = getattr(base, "vision_tower", None)
        projector = getattr(base, "multi_modal_projector", None)
        decoder = getattr(base, "language_model", None)
        if decoder is not None and hasattr(decoder, "model") and not hasattr(decoder, "layers"):
            decoder = decoder.model  # transformers 4.x: language_model is the *ForCausalLM
        lm_head = lm_head_of(model)
        missing = [n for n, m in [("vision_tower", vision), ("multi_modal_projector", projector),
                                  ("language_model", decoder), ("lm_head", lm_head)] if m is None]
        if missing:
            raise UnsupportedModelError(f"the model has no {', '.join(missing)}; the {self.name} family needs them")
        check_decoder(decoder)
        return VLMParts(vision, projector, decoder, lm_head, int(cfg.image_token_index), self,
                        cfg.vision_feature_layer, cfg.vision_feature_select_strategy)

    def image_features(self, parts, pixel_values):
        out = parts.vision_tower(pixel_values, output_hidden_states=True)
        return parts.projector(select_features(out, parts.feature_layer, parts.feature_strategy))

    def image_features_and_attention(self, parts, pixel_values):
        out = parts.vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
        layer = parts.feature_layer if isinstance(parts.feature_layer, int) else parts.feature_layer[-1]
        # hidden_states[i] is layer i - 1's output, so a negative index names the same layer in both
        attention = out.attentions[layer if layer < 0 else layer - 1]
        if parts.feature_strategy == "default":
            attention = attention[:, :, 1:, 1:]
        return parts.projector(select_features(out, parts.feature_layer, parts.feature_strategy)), attention

    def num_image_tokens(self, config) -> int:
        return llava_token_count(config, config.vision_feature_select_strategy)

    def token_grid(self, config) -> int | None:
        vc = config.vision_config
        plain = config.vision_feature_select_strategy == "full" and not has_cls(vc)
        return vc.image_size // vc.patch_size if plain else None


LLAVA = LlavaFamily()
