"""Issue 19's benchmark, in process (LocalLink, frames encoded and decoded as on the wire):

1. standard split training (the answer ids go to the server) against label-private
   (U-shaped: the device keeps norm, lm_head and the loss), with the trunk's hidden
   states and their gradient in fp16, int8 or int4: held-out accuracy, bytes per step up
   and down (frames whole), seconds per step;
2. fedavg with every device in each round (K = N) against K = N/5 sampled per round,
   under Dirichlet(alpha) shards: held-out accuracy after each round.

    python benchmarks/private_labels.py                  # both, ~40 min on 2 cores
    python benchmarks/private_labels.py --part 1 --steps 200
    python benchmarks/private_labels.py --part 2 --devices 10 --rounds 10
    python benchmarks/private_labels.py --part 1 --data D/train.json --eval-data D/heldout.json

Every run starts from the same split model: the tiny preset after a short in-process run
(benchmarks/split_training.py's start model), same seeds and shards.
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

from split_training import start_accuracy, start_model  # same folder


def _accuracy(service, device, per_family: int, heldout=None) -> float:
    """The device's client half (and head, label-private) on the service's trunk, on the
    shapes world's held-out set or on `heldout` (LLaVA records)."""
    import torch

    from edgeqtl import shapes
    from edgeqtl.models.training import ShapesCollator, evaluate, image_spec_of

    model = device.model
    with service._lock:  # a consistent trunk while other devices train
        trunk = {k: v.clone() for k, v in service.server.state_dict().items()}
    if device.private:  # the head is the device's own
        for k in [k for k in trunk if k.startswith(("norm.", "lm_head."))]:
            del trunk[k]
    model.server.load_state_dict(trunk, strict=not device.private)
    if heldout is not None:
        from edgeqtl.models.jobs import eval_records

        prompts, records = heldout
        return eval_records(model, prompts, records, progress=False).to_dict()["accuracy"]
    collate = ShapesCollator(shapes.build_tokenizer(), model.num_image_tokens, image_spec_of(model))
    with torch.no_grad():
        return evaluate(model, collate, shapes.heldout(per_family)).mean_accuracy


def _records(model_dir: Path, path: Path):
    """(prompts, checked records) of a LLaVA data file for the start model."""
    from edgeqtl.models.jobs import DataOptions, checked
    from edgeqtl.models.load import load_prompts, load_split_model

    model = load_split_model(model_dir)
    prompts = load_prompts(model_dir, model)
    return prompts, checked(path, DataOptions(path, None, None, True), model, prompts, lambda *_: None)


def _sides(model_dir: Path, cfg, n: int, alpha: float | None, train=None):
    from edgeqtl import shapes
    from edgeqtl.models.device_training import DeviceTrainer, RecordBatches, ShapesShard
    from edgeqtl.models.batches import Collator, image_spec_of
    from edgeqtl.models.load import load_split_model
    from edgeqtl.models.split import fingerprint
    from edgeqtl.server_agent.training import TrainingService

    base = load_split_model(model_dir)
    fp = bytes.fromhex(fingerprint(base))[:16]
    service = TrainingService(base, cfg, num_devices=n, fingerprint=fp)
    devices = []
    for i in range(n):
        m = load_split_model(model_dir)
        if train is None:
            batches = ShapesShard(m, shapes.build_tokenizer(), cfg, i, n, alpha)
        else:  # the file's records, every device its own share of them
            prompts, records = train
            batches = RecordBatches(Collator(prompts, image_spec_of(m)), records[i::n], cfg.batch_size, cfg.seed + i)
        devices.append(DeviceTrainer(m, batches, cfg, f"dev{i}", fingerprint=fp))
    return service, devices


