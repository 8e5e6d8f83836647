"""FastV at the cut (models/reduce.py, TokenReducer.at_cut): every token goes through the
device's layers, then the K image tokens the last position attends to most in the last
of them go on, at their original positions; the device's own KV cache keeps all N."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from edgeqtl import shapes
from edgeqtl.models.reduce import ImageReduction, last_token_attention
from edgeqtl.models.split import (SplitConfig, SplitModel, UnsupportedModelError, kept_rows,
                                  position_ids_from_mask, run_layers)

NEVER = 10 ** 9


def _model(k: int | None = None, cut: int = 2, seed: int = 3) -> SplitModel:
    from edgeqtl.models.presets import build_tiny

    model = SplitModel(build_tiny(seed), SplitConfig(cut=cut, levels=4)).eval()
    if k is not None:
        model.set_image_reduction(ImageReduction("fastv", k))
    return model


def _batch(model: SplitModel, n: int = 4, with_answer: bool = False, offset: int = 0):
    from edgeqtl.models.batches import Collator, image_spec_of, world_example

    collate = Collator(shapes.prompts(model.num_image_tokens), image_spec_of(model))
    return collate([world_example(s) for s in shapes.heldout(3)[offset:offset + n]], with_answer=with_answer)


def test_the_last_positions_attention_is_the_layers_own():
    """The ranking is computed from the layer's projections; eager attention returns the same weights."""
    model = _model()
    b = _batch(model)
    e = model.client.embed(b.input_ids, b.pixel_values, b.attention_mask)
    h = run_layers(model.client._decoder, model.client.layers[:-1], e.hidden, e.attention_mask)
    ours = last_token_attention(model.client._decoder, model.client.layers[-1], h, e.attention_mask)
    model.client._decoder.config._attn_implementation = "eager"
    seen = {}

    def keep_weights(module, args, out):
        seen["w"] = out[1]

    hook = model.client.layers[-1].self_attn.register_forward_hook(keep_weights)
    with torch.no_grad():
        run_layers(model.client._decoder, model.client.layers[-1:], h, e.attention_mask)
    hook.remove()
    eager = seen["w"][:, :, -1].mean(1)  # the last position's row, mean over heads
    assert torch.allclose(ours, eager, atol=1e-6)
    assert (ours[b.attention_mask == 0] == 0).all()  # left padding gets none


def test_fastv_keeps_the_most_attended_image_tokens_where_they_were():
    model = _model(k=2)
    n = model.num_image_tokens  # the prompt holds every image token: the choice comes after the device's layers
    assert n == 4 and model.sent_image_tokens == 2
    b = _batch(model)
    with torch.no_grad():
        out = model.client(b.input_ids, b.attention_mask, b.pixel_values)
        e = model.client.embed(b.input_ids, b.pixel_values, b.attention_mask)
        h = run_layers(model.client._decoder, model.client.layers[:-1], e.hidden, e.attention_mask)
        received = last_token_attention(model.client._decoder, model.client.layers[-1], h, e.attention_mask)
    is_image = b.input_ids == model.client.image_token_id
    T = b.input_ids.shape[1]
    assert out.wire.shape[1] == T - n + 2 and out.rows.shape == (len(b.input_ids), T - n + 2)
    for row in range(len(b.input_ids)):
        image_rows = is_image[row].nonzero().squeeze(-1)
        top = received[row, image_rows].topk(2).indices.sort().values
        assert out.image_positions[row].tolist() == top.tolist()  # the most attended, in order
        sent = set(out.rows[row].tolist())
        assert {i for i in range(T) if not is_image[row, i]} <= sent  # every text and padding row goes
        assert sent & set(image_rows.tolist()) == set((image_rows[top]).tolist())
    # the server's positions, from the kept positions' steps, are the ones the device's layers used
    device_pos = position_ids_from_mask(out.device_mask, T)
    server_pos = position_ids_from_mask(out.attention_mask, out.attention_mask.shape[1])
    valid = out.attention_mask > 0
    assert torch.equal(kept_rows(device_pos, out.rows)[valid], server_pos[valid])
    assert out.attention_mask.max() > 1 and torch.equal(out.device_mask, b.attention_mask)


