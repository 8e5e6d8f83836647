"""`edgeqtl bench training`: split training with two devices over a real mosquitto against
the very same steps in one process.

Both runs start from the same split model, with the same seed, shards, schedule and
gradient codec (int8, the default of `edgeqtl server train`); the two devices take turns
(device 0's step 1, device 1's step 1, device 0's step 2, ...), in process as over MQTT,
so the two runs apply the same updates in the same order and should end with the same
weights. What differs is the way: in process, each frame is encoded and decoded and
handed to the training service (device_agent.links.LocalLink); over MQTT, each device has
its own connection and thread and the training service answers behind a Responder.

Measured: time per step both ways (the overhead of the broker, the threads and the
frames), bytes per step up and down against 16-bit both ways, and whether the results
match: every step's loss, the trunk's weights and each device's trainable weights.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

TITLE = "Split training over MQTT against the same steps in one process"

NUM_DEVICES = 2
GRAD_CODEC = "int8"
FULL = {"steps": 100, "batch_size": 32}
QUICK = {"steps": 10, "batch_size": 8}
LR = 1e-3  # the models start trained (the_model): a gentle rate, as `edgeqtl device train --help` advises
STEP_TIMEOUT_S = 120.0  # one step over MQTT; beyond this the run fails, named
MATCH_TOLERANCE = 1e-5  # largest absolute difference still counted as the same result


def run(ctx):
    import numpy as np
    import torch

    from edgeqtl.broker import MosquittoBroker, find_mosquitto
    from edgeqtl.models.steps import SplitTrainConfig

    from .fixtures import the_model
    from .report import Section, busy_machine_note, markdown_table

    if find_mosquitto() is None:
        raise RuntimeError("the training suite needs mosquitto (apt-get install mosquitto, or brew install mosquitto)")
    model_dir = the_model(ctx)
    size = QUICK if ctx.quick else FULL
    cfg = SplitTrainConfig(steps=size["steps"], batch_size=size["batch_size"], lr=LR,
                           warmup=max(1, size["steps"] // 10), checkpoint_every=10 ** 9, grad_codec=GRAD_CODEC, seed=0)
    # One torch thread for each party (each device, the service): they stand for separate machines, and
    # pools of two on two shared cores mostly wait at their barriers (in process it ran 5x slower so).
    threads = 1
    previous_threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    try:
        torch.set_num_threads(threads)
        ctx.echo(f"  in process: {NUM_DEVICES} devices x {cfg.steps} steps, batch {cfg.batch_size}")
        local = train_run(ctx, model_dir, cfg, None, threads)
        with MosquittoBroker() as broker:
            ctx.echo(f"  over MQTT: {NUM_DEVICES} devices x {cfg.steps} steps, batch {cfg.batch_size}")
            mqtt = train_run(ctx, model_dir, cfg, broker.port, threads)
    finally:
        torch.set_num_threads(previous_threads)

    match = compare(local, mqtt)
    runs = {}
    for name, r in (("in_process", local), ("mqtt", mqtt)):
        runs[name] = {k: v for k, v in r.items() if k not in ("state", "losses")}
        runs[name]["losses"] = [r["losses"][k] for k in sorted(r["losses"])]
    overhead = mqtt["seconds_per_step"] / local["seconds_per_step"]
    figures = {"model": str(model_dir), "devices": NUM_DEVICES, "steps_per_device": cfg.steps,
               "batch_size": cfg.batch_size, "grad_codec": cfg.grad_codec, "lr": cfg.lr,
               "trainable": list(cfg.trainable), "threads": threads, "data": str(ctx.data) if ctx.data else None,
               "runs": runs, "mqtt_vs_in_process_time": overhead, "match": match,
               "match_tolerance": MATCH_TOLERANCE,
               "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
               "cpu_count": os.cpu_count()}

    plot = _plot(ctx, local, mqtt)
    rows = [[label, r["steps"], r["seconds"], r["first_round_seconds"], 1e3 * r["seconds_per_step"],
             r["up_bytes_per_step"], r["up_fp16_bytes_per_step"], r["down_bytes_per_step"],
             r["down_fp16_bytes_per_step"], float(np.mean(runs[name]["losses"][-NUM_DEVICES:]))]
            for name, label, r in (("in_process", "in one process (LocalLink)", local),
                                   ("mqtt", "over MQTT (mosquitto)", mqtt))]
    table = markdown_table(["run", "steps (all devices)", "seconds", "first round s", "ms per later step",
                            "up B/step", "16-bit up B/step", "down B/step", "16-bit down B/step",
                            "last round's loss"], rows)
    verdict = ("the same" if match["same"] else "**not the same**")
    md = [f"Split training of `{model_dir}` by {NUM_DEVICES} devices taking turns, {cfg.steps} steps each "
          f"(batch {cfg.batch_size}, {cfg.grad_codec} gradients, lr {cfg.lr:g}, trainable on the devices: "
          f"{', '.join(cfg.trainable)}; data: {ctx.data or 'each device its own shard of the built-in world'}), "
          f"{threads} torch thread{'s' * (threads > 1)}: once with the training service in this process, once "
          "over mosquitto on loopback (each device its own MQTT connection and thread, the service behind a "
          "Responder).", "", table, "", "![loss per step and time per step](training.png)", "",
          "Time per step leaves out the first round (one step per device), which pays one-off costs: first "
          f"passes, connections. Over MQTT a step takes {overhead:.2f}x the time it takes in process "
          f"({1e3 * mqtt['seconds_per_step']:.1f} ms against {1e3 * local['seconds_per_step']:.1f} ms). "
          f"The results are {verdict}: the largest difference in a step's loss is {match['max_loss_diff']:.3g}, "
          f"in the trunk's weights {match['max_trunk_diff']:.3g}, in the devices' trainable weights "
          f"{match['max_client_diff']:.3g} (tolerance {MATCH_TOLERANCE:g}); steps applied once each: "
          f"{'yes' if match['applied_once'] else 'no'}.", "",
          f"Caveats: devices, service and broker share this machine's {os.cpu_count()} CPU cores (load average "
          f"{load_before:.1f} before, {figures['load_average_after']:.1f} after); loopback MQTT has no network "
          "delay, so the overhead here is the broker's, the frames' and the threads', not a link's (see the link "
          "suite). The turns fix the order of the steps, not of all work: over MQTT a device runs its next "
          "forward pass while the other device's step is with the service, which the in-process loop does one "
          "after the other, so over MQTT can come out faster on two cores."]
    md += busy_machine_note(load_before, "the times are stretched by other work")
    if ctx.quick:
        md += ["", f"Quick mode: {cfg.steps} steps per device on batches of {cfg.batch_size}: a check of the "
                   "machinery, not of training."]
    headline = [("split training time per step, over MQTT vs in one process",
                 f"{1e3 * mqtt['seconds_per_step']:.1f} ms vs {1e3 * local['seconds_per_step']:.1f} ms "
                 f"({overhead:.2f}x)"),
                ("split training over MQTT gives the in-process results",
                 f"{'yes' if match['same'] else 'no'} (largest loss difference {match['max_loss_diff']:.3g})")]
    return Section("training", TITLE, "\n".join(md), figures, [plot], headline)


# --------------------------------------------------------------------------- one run
def _load(model_dir: Path):
    import torch

    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.split import SPLIT_CONFIG_FILE, SplitConfig

    # a plain checkpoint (no split config of its own): cut at 0, 4 levels (2 bits), as the_model's default
    split = None if (Path(model_dir) / SPLIT_CONFIG_FILE).is_file() else SplitConfig(cut=0, levels=4)
    torch.manual_seed(0)  # a plain checkpoint's fresh quantizer: the same on every side
    return load_split_model(model_dir, split)


def _batches(ctx, model_dir: Path, model, cfg, index: int):
    """Device `index`'s own data: a shard of the user's records (--data) or of the world."""
    if ctx.data is not None:
        from edgeqtl.models.device_training import RecordBatches
        from edgeqtl.models.batches import Collator, image_spec_of
        from edgeqtl.models.jobs import DataOptions, checked
        from edgeqtl.models.load import load_prompts

        prompts = load_prompts(model_dir, model)
        records = checked(ctx.data, DataOptions(ctx.data, skip_bad=True), model, prompts, lambda line: None)
        shard = records[index::NUM_DEVICES]
        if not shard:
            raise RuntimeError(f"{ctx.data} has too few good records for {NUM_DEVICES} devices")
        return RecordBatches(Collator(prompts, image_spec_of(model)), shard, cfg.batch_size, cfg.seed + index)
    from edgeqtl import shapes
    from edgeqtl.models.load import world_of

    world = world_of(model_dir)
    if world is shapes:
        from edgeqtl.models.device_training import ShapesShard

        return ShapesShard(model, shapes.build_tokenizer(), cfg, index, NUM_DEVICES)
    return WorldShard(model, world, cfg, index)


class WorldShard:
    """Batch `step` of device `index`'s own stream of a world other than shapes (whose
    ShapesShard also follows the object-count curriculum)."""

    def __init__(self, model, world, cfg, index: int):
        from edgeqtl.models.batches import Collator, image_spec_of

        self.collate = Collator(world.prompts(model.num_image_tokens), image_spec_of(model))
        self.world, self.cfg, self.index = world, cfg, index

    def __call__(self, step: int):
        return self.collate(self.world.train_batch(self.cfg.seed, step, self.cfg.batch_size, stream=100 + self.index))


@dataclasses.dataclass
class TrainedRun:
    """What a run leaves: the service and devices as they ended, every step's loss and when
    each step was done, (step, device) -> value, and the wall time of the whole run."""

    service: object
    devices: list
    losses: dict
    done_at: dict
    started: float
    seconds: float


def train_devices(model_dir: Path, cfg, port: int | None, threads: int, batches_of,
                  num_devices: int = NUM_DEVICES, lockstep: bool = True) -> TrainedRun:
    """num_devices devices train cfg.steps steps each on one trunk; port None: in this
    process (LocalLink), else over the broker on that port. `batches_of(model, index)`
    gives device index's batches. lockstep: over MQTT too the devices take turns, as in
    process (False: each runs as fast as it can)."""
    from edgeqtl.models.device_training import DeviceTrainer
    from edgeqtl.models.split import fingerprint
    from edgeqtl.server_agent.training import TrainingService

    base = _load(model_dir)
    fp = bytes.fromhex(fingerprint(base))[:16]
    service = TrainingService(base, cfg, num_devices=num_devices, fingerprint=fp)
    devices = []
    for i in range(num_devices):
        model = _load(model_dir)
        devices.append(DeviceTrainer(model, batches_of(model, i), cfg, f"bench-train-{i}", fingerprint=fp))
    losses: dict[tuple[int, int], float] = {}  # (step, device) -> the loss the service reported
    done_at: dict[tuple[int, int], float] = {}  # (step, device) -> when the device had applied it
    t0 = time.perf_counter()
    if port is None:
        from edgeqtl.device_agent.links import LocalLink

        link = LocalLink(service)
        for step in range(1, cfg.steps + 1):
            for i, d in enumerate(devices):
                losses[(step, i)] = d.train_step(step, link)["loss"]
                done_at[(step, i)] = time.perf_counter()
    else:
        _train_over_mqtt(service, devices, port, threads, losses, done_at, lockstep)
    return TrainedRun(service, devices, losses, done_at, t0, time.perf_counter() - t0)


def train_run(ctx, model_dir: Path, cfg, port: int | None, threads: int) -> dict:
    """The suite's run: times, bytes, every step's loss and the final weights."""
    import torch

    r = train_devices(model_dir, cfg, port, threads, lambda model, i: _batches(ctx, model_dir, model, cfg, i))
    devices, n = r.devices, sum(d.step for d in r.devices)
    # The first round pays one-off costs (first passes, connections): time per step counts the rest.
    first_round = max(t for (step, _), t in r.done_at.items() if step == 1) - r.started
    later = max(r.done_at.values()) - r.started - first_round
    steady = later / (n - len(devices)) if n > len(devices) else r.seconds / n
    with torch.no_grad():
        state = {"trunk": {k: v.detach().clone() for k, v in r.service.server.state_dict().items()},
                 "clients": [{name: p.detach().clone() for name, p in zip(d.names, d.params)} for d in devices]}
    return {"steps": n, "seconds": r.seconds, "first_round_seconds": first_round, "seconds_per_step": steady,
            "up_bytes_per_step": sum(d.bytes_up for d in devices) / n,
            "down_bytes_per_step": sum(d.bytes_down for d in devices) / n,
            "up_fp16_bytes_per_step": sum(d.fp16_up for d in devices) / n,
            "down_fp16_bytes_per_step": sum(d.fp16_down for d in devices) / n,
            "applied": {dev: ledger.applied for dev, ledger in r.service.ledgers.items()},
            "device_steps": [d.step for d in devices], "losses": r.losses, "state": state}


def _train_over_mqtt(service, devices, port: int, threads: int, losses: dict, done_at: dict, lockstep: bool) -> None:
    """Each device a thread with its own connection; with lockstep a turn token keeps the
    in-process order."""
    import torch

    from edgeqtl.models.device_training import run_device
    from edgeqtl.transport import BrokerConfig, RequestClient, Responder

    broker = BrokerConfig(port=port)
    turn = threading.Condition()
    state = {"next": 0, "failed": None}

    class TakingTurns:
        """The device's link: waits for its turn, sends, passes the turn on."""

        def __init__(self, transport, index: int):
            self.transport, self.index = transport, index

        def request(self, frame):
            if not lockstep:
                return self.transport.request(frame, timeout=STEP_TIMEOUT_S, retries=0)
            with turn:
                if not turn.wait_for(lambda: state["next"] == self.index or state["failed"], STEP_TIMEOUT_S):
                    raise TimeoutError(f"device {self.index} waited {STEP_TIMEOUT_S:.0f} s for its turn")
                if state["failed"]:
                    raise RuntimeError("the other device stopped")
            try:
                return self.transport.request(frame, timeout=STEP_TIMEOUT_S, retries=0)
            finally:
                with turn:
                    state["next"] = (self.index + 1) % len(devices)
                    turn.notify_all()

    def device(i: int, d) -> None:
        torch.set_num_threads(threads)  # per thread: a new thread may not inherit the setting
        try:
            with RequestClient(broker, d.device_id) as transport:
                def on_step(trainer, info):
                    done_at[(trainer.step, i)] = time.perf_counter()
                    losses[(trainer.step, i)] = info["loss"]

                run_device(d, TakingTurns(transport, i), on_step=on_step)
        except Exception as e:  # noqa: BLE001 - raised below, after the other device stops
            with turn:
                state["failed"] = state["failed"] or f"device {i}: {type(e).__name__}: {e}"
                turn.notify_all()

    def handle_batch(frames):
        torch.set_num_threads(threads)
        return service.handle_batch(frames)

    with Responder(broker, handle_batch, group=None, client_id="bench-train-service"):
        workers = [threading.Thread(target=device, args=(i, d), daemon=True) for i, d in enumerate(devices)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + STEP_TIMEOUT_S * (devices[0].cfg.steps + 1) * len(devices)
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        if any(w.is_alive() for w in workers):
            with turn:
                state["failed"] = state["failed"] or "split training over MQTT did not finish in time"
                turn.notify_all()
            for w in workers:
                w.join(STEP_TIMEOUT_S)
    if state["failed"]:
        raise RuntimeError(f"split training over MQTT failed: {state['failed']}")


def compare(a: dict, b: dict) -> dict:
    """Whether two runs gave the same results: losses of every step, trunk, device weights."""
    if sorted(a["losses"]) != sorted(b["losses"]):
        raise RuntimeError("the two runs did not train the same steps")
    loss_diff = max(abs(a["losses"][k] - b["losses"][k]) for k in a["losses"])
    trunk_diff = max(float((a["state"]["trunk"][k].float() - b["state"]["trunk"][k].float()).abs().max())
                     for k in a["state"]["trunk"])
    client_diff = max(float((ca[k] - cb[k]).abs().max())
                      for ca, cb in zip(a["state"]["clients"], b["state"]["clients"]) for k in ca)
    applied_once = all(a["applied"].get(f"bench-train-{i}") == a["device_steps"][i] ==
                       b["applied"].get(f"bench-train-{i}") == b["device_steps"][i] for i in range(NUM_DEVICES))
    same = max(loss_diff, trunk_diff, client_diff) <= MATCH_TOLERANCE and applied_once
    return {"same": bool(same), "max_loss_diff": loss_diff, "max_trunk_diff": trunk_diff,
            "max_client_diff": client_diff, "bitwise_identical": max(loss_diff, trunk_diff, client_diff) == 0.0,
            "applied_once": bool(applied_once), "steps_compared": len(a["losses"])}


def _plot(ctx, local: dict, mqtt: dict) -> Path:
    from .report import new_figure, save_figure

    fig, _ = new_figure(9.0, 3.6)
    fig.clf()
    loss_ax, time_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    keys = sorted(local["losses"])  # (step, device): the order both runs applied them
    x = list(range(1, len(keys) + 1))
    loss_ax.plot(x, [local["losses"][k] for k in keys], "-", lw=2.5, alpha=0.6, label="in one process")
    loss_ax.plot(x, [mqtt["losses"][k] for k in keys], "--", lw=1.2, label="over MQTT")
    loss_ax.set_xlabel("server step (devices taking turns)")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("loss of every step")
    loss_ax.legend()
    time_ax.bar(["in process", "over MQTT"], [1e3 * local["seconds_per_step"], 1e3 * mqtt["seconds_per_step"]],
                color=["#888888", "#1f77b4"])
    time_ax.set_ylabel("ms per step")
    time_ax.set_title("time per step")
    return save_figure(fig, ctx.path("training.png"))
