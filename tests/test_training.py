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


@pytest.mark.parametrize("exact", [True, False], ids=["exact-text", "text-as-codes"])
def test_exact_text_training_never_reads_the_texts_codes(exact):
    """`edgeqtl train --exact-text`: the trunk takes the text as its own embeddings (the
    server embeds the prompt ids), so whatever the quantizer makes of the text positions
    leaves the loss as it is; with the text as codes it does not."""
    from edgeqtl.models.training import wire_step

    model = SplitModel(build_tiny(0), SplitConfig(cut=0, levels=4, exact_text=exact))
    cfg = TrainConfig(batch_size=8)
    source = WorldSource.for_model(model, cfg)
    batch = source.batch(0, source.categories)
    text = (batch.input_ids != model.client.image_token_id).unsqueeze(-1)

    def loss(scramble: bool) -> float:
        def hook(module, args, out):
            codes, values = out
            return torch.where(text, 0, codes), torch.where(text, -1.0, values)

        handle = model.client.encoder.register_forward_hook(hook) if scramble else None
        try:
            return wire_step(model, batch, 0.1)["loss"]
        finally:
            if handle is not None:
                handle.remove()

    plain, scrambled = loss(False), loss(True)
    if exact:
        assert scrambled == pytest.approx(plain, rel=1e-6)
        assert model.client.embed_tokens.weight.grad is not None  # the text's rows learn through their own path
    else:
        assert abs(scrambled - plain) > 1e-3


def test_eval_counts_the_prompt_as_ids_at_cut_0():
    """`edgeqtl train`/`eval`'s uplink line counts what a bundle sends: at cut 0 the image
    positions as packed codes and the prompt's text as INT32 ids; at cut > 0 every
    position as codes."""
    from types import SimpleNamespace

    from edgeqtl.models.evaluation import wire_nbytes

    def model(cut):
        return SimpleNamespace(split=SplitConfig(cut=cut, levels=4, code_dim=code_dim), hidden_size=128)

    code_dim = 64
    # 20 positions, 16 of them image tokens: 16 x code_dim codes at 2 bits + 4 ids x 4 B
    assert wire_nbytes(model(0), 20, 16) == 16 * code_dim * 2 // 8 + 16
    assert wire_nbytes(model(2), 20, 16) == 20 * code_dim * 2 // 8
    assert wire_nbytes(model(0), 20) == 20 * code_dim * 2 // 8
