"""Built-in model presets, built from config (nothing is downloaded).

`tiny`: SigLIP vision tower (2 layers, 64x64 images, 32x32 patches -> 4 image tokens),
a 2-layer MLP projector, and a Qwen2 decoder (6 layers, hidden 128) over the word-level
vocabulary of the shapes benchmark. About 1.7M parameters: trains on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses

import torch

from edgeqtl import shapes


@dataclasses.dataclass
class TinyPreset:
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 32  # one image token per grid cell of the shapes benchmark
    text_hidden: int = 128
    text_layers: int = 6
    # Full multi-head attention, not GQA: with 2 KV heads the lookups by colour, by
    # shape and by cell share two key projections per layer and learn far slower.
    text_heads: int = 8
    text_kv_heads: int = 8
    mlp_ratio: int = 3
    # HF's default init (std 0.02) leaves attention near uniform at hidden 128, and the
    # language model sits on a long plateau before it learns to look at the image.
    init_std: float = 0.06
    pos_init_std: float | None = None  # None: keep SigLIP's own init (docs/TRAINING.md, positions)


def tiny_llava_config(p: TinyPreset = TinyPreset(), vocab: list[str] | None = None):
    """vocab: the word-level vocabulary (edgeqtl.vocab: special tokens first); default the
    shapes world's."""
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    vocab = vocab or shapes.vocabulary()
    vision = SiglipVisionConfig(
        hidden_size=p.vision_hidden, intermediate_size=p.vision_hidden * p.mlp_ratio,
        num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
        image_size=shapes.IMAGE_SIZE, patch_size=p.patch_size, vision_use_head=False)
    text = Qwen2Config(
        vocab_size=len(vocab), hidden_size=p.text_hidden, intermediate_size=p.text_hidden * p.mlp_ratio,
        num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads, num_key_value_heads=p.text_kv_heads,
        max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=vocab.index(shapes.PAD_TOKEN), eos_token_id=vocab.index(shapes.EOS_TOKEN),
        bos_token_id=None, initializer_range=p.init_std)
    n_img = (shapes.IMAGE_SIZE // p.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab.index(shapes.IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=n_img,
        projector_hidden_act="gelu", tie_word_embeddings=False)


def build_tiny(seed: int = 0, preset: TinyPreset = TinyPreset(), vocab: list[str] | None = None):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_llava_config(preset, vocab)
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    # SigLIP initialises position embeddings ~12x weaker than patch embeddings; through a
    # 2-bit quantizer that leaves no trace of where a patch was, and the language model
    # cannot tell northwest from southeast. A from-scratch tower starts them at par.
    for name, module in model.model.vision_tower.named_modules():
        if preset.pos_init_std is not None and name.endswith("embeddings.position_embedding"):
            with torch.no_grad():
                module.weight.normal_(0.0, preset.pos_init_std)
    return model


PRESETS = {"tiny": build_tiny}
