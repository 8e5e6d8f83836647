"""Label-private (U-shaped) split training and device sampling per fedavg round: the
server never receives an answer id; steps apply exactly once across restarts of either
side; a round averages exactly its participants' weights and leaves stragglers out."""
from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
import torch

from edgeqtl import shapes
from edgeqtl.codec import Codec
from edgeqtl.device_agent.links import LocalLink
from edgeqtl.models.device_training import DeviceTrainer, ShapesShard, run_device
from edgeqtl.errors import CodedError
from edgeqtl.models.load import load_split_model
from edgeqtl.models.split import SplitConfig, SplitModel, fingerprint
from edgeqtl.models.steps import SplitTrainConfig
from edgeqtl.server_agent.training import FedAvgRounds, TrainingService
from edgeqtl.wire import IGNORE_LABEL, FrameKind, decode_frame, encode_frame

CFG = SplitTrainConfig(steps=6, batch_size=8, checkpoint_every=2, warmup=2, private_labels=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.presets import build_tiny

    d = tmp_path_factory.mktemp("private") / "model"
    save_checkpoint(SplitModel(build_tiny(3), SplitConfig(cut=0, levels=4)), d)
    return d


def _server(model_dir, cfg, n=1, state=None):
    model = load_split_model(model_dir)
    return TrainingService(model, cfg, state_dir=state, num_devices=n, fingerprint=bytes.fromhex(fingerprint(model))[:16])


def _device(model_dir, cfg, i=0, n=1, state=None, fp=bytes(16), alpha=None):
    model = load_split_model(model_dir)
    return DeviceTrainer(model, ShapesShard(model, shapes.build_tokenizer(), cfg, i, n, alpha), cfg, f"dev{i}",
                         state_dir=state, fingerprint=fp)


class Recording:
    """A link that keeps every frame the server receives, as bytes off the wire."""

    def __init__(self, service):
        self.service, self.received = service, []

    def request(self, frame):
        data = encode_frame(frame)
        self.received.append(data)
        return self.service.handle(decode_frame(data))


def _integers_in(data: bytes) -> list[np.ndarray]:
    """Every integer a received frame carries outside its codes and bit maps: INT32 parts
    and the numbers of its JSON parts."""
    found = []
    for p in decode_frame(data).parts():
        if p.codec == Codec.INT32:
            found.append(p.array().ravel())
        elif p.codec == Codec.JSON:
            found.append(np.array([v for v in json.loads(p.payload).values() if isinstance(v, int)], dtype=np.int64))
    return found


def _answers_leak(received: list[bytes], answer_ids: list[np.ndarray]) -> bool:
    """Whether some frame carries some batch's answer ids, in order."""
    for data in received:
        for ints in _integers_in(data):
            if any(len(a) and len(ints) >= len(a) and np.array_equal(ints[:len(a)], a) for a in answer_ids):
                return True
    return False


@pytest.mark.parametrize("private", [False, True])
def test_the_server_never_receives_an_answer_id_and_loss_falls(model_dir, private):
    cfg = dataclasses.replace(CFG, steps=30, private_labels=private)
    server = _server(model_dir, cfg)
    dev = _device(model_dir, cfg, fp=server.fingerprint)
    link = Recording(server)
    losses, answers = [], []
    for step in range(1, cfg.steps + 1):
        labels = dev.batches(step - 1).labels.numpy()
        answers.append(labels[labels != IGNORE_LABEL])
        losses.append(dev.train_step(step, link)["loss"])
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    kinds = {decode_frame(d).kind for d in link.received}
    if private:
        assert kinds == {FrameKind.TRUNK_REQUEST, FrameKind.HEAD_GRADIENT}
        assert not _answers_leak(link.received, answers)
        # the server's own head did not train: the device's did
        fresh = load_split_model(model_dir).server
        assert torch.equal(server.server.lm_head.weight, fresh.lm_head.weight)
        assert not torch.equal(dev.model.server.lm_head.weight, fresh.lm_head.weight)
    else:  # the check finds the labels where the standard protocol sends them
        assert kinds == {FrameKind.TRAIN_REQUEST} and _answers_leak(link.received, answers)
    assert {d: led.applied for d, led in server.ledgers.items()} == {"dev0": cfg.steps}


def test_both_sides_must_agree_on_label_privacy(model_dir):
    server = _server(model_dir, CFG)
    standard = _device(model_dir, dataclasses.replace(CFG, private_labels=False), fp=server.fingerprint)
    frame, _, _ = standard.request(1)
    reply = server.handle(frame)
    assert reply.kind == FrameKind.ERROR and reply.json()["code"] == "label_privacy"
    assert "--private-labels" in reply.json()["message"]


def test_repeats_get_the_same_replies_and_a_lost_trunk_pass_is_asked_again(model_dir, tmp_path):
    cfg = dataclasses.replace(CFG, checkpoint_every=100)
    server = _server(model_dir, cfg, state=tmp_path)
    dev = _device(model_dir, cfg, fp=server.fingerprint)
    frame, out, batch = dev.request(1)
    hidden = server.handle(frame)
    assert server.handle(frame).parts()[0].payload == hidden.parts()[0].payload  # a retry: no second forward
    head, _ = dev.head_gradient(1, batch, hidden)
    grad = server.handle(head)
    assert grad.kind == FrameKind.GRADIENT and server.ledgers["dev0"].applied == 1
    assert server.handle(head).parts()[0].payload == grad.parts()[0].payload  # a retry: not applied again
    assert server.handle(frame).parts()[0].payload == hidden.parts()[0].payload  # a replay after the step
    dev.apply(1, out, grad, zero_grad=False)
    # the server restarts between the two exchanges of step 2: the pass comes back from its log
    frame2, out2, batch2 = dev.request(2)
    head2, _ = dev.head_gradient(2, batch2, server.handle(frame2))
    server.close()
    restarted = _server(model_dir, cfg, state=tmp_path)
    assert restarted.ledgers["dev0"].step == 1 and restarted.ledgers["dev0"].pending.step == 2
    dev.apply(2, out2, restarted.handle(head2), zero_grad=False)
    # a pass the server does not have: the device is asked for the first exchange again
    frame3, _, batch3 = dev.request(3)
    head3, _ = dev.head_gradient(3, batch3, restarted.handle(frame3))
    restarted.ledgers["dev0"].pending = None
    err = restarted.handle(head3)
    assert err.kind == FrameKind.ERROR and err.json()["code"] == "resubmit"
    run_device(dev, LocalLink(restarted))  # step 3 again, whole
    assert {d: (led.step, led.applied) for d, led in restarted.ledgers.items()} == {"dev0": (cfg.steps, cfg.steps)}


def test_restarts_of_either_side_apply_each_step_once(model_dir, tmp_path):
    """The device crashes after step 5 (checkpoint at 4) and replays step 5 with the very
    hidden states and gradient it had; the server is killed after step 7 and restarts from
    its checkpoint and write-ahead log. Every step applies once, and the result equals an
    uninterrupted run's."""
    cfg = dataclasses.replace(CFG, steps=10, checkpoint_every=4)
    reference_server = _server(model_dir, cfg)
    reference = _device(model_dir, cfg, fp=reference_server.fingerprint)
    run_device(reference, LocalLink(reference_server))

    server = _server(model_dir, cfg, state=tmp_path / "server")
    dev = _device(model_dir, cfg, state=tmp_path / "device", fp=server.fingerprint)
    for step in range(1, 6):
        dev.train_step(step, LocalLink(server))
        if step == 4:
            dev.save()
    crashed = _device(model_dir, cfg, state=tmp_path / "device", fp=server.fingerprint)
    assert crashed.step == 4
    for step in (5, 6, 7):
        crashed.train_step(step, LocalLink(server))
    server.close()  # killed: no save; steps 5-7 are in the write-ahead log only
    server = _server(model_dir, cfg, state=tmp_path / "server")
    assert server.ledgers["dev0"].step == 7
    run_device(crashed, LocalLink(server))
    assert {d: (led.step, led.applied) for d, led in server.ledgers.items()} == {"dev0": (cfg.steps, cfg.steps)}
    assert np.allclose(crashed.flat_weights(), reference.flat_weights(), atol=1e-5)
    for a, b in zip(server.server.parameters(), reference_server.server.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_checkpoint_between_the_two_exchanges_keeps_the_pass(model_dir, tmp_path):
    """dev0's trunk pass is pending when dev1's step makes the server checkpoint (and clear
    its log); dev0's step then applies, the server is killed and restarts: the step is
    there, once."""
    cfg = dataclasses.replace(CFG, steps=4, checkpoint_every=3)
    server = _server(model_dir, cfg, n=2, state=tmp_path)
    dev0, dev1 = (_device(model_dir, cfg, i, 2, fp=server.fingerprint) for i in range(2))
    link = LocalLink(server)
    dev0.train_step(1, link)
    dev1.train_step(1, link)
    frame, out, batch = dev0.request(2)
    hidden = link.request(frame)
    dev1.train_step(2, link)  # the third server step: a checkpoint
    head, _ = dev0.head_gradient(2, batch, hidden)
    dev0.apply(2, out, link.request(head), zero_grad=False)
    server.close()
    server = _server(model_dir, cfg, n=2, state=tmp_path)
    assert {d: (led.step, led.applied) for d, led in server.ledgers.items()} == {"dev0": (2, 2), "dev1": (2, 2)}
    for d in (dev0, dev1):
        run_device(d, LocalLink(server))
    assert {d: (led.step, led.applied) for d, led in server.ledgers.items()} == {"dev0": (4, 4), "dev1": (4, 4)}


def test_the_merged_label_private_model_exports_and_answers(model_dir, tmp_path):
    from click.testing import CliRunner

    from edgeqtl.cli import main
    from edgeqtl.models.jobs import eval_world
    from edgeqtl.models.load import load_prompts

    cfg = dataclasses.replace(CFG, steps=3)
    server = _server(model_dir, cfg, state=tmp_path / "state")
    dev = _device(model_dir, cfg, state=tmp_path / "state", fp=server.fingerprint)
    run_device(dev, LocalLink(server))
    server.save()
    server.close()
    r = CliRunner().invoke(main, ["merge", "--model", str(model_dir), "--server-state", str(tmp_path / "state"),
                                  "--device-state", str(tmp_path / "state"), "--device-id", "dev0",
                                  "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    merged = load_split_model(tmp_path / "merged")
    assert torch.equal(merged.server.lm_head.weight, dev.model.server.lm_head.weight)  # the device's head
    assert torch.equal(merged.server.norm.weight, dev.model.server.norm.weight)
    assert torch.equal(merged.server.layers[0].mlp.up_proj.weight, server.server.layers[0].mlp.up_proj.weight)
    report = eval_world(merged, load_prompts(tmp_path / "merged", merged), 4)
    assert report.n == 4 * len(shapes.FAMILIES)
    r = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "merged"), "--out", str(tmp_path / "b"),
                                  "--no-verify"])
    assert r.exit_code == 0 and (tmp_path / "b" / "manifest.json").is_file(), r.output


# --------------------------------------------------------------------------- device sampling


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _fetch(rounds, r, device):
    try:
        return rounds.average(r, device)
    except CodedError as e:
        return e.code


def test_each_round_averages_exactly_its_sampled_devices():
    devices = [f"dev{i}" for i in range(10)]
    weights = {d: np.full(3, float(i), np.float32) for i, d in enumerate(devices)}
    rounds = FedAvgRounds(10, per_round=2, seed=1)
    for d in devices[:9]:
        rounds.see(d)
    assert _fetch(rounds, 1, "dev0") == "not_ready"  # the sample waits for every device to be seen
    rounds.see(devices[9])
    samples = []
    for r in (1, 2, 3):
        sample = rounds.participants(r)
        assert len(sample) == 2 and set(sample) <= set(devices)
        samples.append(tuple(sample))
        for d in devices:  # everyone asks; only the sample is asked for weights
            assert _fetch(rounds, r, d) == ("resubmit" if d in sample else "not_ready")
        left_out = next(d for d in devices if d not in sample)
        assert rounds.submit(r, left_out, weights[left_out]) is False  # not counted
        for d in sample:
            assert rounds.submit(r, d, weights[d]) is True
        for d in devices:  # the average reaches every device, sampled or not
            assert np.array_equal(_fetch(rounds, r, d), np.mean([weights[d] for d in sample], axis=0))
        assert rounds.members[r] == sorted(sample)
    assert len(set(samples)) > 1  # a new choice each round
    again = FedAvgRounds(10, per_round=2, seed=1)
    for d in devices:
        again.see(d)
    assert tuple(again.participants(1)) == samples[0]


def test_a_straggler_past_the_deadline_is_left_out_and_the_round_completes():
    clock = Clock()
    rounds = FedAvgRounds(4, per_round=0, deadline_s=30.0, clock=clock)
    w = {f"dev{i}": np.full(2, float(i), np.float32) for i in range(4)}
    for d in ("dev0", "dev1", "dev2"):
        rounds.submit(1, d, w[d])
    clock.t = 29.0
    assert _fetch(rounds, 1, "dev0") == "not_ready"
    clock.t = 31.0
    assert np.array_equal(_fetch(rounds, 1, "dev0"), np.full(2, 1.0))  # mean of 0, 1, 2
    assert rounds.submit(1, "dev3", w["dev3"]) is False  # the straggler, late
    assert np.array_equal(_fetch(rounds, 1, "dev3"), np.full(2, 1.0))  # and it gets the average too
    first = FedAvgRounds(4, per_round=2, sampling="first")
    first.submit(1, "dev3", w["dev3"])
    assert _fetch(first, 1, "dev0") == "resubmit"
    first.submit(1, "dev0", w["dev0"])
    assert np.array_equal(_fetch(first, 1, "dev1"), np.full(2, 1.5)) and first.members[1] == ["dev0", "dev3"]


def test_devices_train_with_two_of_four_per_round(model_dir):
    cfg = dataclasses.replace(CFG, steps=4, fedavg_every=2, devices_per_round=2, private_labels=False)
    server = _server(model_dir, cfg, n=4)
    devices = [_device(model_dir, cfg, i, 4, fp=server.fingerprint) for i in range(4)]
    before_round = {d.device_id: {} for d in devices}
    after_round = {d.device_id: {} for d in devices}
    link = LocalLink(server)
    real = link.request

    def request(frame):  # what each device holds when it submits
        if frame.kind == FrameKind.FEDAVG_SUBMIT:
            before_round[frame.device_id][frame.step] = frame.parts()[0].array().copy()
        return real(frame)

    link.request = request

    def on_step(trainer, info):
        if trainer.step % cfg.fedavg_every == 0:
            after_round[trainer.device_id][trainer.step // cfg.fedavg_every] = trainer.flat_weights()

    threads = [threading.Thread(target=run_device, args=(d, link, on_step)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r in (1, 2):
        members = server.rounds.samples[r]
        assert len(members) == 2 and sorted(before_round[m].get(r) is not None for m in members) == [True, True]
        assert not any(r in before_round[d.device_id] for d in devices if d.device_id not in members)
        expected = np.mean([before_round[m][r] for m in members], axis=0)
        for d in devices:
            assert np.allclose(after_round[d.device_id][r], expected)