def part1(model_dir: Path, base, args) -> list[dict]:
    from edgeqtl.device_agent.links import LocalLink
    from edgeqtl.models.device_training import run_device

    plan = [("standard", False, "int8")] + [(f"private-{c}", True, c) for c in args.hidden_codecs.split(",")]
    train = _records(model_dir, args.data) if args.data else None
    heldout = _records(model_dir, args.eval_data) if args.eval_data else None
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, private, codec in plan:
            cfg = dataclasses.replace(base, private_labels=private, hidden_codec=codec, seed=seed,
                                      fedavg_every=args.part1_fedavg)
            service, devices = _sides(model_dir, cfg, args.part1_devices, None, train)
            link = LocalLink(service)
            t0 = time.perf_counter()
            if cfg.fedavg_every:  # the devices in threads: a round waits for all of them
                threads = [threading.Thread(target=run_device, args=(d, link)) for d in devices]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                for step in range(1, cfg.steps + 1):
                    for d in devices:  # taking turns on one trunk, as in benchmarks/split_training.py
                        d.train_step(step, link)
            seconds = time.perf_counter() - t0
            n = sum(d.step for d in devices)
            accs = [_accuracy(service, d, args.per_family, heldout) for d in devices]
            rows.append(dict(run=name, seed=seed, accuracy=float(np.mean(accs)), step_s=seconds / n,
                             up=sum(d.bytes_up for d in devices) / n, down=sum(d.bytes_down for d in devices) / n,
                             up16=sum(d.fp16_up for d in devices) / n, down16=sum(d.fp16_down for d in devices) / n))
            print(f"[{name} seed {seed}] held-out {100 * rows[-1]['accuracy']:.2f}%, {1000 * rows[-1]['step_s']:.0f} "
                  f"ms a step, up {rows[-1]['up']:,.0f} B, down {rows[-1]['down']:,.0f} B", flush=True)
    print(f"\n1. standard against label-private: {args.part1_devices} device(s) (IID), {base.steps} steps each, "
          f"batch {base.batch_size}, fedavg every {args.part1_fedavg or '-'} steps, "
          f"int8 gradients at the cut; " + (f"data {args.data}, held-out {args.eval_data}" if args.data else
                                              f"shapes, held-out {5 * args.per_family} questions"))
    print(f"{'run':<16}{'held-out':>9}{'vs std':>8}{'ms/step':>9}{'x std':>7}{'up B/step':>11}{'down B/step':>13}"
          f"{'both vs 16-bit':>16}")
    std = [r for r in rows if r["run"] == "standard"]
    for name, *_ in plan:
        rs = [r for r in rows if r["run"] == name]
        acc = np.mean([r["accuracy"] for r in rs])
        delta = np.mean([r["accuracy"] - s["accuracy"] for r, s in zip(rs, std)])
        ms, up, down = (np.mean([r[k] for r in rs]) for k in ("step_s", "up", "down"))
        both16 = np.mean([r["up16"] + r["down16"] for r in rs])
        print(f"{name:<16}{100 * acc:>8.2f}%{100 * delta:>+8.2f}{1000 * ms:>9.0f}"
              f"{ms / np.mean([s['step_s'] for s in std]):>7.2f}{up:>11,.0f}{down:>13,.0f}"
              f"{100 * (1 - (up + down) / both16):>15.1f}%")
    return rows


def part2(model_dir: Path, base, args) -> dict:
    from edgeqtl.device_agent.links import LocalLink
    from edgeqtl.models.device_training import run_device

    n = args.devices
    out = {}
    for k in (n, max(1, n // 5)):
        cfg = dataclasses.replace(base, steps=args.rounds * args.round_steps, fedavg_every=args.round_steps,
                                  devices_per_round=k, seed=0)
        service, devices = _sides(model_dir, cfg, n, args.alpha)
        link = LocalLink(service)
        curve = {}

        def on_step(trainer, info, curve=curve, service=service):
            if trainer.device_id == "dev0" and trainer.step % cfg.fedavg_every == 0:  # just after a round
                curve[trainer.step // cfg.fedavg_every] = _accuracy(service, trainer, args.per_family)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run_device, args=(d, link, on_step)) for d in devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[k] = dict(curve=curve, minutes=(time.perf_counter() - t0) / 60,
                      members={r: service.rounds.samples.get(r) for r in sorted(curve)} if k < n else None)
        print(f"[K = {k} of {n}] " + " ".join(f"r{r}: {100 * a:.1f}%" for r, a in sorted(curve.items())) +
              f" ({out[k]['minutes']:.1f} min)", flush=True)
    print(f"\n2. fedavg, {n} devices, Dirichlet({args.alpha}) shards, {args.round_steps} steps a round; held-out "
          f"accuracy of a device's averaged client half on the shared trunk after each round")
    print(f"{'round':>6}" + "".join(f"{f'K = {k}':>10}" for k in out))
    for r in range(1, args.rounds + 1):
        print(f"{r:>6}" + "".join(f"{100 * out[k]['curve'].get(r, float('nan')):>9.2f}%" for k in out))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="the start model (built there if missing)")
    ap.add_argument("--start-steps", type=int, default=1500)
    ap.add_argument("--part", choices=["1", "2", "both"], default="both")
    ap.add_argument("--steps", type=int, default=300, help="part 1: steps per device")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden-codecs", default="fp16,int8,int4")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--devices", type=int, default=10, help="part 2: N")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--round-steps", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--per-family", type=int, default=100)
    ap.add_argument("--part1-devices", type=int, default=2, help="part 1: devices on the trunk")
    ap.add_argument("--part1-fedavg", type=int, default=0,
                    help="part 1: average the devices' trainable weights (label-private: with their heads) every R "
                         "steps")
    ap.add_argument("--data", type=Path, default=None, help="part 1: LLaVA training records instead of the shards")
    ap.add_argument("--eval-data", type=Path, default=None, help="part 1: LLaVA held-out records (with --data)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from edgeqtl.models.steps import SplitTrainConfig

    torch.set_num_threads(args.threads)
    model_dir = args.model or Path(tempfile.mkdtemp(prefix="edgeqtl-pl-")) / "start"
    if not model_dir.exists():
        start_model(model_dir, args.start_steps)
    print(f"start model {model_dir}: held-out {100 * start_accuracy(model_dir, args.per_family):.2f}%", flush=True)
    base = SplitTrainConfig(steps=args.steps, batch_size=args.batch_size, warmup=20, checkpoint_every=10 ** 9)
    if args.part in ("1", "both"):
        part1(model_dir, base, args)
    if args.part in ("2", "both"):
        part2(model_dir, base, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
