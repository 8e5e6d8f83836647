"""Build a SplitModel from the `tiny` preset or from a local HF Llava checkpoint.

Only safetensors weights are read: a checkpoint that ships only pickled `.bin` files is
refused rather than `torch.load`ed.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from edgeqtl.errors import EdgeqtlError

from .hf import quiet_transformers
from .split import QUANTIZER_FILE, SPLIT_CONFIG_FILE, SplitConfig, SplitModel, UnsupportedModelError


class CheckpointError(EdgeqtlError, ValueError):
    """A checkpoint directory that cannot be used; the message says why and what to do."""


def _check_checkpoint_dir(directory: Path) -> dict:
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"not a directory: {directory}; pass a Hugging Face checkpoint directory")
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; pass a Hugging Face Llava checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if cfg.get("model_type") != "llava":
        raise CheckpointError(
            f"{directory} holds a {cfg.get('model_type')!r} model, not a Llava one (config.json model_type "
            "must be 'llava': a vision tower, a projector and a decoder-only LLM)")
    if not any(directory.glob("*.safetensors")):
        raise CheckpointError(
            f"{directory} has no .safetensors weights; edgeqtl never unpickles .bin files. Convert the "
            "checkpoint once with transformers: model.save_pretrained(dir, safe_serialization=True)")
    return cfg


def load_llava(directory: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import LlavaForConditionalGeneration

    directory = Path(directory)
    _check_checkpoint_dir(directory)
    quiet_transformers()
    return LlavaForConditionalGeneration.from_pretrained(
        directory, use_safetensors=True, dtype=dtype, attn_implementation="eager")


def load_split_model(directory: str | Path, split: SplitConfig | None = None) -> SplitModel:
    """Load a checkpoint. An edgeqtl directory carries its split config and quantizer;
    a plain Llava checkpoint needs `split` and starts with a fresh quantizer."""
    from safetensors.torch import load_file

    directory = Path(directory)
    llava = load_llava(directory)
    meta_path = directory / SPLIT_CONFIG_FILE
    saved = SplitConfig.from_dict(json.loads(meta_path.read_text())["split"]) if meta_path.is_file() else None
    if split is None:
        if saved is None:
            raise CheckpointError(f"{directory} is a plain Llava checkpoint; say where to cut (--cut) and the levels")
        split = saved
    elif saved is not None and _same_quantizer(saved, dataclasses.replace(split, code_dim=split.code_dim
                                                                          or saved.code_dim)):
        split = dataclasses.replace(split, clip_sigmas=saved.clip_sigmas)  # the trained quantizer's own range
    model = SplitModel(llava, split)
    q_path = directory / QUANTIZER_FILE
    if saved is not None and q_path.is_file() and _same_quantizer(saved, model.split):
        model.load_quantizer_state(load_file(str(q_path)))
    return model


def _same_quantizer(a: SplitConfig, b: SplitConfig) -> bool:
    return (a.quantizer, a.levels, a.code_dim, a.cut) == (b.quantizer, b.levels, b.code_dim, b.cut)


def read_split_meta(directory: str | Path) -> dict:
    p = Path(directory) / SPLIT_CONFIG_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


__all__ = ["CheckpointError", "UnsupportedModelError", "load_llava", "load_split_model", "read_split_meta"]
