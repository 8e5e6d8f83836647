"""A random-weight checkpoint of a published VLM (models/zoo.py, at a small scale) is
read the way its own transformers processor reads it: the torch-free prompt encoder
gives the processor's exact token ids (chat template, image tokens expanded), and the
torch-free image preprocessing gives its pixel values."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgeqtl.imageproc import preprocess
from edgeqtl.models.split import SplitConfig


@pytest.fixture(scope="module")
def interleave(tmp_path_factory):
    from edgeqtl.models import zoo

    return zoo.build("llava-interleave-qwen-0.5b", tmp_path_factory.mktemp("zoo") / "interleave", scale=0.05)


def test_prompt_ids_and_pixels_match_the_hf_processor(interleave):
    from transformers import AutoProcessor

    from edgeqtl.models.load import load_image_spec, load_prompts, load_split_model

    model = load_split_model(interleave, SplitConfig(cut=0, levels=4))
    prompts = load_prompts(interleave, model)
    processor = AutoProcessor.from_pretrained(interleave)
    question = "what colour is the square on the left ?"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))  # not square, not 384
    hf = processor(images=image, text=text, return_tensors="np")

    ids, mask = prompts.encode([question])
    assert ids[0][mask[0] == 1].tolist() == hf["input_ids"][0].tolist()
    assert int((hf["input_ids"][0] == model.parts.image_token_id).sum()) == model.num_image_tokens

    ours = preprocess([image], load_image_spec(interleave, model))
    assert ours.shape == hf["pixel_values"].shape
    np.testing.assert_allclose(ours, hf["pixel_values"], atol=1e-5)


def test_zoo_cli_lists_and_refuses_unknown_names(tmp_path):
    from click.testing import CliRunner

    from edgeqtl.cli import main

    listed = CliRunner().invoke(main, ["zoo"])
    assert listed.exit_code == 0 and "llava-interleave-qwen-0.5b" in listed.output
    bad = CliRunner().invoke(main, ["zoo", "no-such-vlm", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "unknown model 'no-such-vlm'" in bad.output


def test_a_lean_load_holds_the_same_weights_and_falls_back_on_other_names(interleave, tmp_path):
    """Export at real size loads tensor by tensor (models/load.py, lean): the same weights
    and buffers as transformers' own loading, the tie of lm_head to the embeddings kept;
    a checkpoint whose names it does not know loads the usual way."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from edgeqtl.models.load import load_vlm, load_split_model

    usual, lean = load_vlm(interleave), load_vlm(interleave, lean=True)
    a, b = usual.state_dict(), lean.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(usual.named_buffers(), lean.named_buffers()))
    assert not lean.training
    assert lean.lm_head.weight is lean.model.language_model.embed_tokens.weight  # qwen2-0.5b ties them
    from edgeqtl.models.split import SplitConfig

    for lean_split, tied in ((True, True), (False, False)):  # training unties them: the halves train apart
        m = load_split_model(interleave, SplitConfig(cut=0, levels=4), lean=lean_split)
        assert (m.parts.lm_head.weight is m.parts.decoder.embed_tokens.weight) == tied
    other = tmp_path / "renamed"
    shutil.copytree(interleave, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["some.other.layout"] = weights.pop(next(iter(weights)))
    save_file(weights, str(other / "model.safetensors"))
    from edgeqtl.models import load as load_module
    from edgeqtl.models.families import LLAVA

    assert load_module._load_lean(other, LLAVA, "llava") is None


def test_a_real_size_export_of_a_tied_checkpoint_keeps_every_weight(interleave, tmp_path, monkeypatch):
    """The real-size export path (lean load, lm_head tied to the embeddings, server weights
    freed before the ONNX export), forced on the small checkpoint: the bundle's fingerprint
    is that of the usual load (a hash over every weight), and the server half loads with
    its lm_head and its token table both whole."""
    import torch

    import edgeqtl.export.bundle as export_bundle_mod
    from edgeqtl.bundle import BundleManifest
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.server_half import load_server_half
    from edgeqtl.models.split import SplitConfig, fingerprint

    from edgeqtl.models.checkpoint import save_checkpoint

    save_checkpoint(load_split_model(interleave, SplitConfig(cut=0, levels=4)), tmp_path / "ckpt")  # its quantizer kept
    monkeypatch.setattr(export_bundle_mod, "REAL_SIZE_BYTES", 0)
    export_bundle(ExportOptions(tmp_path / "ckpt", tmp_path / "b", verify=False), progress=None)
    usual = load_split_model(tmp_path / "ckpt")
    assert BundleManifest.load(tmp_path / "b").fingerprint == fingerprint(usual)
    server = load_server_half(tmp_path / "b" / "server")
    assert torch.equal(server.server.lm_head.weight, usual.parts.lm_head.weight)
    assert torch.equal(server.token_encoder.embed.weight, usual.parts.decoder.embed_tokens.weight)
