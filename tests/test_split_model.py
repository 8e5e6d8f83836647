"""The split model: exactness across the cut, the quantizer, save/load, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from edgeqtl.models.load import CheckpointError, load_vlm, load_split_model
from edgeqtl.models.split import SplitConfig, SplitModel


def _inputs(llava, n_img, batch=3, length=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    image_id = llava.config.image_token_index
    ids = torch.randint(1, llava.config.text_config.vocab_size, (batch, length), generator=g)
    ids[ids == image_id] = 1  # image tokens only where the image goes
    ids[:, 3:3 + n_img] = image_id
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # left padding on one row
    size = llava.config.vision_config.image_size
    pix = torch.randn(batch, 3, size, size, generator=g)
    return ids, mask, pix


@pytest.mark.parametrize("cut_name", ["0", "1", "last"])
def test_identity_split_matches_unsplit_model(llava_checkpoint, cut_name):
    arch, directory = llava_checkpoint
    llava = load_vlm(directory)
    n_layers = llava.config.text_config.num_hidden_layers
    cut = n_layers - 1 if cut_name == "last" else int(cut_name)
    model = load_split_model(directory, SplitConfig(cut=cut, quantizer="identity"))
    ids, mask, pix = _inputs(llava, model.num_image_tokens)
    with torch.no_grad():
        ref = model.hf(input_ids=ids, attention_mask=mask, pixel_values=pix,
                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        out = model.client(ids, mask, pix)
        logits = model.server(out.wire, mask)
    diff = (logits - ref)[mask.bool()].abs().max().item()
    assert diff < 1e-4, f"{arch} cut {cut}: max abs diff {diff}"
    with torch.no_grad():  # what serving and evaluation use: the last position's logits only
        nxt = model.server.next_logits(out.wire, mask)
    assert nxt.shape == (ids.shape[0], logits.shape[-1])
    assert torch.allclose(nxt, logits[:, -1], atol=1e-5)


def test_fsq_client_sends_integer_codes_in_range(llava_checkpoint):
    _, directory = llava_checkpoint
    for levels in (2, 3, 4, 16):
        model = load_split_model(directory, SplitConfig(cut=1, levels=levels, code_dim=24))
        ids, mask, pix = _inputs(model.hf, model.num_image_tokens)
        out = model.client(ids, mask, pix)
        assert out.wire.dtype == torch.uint8
        assert out.wire.shape == (*ids.shape, 24)
        assert int(out.wire.max()) < levels
        # not degenerate (an untrained in_proj rarely reaches the outer levels, beyond 2σ)
        assert len(torch.unique(out.wire)) >= 2


def test_straight_through_gradient_reaches_the_client():
    from edgeqtl.models.quantizer import QuantizerEncoder, dequantise

    enc = QuantizerEncoder(16, 8, 4)
    h = torch.randn(2, 5, 16)
    codes, values = enc(h)
    assert torch.equal(codes, torch.round((values + 1) * 1.5).to(torch.uint8))
    assert float(values.detach().abs().max()) <= 1.0
    (values * torch.ones_like(dequantise(codes, 4))).sum().backward()
    assert enc.in_proj.weight.grad is not None and enc.in_proj.weight.grad.abs().sum() > 0


def test_save_and_load_keeps_weights_and_split(tmp_path):
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.checkpoint import save_split_model

    model = SplitModel(build_tiny(1), SplitConfig(cut=2, levels=3))
    with torch.no_grad():
        model.client.encoder.in_proj.bias.add_(0.25)  # not the fresh initialisation
    save_split_model(model, tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    again = load_split_model(tmp_path)
    assert again.split == model.split
    ids, mask, pix = _inputs(model.hf, model.num_image_tokens, length=24)
    with torch.no_grad():
        a = model.server(model.client(ids, mask, pix).wire, mask)
        b = again.server(again.client(ids, mask, pix).wire, mask)
    assert torch.equal(a, b)


def test_clear_error_for_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_split_model(tmp_path / "nope", SplitConfig())


def test_clear_error_for_a_checkpoint_of_no_supported_family(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a supported VLM family"):
        load_split_model(tmp_path, SplitConfig())


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_split_model(tmp_path, SplitConfig())


def test_clear_error_for_cut_out_of_range(llava_checkpoint):
    _, directory = llava_checkpoint
    with pytest.raises(ValueError, match=r"cut must be in \[0, 2\]"):
        load_split_model(directory, SplitConfig(cut=3))


def test_clip_range_matches_the_levels_and_old_checkpoints_keep_theirs(tmp_path):
    """At 4 levels the original 3-sigma range leaves the outer levels nearly unused (only
    values beyond 2 sigma reach them); the default range uses all four."""
    import json

    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.quantizer import CLIP_SIGMAS, QuantizerEncoder, default_clip_sigmas
    from edgeqtl.models.checkpoint import save_split_model
    from edgeqtl.models.split import SPLIT_CONFIG_FILE

    assert default_clip_sigmas(2) == CLIP_SIGMAS and default_clip_sigmas(4) == pytest.approx(1.49)
    assert default_clip_sigmas(256) == CLIP_SIGMAS
    h = torch.randn(64, 10, 32)
    outer = {}
    for clip in (CLIP_SIGMAS, None):
        torch.manual_seed(0)
        codes, _ = QuantizerEncoder(32, 32, 4, clip)(h)
        outer[clip] = float(((codes == 0) | (codes == 3)).float().mean())
    assert outer[CLIP_SIGMAS] < 0.08 and outer[None] > 0.2, outer

    model = SplitModel(build_tiny(1), SplitConfig(cut=0, levels=4))
    assert model.split.clip_sigmas == pytest.approx(1.49)
    save_split_model(model, tmp_path)
    meta = json.loads((tmp_path / SPLIT_CONFIG_FILE).read_text())
    del meta["split"]["clip_sigmas"]  # as written before the field existed
    (tmp_path / SPLIT_CONFIG_FILE).write_text(json.dumps(meta))
    old = load_split_model(tmp_path)
    assert old.split.clip_sigmas == CLIP_SIGMAS and old.client.encoder.clip_sigmas == CLIP_SIGMAS
    # an explicit split with the same quantizer keeps the trained range
    assert load_split_model(tmp_path, SplitConfig(cut=0, levels=4)).split.clip_sigmas == CLIP_SIGMAS
