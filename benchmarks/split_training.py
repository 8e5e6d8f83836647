"""Split training with 2 devices: over a real mosquitto with compressed gradients,
against the same schedule in one process with exact (fp32) gradients.

    python benchmarks/split_training.py            # starts from a short in-process run of the tiny preset
    python benchmarks/split_training.py --model runs/start --steps 1000 --seeds 0,1,2 --per-family 500

Every run starts from the same split model, with the same seeds, shards and steps; the
devices alternate on one trunk. Runs:
    in-process   LocalLink, fp32 gradients (no network, no compression): the reference
    mqtt-int8    two device threads and a server agent over mosquitto, 8-bit gradients
    mqtt-int4    the same, 4-bit unbiased stochastic gradients
Prints held-out accuracy (each device's client half with the shared trunk, mean of the
two) and bytes per step up and down against 16-bit both ways, frames whole. With several
seeds (shards, sampling and stochastic rounding all follow the seed), each run's accuracy is
given as mean and spread over seeds, and its gap to the in-process run as the mean of the
per-seed (paired) differences. With --free the over-MQTT runs interleave their two
devices as the threads happen to, so no two runs follow quite the same trajectory; taking
turns (the default) an mqtt-<codec> run applies the steps of its local-<codec> twin in the
same order and ends with the very same weights (`edgeqtl bench training` checks that).

The runs themselves are `edgeqtl bench training`'s (edgeqtl/bench/training.py: service,
devices, the link in process or over MQTT, the devices taking turns unless --free); this
script adds the held-out accuracy and the codec comparison. The bench suite measures the
other side: time per step over MQTT against in process, and that the two give the same
weights when the codec is the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np


def start_model(path: Path, steps: int) -> Path:
    """The tiny preset after a short in-process run: it can answer some questions, so
    that split training has something to improve and the comparison has a slope."""
    from edgeqtl import shapes
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.models.sources import WorldSource
    from edgeqtl.models.training import TrainConfig, train

    cfg = dataclasses.replace(TrainConfig(), steps=steps, curriculum_steps=min(600, steps // 3))
    model = SplitModel(build_tiny(0), SplitConfig(cut=0, levels=4))
    train(model, WorldSource.for_model(model, cfg), cfg, out_dir=path,
          progress=False)
    return path


def start_accuracy(model_dir: Path, per_family: int = 100) -> float:
    import torch

    from edgeqtl import shapes
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.training import ShapesCollator, evaluate, image_spec_of

    model = load_split_model(model_dir)
    collate = ShapesCollator(shapes.build_tokenizer(), model.num_image_tokens, image_spec_of(model))
    with torch.no_grad():
        return evaluate(model, collate, shapes.heldout(per_family)).mean_accuracy


def evaluate_devices(server, devices, per_family: int) -> list[float]:
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
    return accs


def run(name: str, model_dir: Path, cfg, port: int | None, per_family: int, lockstep: bool, threads: int) -> dict:
    """One run: `edgeqtl bench training`'s two devices on one trunk (in process when port
    is None, else over the broker), then each device's held-out accuracy."""
    from edgeqtl import shapes
    from edgeqtl.bench.training import train_devices
    from edgeqtl.models.device_training import ShapesShard

    r = train_devices(model_dir, cfg, port, threads,
                      lambda model, i: ShapesShard(model, shapes.build_tokenizer(), cfg, i, 2), num_devices=2,
                      lockstep=lockstep)
    devices = r.devices
    n = sum(d.step for d in devices)
    accs = evaluate_devices(r.service, devices, per_family)
    return {"accuracy": float(np.mean(accs)), "devices": accs, "minutes": r.seconds / 60,
            "up": sum(d.bytes_up for d in devices) / n, "down": sum(d.bytes_down for d in devices) / n,
            "up16": sum(d.fp16_up for d in devices) / n, "down16": sum(d.fp16_down for d in devices) / n,
            "applied": {d: ledger.applied for d, ledger in r.service.ledgers.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="the split model all runs start from (built there from the tiny preset if missing)")
    ap.add_argument("--start-steps", type=int, default=1500, help="in-process steps for the default start model")
    ap.add_argument("--steps", type=int, default=300, help="split-training steps per device")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: SplitTrainConfig's)")
    ap.add_argument("--trainable", default="projector,encoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="comma list of split-training seeds; every run is repeated per seed")
    ap.add_argument("--free", action="store_true",
                    help="over MQTT, let the two devices run as fast as each can (default: they take turns, "
                         "as in process, so that only the gradient codec differs)")
    ap.add_argument("--per-family", type=int, default=100, help="held-out questions per family")
    ap.add_argument("--runs", default="in-process,mqtt-int8,mqtt-int4",
                    help="comma list: in-process (fp32 gradients), local-<codec>, mqtt-<codec>; codec fp16, int8, int4")
    args = ap.parse_args(argv)

    import torch

    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.models.steps import SplitTrainConfig

    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        model_dir = start_model(Path(tempfile.mkdtemp(prefix="edgeqtl-st-")) / "start", args.start_steps)
    elif not model_dir.exists():  # build the default start model there, to reuse it next time
        start_model(model_dir, args.start_steps)
    print(f"start model {model_dir}: held-out {100 * start_accuracy(model_dir, args.per_family):.2f}%", flush=True)
    base = SplitTrainConfig(steps=args.steps, batch_size=args.batch_size, warmup=20, checkpoint_every=10 ** 9,
                            trainable=tuple(args.trainable.split(",")))
    if args.lr is not None:
        base = dataclasses.replace(base, lr=args.lr)
    seeds = [int(x) for x in args.seeds.split(",")]
    # in-process: fp32 gradients, no network; local-<codec>: in process, compressed; mqtt-<codec>
    plan = {name: ("local", "fp32") if name == "in-process" else tuple(name.split("-", 1))
            for name in args.runs.split(",")}
    for name, (where, codec) in plan.items():
        if where not in ("local", "mqtt") or codec not in ("fp32", "fp16", "int8", "int4"):
            ap.error(f"unknown run {name!r}: in-process, local-<codec> or mqtt-<codec>, codec fp16/int8/int4")
    results: dict[str, list[dict]] = {name: [] for name in plan}
    with MosquittoBroker() as broker:
        for seed in seeds:
            for name, (where, codec) in plan.items():
                cfg = dataclasses.replace(base, grad_codec=codec, seed=seed)
                r = run(name, model_dir, cfg, None if where == "local" else broker.port, args.per_family,
                        not args.free, args.threads)
                results[name].append(r)
                print(f"[{name} seed {seed}] held-out {100 * r['accuracy']:.2f}% (devices "
                      f"{', '.join(f'{100 * a:.2f}' for a in r['devices'])}) in {r['minutes']:.1f} min; "
                      f"applied {r['applied']}", flush=True)
    ref = results.get("in-process")
    print(f"\nsplit training, 2 devices (IID shards), {args.steps} steps each, batch {args.batch_size}, "
          f"lr {base.lr:g}, trainable on device: {args.trainable}; start: {model_dir}; seeds {args.seeds}; "
          f"held-out {5 * args.per_family} questions")
    print(f"{'run':<12}{'held-out':>9}{'spread':>8}{'vs ref':>8}{'up B/step':>11}{'16-bit':>9}{'saved':>7}"
          f"{'down B/step':>13}{'16-bit':>9}{'saved':>7}")
    for name, rs in results.items():
        acc = 100 * np.array([r["accuracy"] for r in rs])
        delta = f"{np.mean(acc - 100 * np.array([r['accuracy'] for r in ref])):+8.2f}" if ref else f"{'-':>8}"
        up, up16, down, down16 = (np.mean([r[k] for r in rs]) for k in ("up", "up16", "down", "down16"))
        saved_down = "  fp32" if plan[name][1] == "fp32" else f"{100 * (1 - down / down16):>5.1f}%"  # uncompressed
        print(f"{name:<12}{acc.mean():>8.2f}%{acc.std():>8.2f}{delta}{up:>11.0f}{up16:>9.0f}"
              f"{100 * (1 - up / up16):>6.1f}%{down:>13.0f}{down16:>9.0f}{saved_down:>7}")
    if len(seeds) > 1:
        print("per seed: " + "; ".join(f"{name} " + " ".join(f"{100 * r['accuracy']:.2f}" for r in rs)
                                        for name, rs in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
