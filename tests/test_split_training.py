"""Split training: devices and a server trainer exchanging frames, in process and over
mosquitto; exactly-once steps across a server kill; split-federated averaging."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from edgeqtl import shapes
from edgeqtl.models.load import load_split_model
from edgeqtl.models.split import SplitConfig, SplitModel, fingerprint
from edgeqtl.device_agent.links import LocalLink, RetryingLink
from edgeqtl.models.device_training import DeviceTrainer, ShapesShard, run_device
from edgeqtl.errors import CodedError
from edgeqtl.models.steps import SplitTrainConfig
from edgeqtl.server_agent.training import TrainingService
from edgeqtl.shapes import family_mix
from edgeqtl.wire import FrameKind

CFG = SplitTrainConfig(steps=6, batch_size=8, checkpoint_every=2, warmup=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("split-train") / "model"
    save_checkpoint(SplitModel(build_tiny(3), SplitConfig(cut=0, levels=4)), d)
    return d


def _sides(model_dir, cfg, n=2, state=None, alpha=None):
    server_model = load_split_model(model_dir)
    fp = bytes.fromhex(fingerprint(server_model))[:16]
    server = TrainingService(server_model, cfg, state_dir=state, num_devices=n, fingerprint=fp)
    devices = [_device(model_dir, cfg, i, n, alpha, state, fp) for i in range(n)]
    return server, devices


def _device(model_dir, cfg, i=0, n=1, alpha=None, state=None, fp=bytes(16)):
    model = load_split_model(model_dir)
    return DeviceTrainer(model, ShapesShard(model, shapes.build_tokenizer(), cfg, i, n, alpha), cfg, f"dev{i}",
                         state_dir=state, fingerprint=fp)


def _applied(service) -> dict:
    """device -> (last step applied, steps applied): equal when each step was applied once."""
    return {d: (ledger.step, ledger.applied) for d, ledger in service.ledgers.items()}


def test_two_devices_train_in_process_and_loss_falls(model_dir):
    cfg = dataclasses.replace(CFG, steps=30, lr=3e-3, grad_codec="int8")
    server, devices = _sides(model_dir, cfg)
    losses = {d.device_id: [] for d in devices}
    link = LocalLink(server)
    # alternate the devices step by step, as two devices on one broker would
    for _ in range(cfg.steps):
        for d in devices:
            step = d.step + 1
            frame, out, _ = d.request(step)
            reply = link.request(frame)
            losses[d.device_id].append(d.apply(step, out, reply)["loss"])
            d.count_bytes([frame], [reply])
    for d in devices:
        first, last = np.mean(losses[d.device_id][:5]), np.mean(losses[d.device_id][-5:])
        assert last < 0.7 * first, (d.device_id, first, last)
        # 8-bit gradients with a float32 scale per 128-value row (132/256 of fp16), headers included
        assert d.bytes_down < 0.55 * d.fp16_down
        assert d.bytes_up < 0.2 * d.fp16_up  # 2-bit codes
    assert _applied(server) == {d.device_id: (cfg.steps, cfg.steps) for d in devices}


def test_only_the_chosen_client_parts_train(model_dir):
    server, (dev,) = _sides(model_dir, dataclasses.replace(CFG, steps=2), n=1)
    before = {n: p.detach().clone() for n, p in dev.client.named_parameters()}
    run_device(dev, LocalLink(server))
    changed = {n.split(".")[0] for n, p in dev.client.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"projector", "encoder"}
    with pytest.raises(CodedError, match="unknown trainable"):
        _device(model_dir, dataclasses.replace(CFG, trainable=("lm_head",)))


def test_non_iid_shards_follow_a_dirichlet_mix():
    mixes = np.stack([family_mix(i, 4, 0.3, seed=0) for i in range(4)])
    assert np.allclose(mixes.sum(1), 1) and mixes.max(1).min() > 0.35  # skewed: each device favours a family
    assert np.allclose(family_mix(0, 4, None, 0), 0.2)


def test_fedavg_leaves_identical_trainable_weights(model_dir):
    import threading

    cfg = dataclasses.replace(CFG, steps=4, fedavg_every=2)
    server, devices = _sides(model_dir, cfg)
    snapshots = {d.device_id: {} for d in devices}

    def on_step(trainer, info):
        if trainer.step % cfg.fedavg_every == 0:
            snapshots[trainer.device_id][trainer.step] = trainer.flat_weights()

    link = LocalLink(server)
    threads = [threading.Thread(target=run_device, args=(d, link, on_step)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    a, b = (snapshots[d.device_id] for d in devices)
    assert sorted(a) == sorted(b) == [2, 4]
    for step in a:
        assert np.array_equal(a[step], b[step])  # right after each averaging round
    assert not np.array_equal(a[2], a[4])  # and they did train in between


def test_server_refuses_gaps_and_answers_repeats_from_its_record(model_dir):
    server, (dev,) = _sides(model_dir, CFG, n=1)
    frame, out, _ = dev.request(1)
    first = server.handle(frame)
    assert first.kind == FrameKind.GRADIENT
    again = server.handle(frame)  # a retry: same gradient, not a second update
    assert again.parts()[0].payload == first.parts()[0].payload and _applied(server) == {"dev0": (1, 1)}
    gap, _, _ = dev.request(3)
    err = server.handle(gap)
    assert err.kind == FrameKind.ERROR and err.json()["code"] == "step_gap"
    wrong = dataclasses.replace(frame, fingerprint=bytes(16))
    assert server.handle(wrong).json()["code"] == "fingerprint_mismatch"


def test_device_restarted_from_its_checkpoint_replays_without_double_updates(model_dir, tmp_path):
    """The device crashes after step 5 with its checkpoint at step 4: it replays step 5
    with the stored gradient; the server applies every step once."""
    cfg = dataclasses.replace(CFG, steps=6, checkpoint_every=4)
    server, (dev,) = _sides(model_dir, cfg, n=1, state=tmp_path)
    link = LocalLink(server)
    for step in range(1, 6):
        frame, out, _ = dev.request(step)
        dev.apply(step, out, link.request(frame))
        if step == 4:
            dev.save()
    reference = dev.flat_weights()
    crashed = _device(model_dir, cfg, state=tmp_path, fp=server.fingerprint)
    assert crashed.step == 4
    frame, out, _ = crashed.request(5)
    crashed.apply(5, out, link.request(frame))
    assert np.allclose(crashed.flat_weights(), reference, atol=1e-6)
    run_device(crashed, link)
    server.close()
    assert _applied(server) == {"dev0": (6, 6)}


@pytest.mark.parametrize("private", [False, True], ids=["standard", "label-private"])
def test_server_killed_mid_training_resumes_exactly_once(model_dir, mosquitto, tmp_path, private):
    """`edgeqtl server --train` is SIGKILLed mid-run and started again on the same state
    directory; two devices train to the end. The server's record of applied steps (from
    its checkpoint plus write-ahead log) shows every step of each device exactly once."""
    import json
    import threading

    from edgeqtl.transport import BrokerConfig, RequestClient

    cfg = dataclasses.replace(CFG, steps=24, checkpoint_every=5, private_labels=private)
    state = tmp_path / "server-state"
    cmd = [sys.executable, "-m", "edgeqtl.cli", "server", "train", "--model", str(model_dir), "--broker",
           f"mqtt://127.0.0.1:{mosquitto.port}", "--state-dir", str(state), "--devices", "2", "--steps",
           str(cfg.steps), "--batch-size", str(cfg.batch_size), "--checkpoint-every", "5", "--threads", "1",
           *(["--private-labels"] if private else [])]

    def start(log):
        with log.open("w") as err:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 90
        while "training server on" not in log.read_text():
            assert p.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
        return p

    first = start(tmp_path / "s1.log")
    devices = _sides(model_dir, cfg, n=2)[1]
    progress = threading.Semaphore(0)
    errors = []

    def device(d):
        try:
            with RequestClient(BrokerConfig(port=mosquitto.port), d.device_id) as t:
                run_device(d, RetryingLink(t, timeout=3, retries=40), on_step=lambda *_: progress.release())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=device, args=(d,)) for d in devices]
    second = None
    try:
        for t in threads:
            t.start()
        for _ in range(14):
            assert progress.acquire(timeout=60)
        first.kill()
        first.wait(10)
        second = start(tmp_path / "s2.log")
        for t in threads:
            t.join(180)
    finally:
        for p in (first, second):
            if p is not None:
                p.terminate()
                p.wait(20)
    assert not errors, errors
    assert first.returncode == -9
    assert [d.step for d in devices] == [cfg.steps, cfg.steps]
    meta = json.loads((state / "server.json").read_text())  # saved on a clean stop
    # every step of each device applied exactly once: as many applied as the last step
    assert meta["devices"] == {d.device_id: {"step": cfg.steps, "applied": cfg.steps} for d in devices}


def test_merged_result_exports(model_dir, tmp_path):
    from click.testing import CliRunner

    from edgeqtl.cli import main

    cfg = dataclasses.replace(CFG, steps=3)
    server, (dev,) = _sides(model_dir, cfg, n=1, state=tmp_path / "state")
    run_device(dev, LocalLink(server))
    server.save()
    server.close()
    r = CliRunner().invoke(main, ["merge", "--model", str(model_dir), "--server-state", str(tmp_path / "state"),
                                  "--device-state", str(tmp_path / "state"), "--device-id", "dev0",
                                  "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    merged = load_split_model(tmp_path / "merged")
    assert torch.equal(merged.server.lm_head.weight, server.server.lm_head.weight)
    assert torch.equal(merged.client.projector.linear_1.weight, dev.client.projector.linear_1.weight)
    r = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "merged"), "--out", str(tmp_path / "b"),
                                  "--no-verify"])
    assert r.exit_code == 0 and (tmp_path / "b" / "manifest.json").is_file(), r.output
    r = CliRunner().invoke(main, ["merge", "--model", str(model_dir), "--server-state", str(tmp_path),
                                  "--device-state", str(tmp_path / "state"), "--device-id", "dev0",
                                  "--out", str(tmp_path / "m2")])
    assert r.exit_code != 0 and "no server checkpoint" in r.output


def test_a_reduced_image_trains_split_at_its_original_positions(model_dir):
    """The kept image tokens' position steps go up with the codes (an INT32 part), and the
    server's loss is the one the same batch has in one process: not the one it would have
    at consecutive positions."""
    from edgeqtl.models.reduce import ImageReduction
    from edgeqtl.models.steps import server_step
    from edgeqtl.wire import parse_train_request

    cfg = dataclasses.replace(CFG, steps=1)
    keep = ImageReduction("random", 2, seed=1)
    server_model = load_split_model(model_dir)
    fp = bytes.fromhex(fingerprint(server_model))[:16]
    server = TrainingService(server_model, cfg, num_devices=1, fingerprint=fp)
    model = load_split_model(model_dir, reduction=keep)
    dev = DeviceTrainer(model, ShapesShard(model, shapes.build_tokenizer(), cfg, 0, 1, None), cfg, "dev0",
                        fingerprint=fp)
    frame, out, batch = dev.request(1)
    steps = parse_train_request(frame).attention_mask
    assert steps.max() > 1 and np.array_equal(steps, out.attention_mask.numpy())
    loss = dev.apply(1, out, LocalLink(server).request(frame))["loss"]
    ref = load_split_model(model_dir, reduction=keep)
    wire = ref.client(batch.input_ids, batch.attention_mask, batch.pixel_values).wire
    at = lambda mask: float(server_step(ref.server, ref.server.receive(wire), batch.labels, mask).loss)  # noqa: E731
    assert loss == pytest.approx(at(out.attention_mask), rel=1e-4)
    assert abs(at(batch.attention_mask) - loss) > 1e-3  # consecutive positions give another loss
