"""Built-in model presets, built from config (nothing is downloaded). Each is trained
from scratch on its own built-in world (edgeqtl.worlds).

`tiny`: SigLIP vision tower (2 layers, 64x64 images, 32x32 patches -> 4 image tokens),
a 2-layer MLP projector, and a Qwen2 decoder (6 layers, hidden 128) over the word-level
vocabulary of the shapes world. About 1.7M parameters: the fast fixture of the tests.

`small`: SigLIP (4 layers, hidden 192, 128x128 images, 16x16 patches -> 64 image tokens)
and a Qwen2 decoder (6 layers, hidden 192, 6 heads) on the scenes world: enough image
tokens to reduce and to invert, and a world where bits matter. About 4.6M parameters,
about 1 s a training step (batch 32) on 2 CPU cores: the benchmark the rate, privacy and
token-reduction work reports on (README, "The scenes world and the small preset").
"""
from __future__ import annotations

import dataclasses

import torch

from edgeqtl import vocab as vocab_words
from edgeqtl.worlds import get_world


@dataclasses.dataclass(frozen=True)
class Preset:
    world: str = "shapes"
    image_size: int = 64
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    patch_size: int = 32  # one image token per grid cell of the shapes world
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
    max_positions: int = 256
    # TrainConfig fields this preset trains with by default (models/training.py).
    train: tuple[tuple[str, object], ...] = ()

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def train_config(self, **fields):
        """models.training.TrainConfig with this preset's defaults, then `fields` over them."""
        import dataclasses as dc

        from .training import TrainConfig

        return dc.replace(TrainConfig(), **{**dict(self.train), **fields})


PRESETS: dict[str, Preset] = {
    "tiny": Preset(),
    "small": Preset(
        world="scenes", image_size=128, patch_size=16, vision_hidden=192, vision_layers=4, vision_heads=6,
        text_hidden=192, text_layers=6, text_heads=6, text_kv_heads=6, init_std=0.05, pos_init_std=0.02,
        # No object-count curriculum (the scenes world draws its own counts); a shorter
        # alignment, and the object probe (scene labels per image token).
        train=(("steps", 6000), ("batch_size", 32), ("lr", 1.5e-3), ("curriculum_steps", 0), ("vision_steps", 300),
               ("probe", "cells")),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; the built-in presets are {', '.join(PRESETS)}") from None


def llava_config(p: Preset, vocab: list[str] | None = None):
    """vocab: the word-level vocabulary (edgeqtl.vocab: special tokens first); default the
    preset's world's."""
    from transformers import LlavaConfig, Qwen2Config, SiglipVisionConfig

    vocab = vocab or get_world(p.world).vocabulary()
    vision = SiglipVisionConfig(
        hidden_size=p.vision_hidden, intermediate_size=p.vision_hidden * p.mlp_ratio,
        num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
        image_size=p.image_size, patch_size=p.patch_size, vision_use_head=False)
    text = Qwen2Config(
        vocab_size=len(vocab), hidden_size=p.text_hidden, intermediate_size=p.text_hidden * p.mlp_ratio,
        num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads, num_key_value_heads=p.text_kv_heads,
        max_position_embeddings=p.max_positions, tie_word_embeddings=False,
        pad_token_id=vocab.index(vocab_words.PAD_TOKEN), eos_token_id=vocab.index(vocab_words.EOS_TOKEN),
        bos_token_id=None, initializer_range=p.init_std)
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab.index(vocab_words.IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_seq_length=p.num_image_tokens,
        projector_hidden_act="gelu", tie_word_embeddings=False)


def build_preset(name_or_preset: str | Preset, seed: int = 0, vocab: list[str] | None = None):
    """A fresh Llava model of the preset, weights drawn from `seed`."""
    from transformers import LlavaForConditionalGeneration

    preset = get_preset(name_or_preset) if isinstance(name_or_preset, str) else name_or_preset
    torch.manual_seed(seed)
    cfg = llava_config(preset, vocab)
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


def build_tiny(seed: int = 0, preset: Preset = PRESETS["tiny"], vocab: list[str] | None = None):
    return build_preset(preset, seed, vocab)