def test_fastv_keeping_every_token_is_the_unreduced_model():
    from edgeqtl.models.generate import generate
    from edgeqtl.models.training import wire_step

    plain, every = _model(), _model(k=4)
    b = _batch(plain)
    assert generate(every, b, 4, {NEVER}) == generate(plain, b, 4, {NEVER})
    with torch.no_grad():
        assert torch.allclose(every.next_logits(b.input_ids, b.attention_mask, b.pixel_values),
                              plain.next_logits(b.input_ids, b.attention_mask, b.pixel_values), atol=1e-5)
    t = _batch(plain, with_answer=True)
    assert wire_step(every, t, 0.1)["loss"] == pytest.approx(wire_step(plain, t, 0.1)["loss"], rel=1e-5)
    # with fewer tokens the wire is shorter and the answer's labels move with their rows
    fewer = _model(k=1)
    assert torch.isfinite(torch.tensor(wire_step(fewer, t, 0.1)["loss"]))
    out = fewer.client(t.input_ids, t.attention_mask, t.pixel_values)
    assert ((kept_rows(t.labels, out.rows) != -100).sum(1) == (t.labels != -100).sum(1)).all()


def test_fastv_refuses_what_it_cannot_do():
    with pytest.raises(UnsupportedModelError, match="--cut 1 or more"):
        _model(k=2, cut=0)
    with pytest.raises(UnsupportedModelError, match="original positions"):
        ImageReduction("fastv", 2, positions="consecutive")
    with pytest.raises(UnsupportedModelError, match="1 to 4"):
        _model().set_image_reduction(ImageReduction.parse("5", "fastv", 4))


def test_training_and_adaptation_take_fastv(tmp_path):
    from edgeqtl.cli import main
    from edgeqtl.models.load import load_split_model

    out = tmp_path / "tiny"
    run = CliRunner().invoke(main, ["train", "--preset", "tiny", "--bits", "2", "--cut", "2", "--steps", "2",
                                    "--vision-steps", "0", "--probe", "none", "--image-tokens", "2", "--reducer",
                                    "fastv", "--out", str(out), "--quiet"])
    assert run.exit_code == 0, run.output
    assert json.loads((out / "edgeqtl_split.json").read_text())["image_reduction"]["reducer"] == "fastv"
    model = load_split_model(out)
    assert model.image_reduction == ImageReduction("fastv", 2) and model.num_image_tokens == 4
    from edgeqtl.models.adapt import AdaptConfig, Adapter
    from edgeqtl.models.batches import Collator, image_spec_of, world_example

    collate = Collator(shapes.prompts(model.num_image_tokens), image_spec_of(model))
    adapter = Adapter(model, collate, AdaptConfig(steps=1), {int(collate.prompts.eos_token_id)})
    rec = adapter.step(0, [world_example(s) for s in shapes.heldout(1)[:4]])
    assert all(torch.isfinite(torch.tensor(rec[k])) for k in ("kl", "ce", "recon"))


def test_a_fastv_bundle_answers_over_mosquitto_as_pytorch_does(tmp_path, mosquitto):
    """The device's codes hold K image rows; the frame says where they sat (ImageRef's
    span and map); its decode steps run over its own cache of every token."""
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.batches import Collator, image_spec_of, world_example
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.generate import generate
    from edgeqtl.models.load import load_prompts, load_split_model
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.server_agent.sampling import GenerationSettings
    from edgeqtl.transport import BrokerConfig, RequestClient
    from edgeqtl.wire import InferOptions

    save_checkpoint(_model(), tmp_path / "model")
    res = export_bundle(ExportOptions(tmp_path / "model", tmp_path / "bundle", verify_per_family=1, image_tokens="2",
                                      reducer="fastv"), progress=None)
    assert res.verification.ok, res.verification.table()  # prefill and decode graphs against PyTorch
    outputs = [o.name for o in res.manifest.graph("prefill").outputs]
    assert outputs[:3] == ["codes", "image_positions", "server_mask"]
    assert res.manifest.text.image_token_count == 4 and res.manifest.image_reduction["span"] == 4
    engine = load_engine(tmp_path / "bundle" / "server")
    engine.settings = GenerationSettings(eos_token_ids=(NEVER,), max_new_tokens=4)
    model = load_split_model(tmp_path / "model", reduction=ImageReduction("fastv", 2))
    collate = Collator(load_prompts(tmp_path / "model", model), image_spec_of(model))
    cfg = BrokerConfig(port=mosquitto.port)
    client = DeviceClient(tmp_path / "bundle")
    with ServerAgent(engine, cfg), RequestClient(cfg, "pi-fastv") as t:
        for s in shapes.heldout(2)[:4]:
            answer = client.ask(t, s.image, s.question)
            batch = collate([world_example(s)], with_answer=False)
            assert answer.token_ids == generate(model, batch, 4, {NEVER})[0] and answer.round_trips == 4
    frame = client.request_frame(s.image, s.question)
    ref = InferOptions.from_json(frame.parts()[-1].json()).image
    assert (ref.tokens, ref.span, len(ref.kept)) == (2, 4, 2)
    assert frame.parts()[0].shape[1] == batch.input_ids.shape[1] - 2  # two image rows fewer than the prompt
    expected = model.client(batch.input_ids, batch.attention_mask, batch.pixel_values)
    assert torch.equal(engine._prompt(frame)[3], expected.attention_mask)


