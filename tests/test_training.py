"""A short run of the wire-path training loop learns (the long runs are benchmarks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeqtl.models.presets import build_tiny
from edgeqtl.models.sources import WorldSource
from edgeqtl.models.split import SplitConfig, SplitModel
from edgeqtl.models.training import TrainConfig, train


@pytest.mark.parametrize("split", [SplitConfig(cut=1, levels=4), SplitConfig(cut=0, quantizer="fp16")],
                         ids=["2bit-cut1", "fp16"])
def test_short_run_learns(split, tmp_path):
    model = SplitModel(build_tiny(0), split)
    cfg = TrainConfig(steps=80, vision_steps=20, batch_size=32, warmup=10, seed=0)
    hist = train(model, WorldSource.for_model(model, cfg), cfg, out_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in hist if h["stage"] == 2]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.6 * first, f"loss {first:.3f} -> {last:.3f}"
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
