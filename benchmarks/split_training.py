"""Split training with 2 devices: over a real mosquitto with compressed gradients,
against the same schedule in one process with exact (fp32) gradients.

    python benchmarks/split_training.py --model runs/start --steps 300
    python benchmarks/split_training.py            # starts from a short in-process run of the tiny preset

Every run starts from the same split model, with the same seeds, shards and steps; the
devices alternate on one trunk. Runs:
    in-process   LocalLink, fp32 gradients (no network, no compression): the reference
    mqtt-int8    two device threads and a server agent over mosquitto, 8-bit gradients
    mqtt-int4    the same, 4-bit unbiased stochastic gradients
Prints held-out accuracy (each device's client half with the shared trunk, mean of the
two) and bytes per step up and down against 16-bit both ways, frames whole.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def start_model(path: Path, steps: int) -> Path:
    """The tiny preset after a short in-process run: it can answer some questions, so
    that split training has something to improve and the comparison has a slope."""
    from edgeqtl import shapes
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.models.training import TrainConfig, train

    cfg = dataclasses.replace(TrainConfig(), steps=steps, curriculum_steps=min(600, steps // 3))
    train(SplitModel(build_tiny(0), SplitConfig(cut=0, levels=4)), shapes.build_tokenizer(), cfg, out_dir=path,
          progress=False)
    return path


def start_accuracy(model_dir: Path) -> float:
    import torch

    from edgeqtl import shapes
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.training import ShapesCollator, evaluate, image_spec_of

    model = load_split_model(model_dir)
    collate = ShapesCollator(shapes.build_tokenizer(), model.num_image_tokens, image_spec_of(model))
    with torch.no_grad():
        return evaluate(model, collate, shapes.heldout(100)).mean_accuracy


def evaluate_devices(server, devices, per_family: int) -> float:
    import torch

    from edgeqtl import shapes
    from edgeqtl.models.training import ShapesCollator, evaluate, image_spec_of

    accs = []
    for d in devices:
        model = d.model
        model.server.load_state_dict(server.server.state_dict())  # the shared trunk
        collate = ShapesCollator(shapes.build_tokenizer(), model.num_image_tokens, image_spec_of(model))
        with torch.no_grad():
            accs.append(evaluate(model, collate, shapes.heldout(per_family)).mean_accuracy)
    return float(np.mean(accs))


def run(name: str, model_dir: Path, cfg, port: int | None) -> dict:
    from edgeqtl import shapes
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.split import fingerprint
    from edgeqtl.models.split_training import DeviceTrainer, LocalLink, ServerTrainer, run_device

    base = load_split_model(model_dir)
    fp = bytes.fromhex(fingerprint(base))[:16]
    server = ServerTrainer(base, cfg, num_devices=2, fingerprint=fp)
    devices = [DeviceTrainer(load_split_model(model_dir), shapes.build_tokenizer(), cfg, f"bench-{name}-{i}", i, 2,
                             None, fingerprint=fp) for i in range(2)]
    t0 = time.time()
    if port is None:
        link = LocalLink(server)
        for _ in range(cfg.steps):  # alternate, as the threads below roughly do
            for d in devices:
                step = d.step + 1
                frame, out, _ = d.request(step)
                reply = link.request(frame)
                d.apply(step, out, reply)
                d.count_bytes(frame, reply)
    else:
        from edgeqtl.transport import BrokerConfig, RequestClient, Responder

        cfgb = BrokerConfig(port=port)

        class Link:
            def __init__(self, t):
                self.t = t

            def request(self, frame):
                return self.t.request(frame, timeout=30)

        errors = []

        def device(d):
            try:
                with RequestClient(cfgb, d.device_id) as t:
                    run_device(d, Link(t))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        with Responder(cfgb, server.handle_batch, group=None, client_id=f"bench-srv-{name}"):
            threads = [threading.Thread(target=device, args=(d,)) for d in devices]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise RuntimeError(f"{name}: {errors[0]}")
    elapsed = time.time() - t0
    n = sum(d.step for d in devices)
    return {"accuracy": evaluate_devices(server, devices, 100), "minutes": elapsed / 60,
            "up": sum(d.bytes_up for d in devices) / n, "down": sum(d.bytes_down for d in devices) / n,
            "up16": sum(d.fp16_up for d in devices) / n, "down16": sum(d.fp16_down for d in devices) / n,
            "applied": {k: len(v) for k, v in server.applied.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="the split model all runs start from")
    ap.add_argument("--start-steps", type=int, default=1500, help="in-process steps for the default start model")
    ap.add_argument("--steps", type=int, default=300, help="split-training steps per device")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--trainable", default="projector,encoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="in-process,mqtt-int8,mqtt-int4",
                    help="comma list: in-process (fp32 gradients), local-<codec>, mqtt-<codec>; codec fp16, int8, int4")
    args = ap.parse_args(argv)

    import torch

    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.models.split_training import SplitTrainConfig

    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        model_dir = start_model(Path(tempfile.mkdtemp(prefix="edgeqtl-st-")) / "start", args.start_steps)
    print(f"start model {model_dir}: held-out {100 * start_accuracy(model_dir):.2f}%", flush=True)
    base = SplitTrainConfig(steps=args.steps, batch_size=args.batch_size, warmup=20, checkpoint_every=10 ** 9,
                            trainable=tuple(args.trainable.split(",")))
    results = {}
    with MosquittoBroker() as broker:
        for name in args.runs.split(","):
            # in-process: fp32 gradients, no network; local-<codec>: in process, compressed; mqtt-<codec>
            where, codec = ("local", "fp32") if name == "in-process" else name.split("-", 1)
            if where not in ("local", "mqtt") or codec not in ("fp32", "fp16", "int8", "int4"):
                ap.error(f"unknown run {name!r}: in-process, local-<codec> or mqtt-<codec>, codec fp16/int8/int4")
            cfg = dataclasses.replace(base, grad_codec=codec)
            results[name] = run(name, model_dir, cfg, None if where == "local" else broker.port)
            r = results[name]
            print(f"[{name}] held-out {100 * r['accuracy']:.2f}% in {r['minutes']:.1f} min; applied {r['applied']}",
                  flush=True)
    ref = results.get("in-process", {}).get("accuracy")
    print(f"\nsplit training, 2 devices (IID shards), {args.steps} steps each, batch {args.batch_size}, "
          f"trainable on device: {args.trainable}; start: {model_dir}")
    print(f"{'run':<12}{'held-out':>9}{'vs ref':>8}{'up B/step':>11}{'16-bit':>9}{'saved':>7}"
          f"{'down B/step':>13}{'16-bit':>9}{'saved':>7}")
    for name, r in results.items():
        delta = f"{100 * (r['accuracy'] - ref):+7.2f}" if ref is not None else f"{'-':>7}"
        print(f"{name:<12}{100 * r['accuracy']:>8.2f}%{delta} {r['up']:>10.0f}{r['up16']:>9.0f}"
              f"{100 * (1 - r['up'] / r['up16']):>6.1f}%{r['down']:>13.0f}{r['down16']:>9.0f}"
              f"{100 * (1 - r['down'] / r['down16']):>6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