def test_the_cli_offers_every_reducer():
    from edgeqtl.cli.model import REDUCER_CHOICES
    from edgeqtl.models.reduce import REDUCERS

    assert tuple(REDUCER_CHOICES) == REDUCERS


def test_fastv_trains_split_with_the_labels_of_the_rows_it_sends(tmp_path):
    """Over the wire (split training): the device sends K image rows and their labels; the
    server's loss is the one the same batch has in one process."""
    from edgeqtl.device_agent.links import LocalLink
    from edgeqtl.models.device_training import DeviceTrainer, ShapesShard
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.split import fingerprint
    from edgeqtl.models.steps import SplitTrainConfig, server_step
    from edgeqtl.server_agent.training import TrainingService
    from edgeqtl.wire import parse_train_request

    save_checkpoint(_model(), tmp_path / "model")
    cfg = SplitTrainConfig(steps=1, batch_size=8, warmup=2)
    server_model = load_split_model(tmp_path / "model")
    fp = bytes.fromhex(fingerprint(server_model))[:16]
    server = TrainingService(server_model, cfg, num_devices=1, fingerprint=fp)
    keep = ImageReduction("fastv", 2)
    model = load_split_model(tmp_path / "model", reduction=keep)
    dev = DeviceTrainer(model, ShapesShard(model, shapes.build_tokenizer(), cfg, 0, 1, None), cfg, "dev0",
                        fingerprint=fp)
    frame, out, batch = dev.request(1)  # batch.labels: those of the rows sent
    req = parse_train_request(frame)
    assert req.labels.shape == req.attention_mask.shape == tuple(out.wire.shape[:2])
    assert out.wire.shape[1] == out.device_mask.shape[1] - 2  # two of the four image rows stay on the device
    loss = dev.apply(1, out, LocalLink(server).request(frame))["loss"]
    ref = load_split_model(tmp_path / "model", reduction=keep)
    whole = dev.batches(0)  # the step's batch as drawn, every row's labels
    wire = ref.client(whole.input_ids, whole.attention_mask, whole.pixel_values, labels=whole.labels).wire
    assert loss == pytest.approx(float(server_step(ref.server, ref.server.receive(wire), batch.labels,
                                                   out.attention_mask).loss), rel=1e-4)


def test_training_ranks_from_the_prompts_last_token_not_the_answers():
    """A batch with answers after its prompts keeps the image tokens the same prompts keep
    alone (at inference): FastV's query is the prompt's last position."""
    model = _model(k=2)
    with_answers, prompts = _batch(model, with_answer=True), _batch(model)
    with torch.no_grad():
        trained = model.client(with_answers.input_ids, with_answers.attention_mask, with_answers.pixel_values,
                               labels=with_answers.labels)
        asked = model.client(prompts.input_ids, prompts.attention_mask, prompts.pixel_values)
        blind = model.client(with_answers.input_ids, with_answers.attention_mask, with_answers.pixel_values)
    assert torch.equal(trained.image_positions, asked.image_positions)
    assert not torch.equal(blind.image_positions, asked.image_positions)  # the answer's last token ranks otherwise


def test_calibrate_measures_a_fastv_model(tmp_path):
    from edgeqtl.export.calibration import world_samples
    from edgeqtl.models.batches import image_spec_of
    from edgeqtl.models.rate import calibrate

    model, every = _model(k=2), _model()
    prompts = shapes.prompts(model.num_image_tokens)
    cal, full = (calibrate(m, world_samples(8, heldout=False), prompts, image_spec_of(m), 4, False, levels=(2, 4))
                 for m in (model, every))
    assert full.elements - cal.elements == 8 * 2 * model.split.code_dim  # two image rows fewer a question
    assert cal.row(4).levels == 4


def test_fastv_refuses_a_row_without_its_image():
    model = _model(k=2)
    b = _batch(model, n=2)
    ids = b.input_ids.clone()
    ids[1][ids[1] == model.client.image_token_id] = 5  # the second row's image tokens made text
    with pytest.raises(UnsupportedModelError, match="one image of 4 tokens in every row"):
        model.client(ids, b.attention_mask, b.pixel_values)
