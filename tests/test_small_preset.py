"""The small preset on the scenes world: built from config, its probe's labels, and an
untrained model exported, verified and answering over mosquitto (no long training)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeqtl import scenes
from edgeqtl.models.presets import PRESETS, build_preset
from edgeqtl.models.split import SplitConfig, SplitModel

from test_agents import MAX_NEW, reference_answer


def test_small_preset_has_64_image_tokens_and_the_scenes_vocabulary():
    model = SplitModel(build_preset("small", 0), SplitConfig(cut=0, levels=4))
    assert model.num_image_tokens == PRESETS["small"].num_image_tokens == 64
    assert model.hf.config.vision_config.image_size == scenes.IMAGE_SIZE
    assert model.hf.config.text_config.vocab_size == len(scenes.vocabulary())
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 2e7
    # the same seed builds the same weights; another seed does not
    a, b, c = (build_preset("small", s).state_dict() for s in (1, 1, 2))
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    key = key if key in a else next(k for k in a if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_token_labels_name_the_object_over_each_patch():
    O = scenes.SceneObject
    red = O("red", "circle", x=30, y=30, size=20, rotation=0, rgb=(225, 30, 30))
    blue = O("blue", "square", x=100, y=100, size=6, rotation=0, rgb=(35, 75, 235), digit=7, digit_px=8)
    green = O("green", "star", x=44, y=30, size=10, rotation=0, rgb=(40, 190, 60))  # in front of red's right side
    labels = scenes.token_labels(scenes.Scene((red, blue, green)), 8)  # 16 px patches
    assert labels.shape == (len(scenes.TOKEN_LABELS), 8, 8)
    colour, shape, digit, size = labels
    C, S = list(scenes.COLORS), list(scenes.SHAPES)
    assert (colour[1, 1], shape[1, 1], digit[1, 1]) == (1 + C.index("red"), 1 + S.index("circle"), 0)
    assert (colour[1, 2], shape[1, 2]) == (1 + C.index("green"), 1 + S.index("star"))  # the front one wins
    assert (colour[6, 6], shape[6, 6], digit[6, 6]) == (1 + C.index("blue"), 1 + S.index("square"), 1 + 7)
    assert size[1, 1] == 1 + list(scenes.SIZE_CLASSES).index("large")
    assert size[6, 6] == 1 + list(scenes.SIZE_CLASSES).index("small")
    assert not labels[:, 7, 0].any() and not labels[:, 0, 7].any()  # far corners: nothing there
    # a small object covering no patch centre still labels the patch its centre is in
    tiny = O("cyan", "circle", x=72, y=8, size=5, rotation=0, rgb=(0, 205, 225))
    assert scenes.token_labels(scenes.Scene((tiny,)), 8)[0, 0, 4] == 1 + C.index("cyan")
    for s in scenes.heldout(2):  # generated scenes: the labels of a patch agree with each other
        lab = scenes.token_labels(s.scene, 8)
        assert ((lab[0] == 0) == (lab[1] == 0)).all() and ((lab[0] == 0) == (lab[3] == 0)).all()
        assert lab.any() == bool(s.scene.objects)


def test_object_probe_loss_falls_on_a_fixed_batch():
    from edgeqtl.models.sources import WorldSource
    from edgeqtl.models.training import make_probe

    model = SplitModel(build_preset("small", 0), SplitConfig(cut=0, levels=4))
    cfg = PRESETS["small"].train_config(batch_size=4)
    source = WorldSource.for_model(model, cfg, scenes)
    probe = make_probe(cfg.probe, model.split.code_dim, model.num_image_tokens, source)
    assert type(probe).__name__ == "ObjectProbe"
    batch = source.align_batch(0)
    feats = torch.randn(4, 64, model.split.code_dim, requires_grad=False)
    opt = torch.optim.Adam(probe.parameters(), 1e-2)
    first = probe.loss(feats, batch).item()
    for _ in range(30):
        opt.zero_grad()
        loss = probe.loss(feats, batch)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_scenes_world_refuses_the_shapes_curriculum():
    from edgeqtl.models.sources import WorldSource
    from edgeqtl.models.training import TrainConfig

    model = SplitModel(build_preset("small", 0), SplitConfig(cut=0, levels=4))
    with pytest.raises(ValueError, match="curriculum-steps 0"):
        WorldSource.for_model(model, TrainConfig(curriculum_steps=600), scenes)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("small")
    save_checkpoint(SplitModel(build_preset("small", 4), SplitConfig(cut=2, levels=4)), d / "model",
                    extra={"world": "scenes"})
    lines = []
    res = export_bundle(ExportOptions(d / "model", d / "bundle", verify_per_family=3), progress=lines.append)
    return d / "model", d / "bundle", res, lines


def test_untrained_small_model_exports_and_verifies_on_its_own_world(small_bundle):
    _, bundle, res, lines = small_bundle
    assert res.verification is not None and res.verification.ok, res.verification.table()
    assert not any("fitting the entropy model on shapes images" in line for line in lines)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["cut"] == 2
    assert manifest["image"]["size"] == scenes.IMAGE_SIZE


def test_untrained_small_model_answers_over_mosquitto(small_bundle, mosquitto):
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.imageproc import preprocess
    from edgeqtl.models.load import load_split_model
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.transport import BrokerConfig, RequestClient

    model_dir, bundle, _, _ = small_bundle
    model = load_split_model(model_dir).eval()
    engine = load_engine(bundle / "server", max_new_tokens=MAX_NEW)
    client = DeviceClient(bundle)
    cfg = BrokerConfig(port=mosquitto.port)
    with ServerAgent(engine, cfg), RequestClient(cfg, "small-test") as transport:
        for s in scenes.heldout(1):  # one question per family
            a = client.ask(transport, s.image, s.question, timeout=30)
            ids, mask = client.prompts.encode([s.question])
            ref = reference_answer(model, client.prompts.tok, engine.eos, ids, mask,
                                   preprocess(s.image, client.manifest.image))
            assert a.text == ref, s.question
            assert a.bytes_up < a.bytes_up_fp16 * 0.2
    assert np.isfinite(a.latency_s)
