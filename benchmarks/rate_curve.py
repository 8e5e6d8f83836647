"""Issue 16's benchmark: accuracy against measured uplink bits for the 16-bit baseline,
2-bit codes (L = 4) packed and entropy-coded, calibrate's pick and its neighbours, and
rate-aware training at a few lambdas; then whether pruning near-constant code dimensions
would pay on top of the entropy coder.

    python benchmarks/rate_curve.py                                    # shapes, ~60 min on 2 cores
    python benchmarks/rate_curve.py --steps 1000 --lambdas 0.05        # shorter
    python benchmarks/rate_curve.py --data D/train.json --eval-data D/heldout.json --out runs/rate-own

Every run trains the tiny preset from scratch in its own subprocess with the same seed,
steps and data. Bits are measured by `edgeqtl calibrate` at the run's own L on images it
did not fit on: the entropy coder's real payload, and frames per question with their
headers as the device sends them. Writes <out>/report.json and <out>/rate_curve.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def edgeqtl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "edgeqtl.cli", *args], check=True, stdout=subprocess.DEVNULL)


class Bench:
    def __init__(self, args):
        self.args = args
        self.data = ["--data", str(args.data)] if args.data else []
        self.eval_data = ["--data", str(args.eval_data)] if args.eval_data else ["--per-family", str(args.per_family)]
        self.results: dict[str, dict] = {}

    def run(self, name: str, *train_args: str) -> dict:
        """Train (unless reused), evaluate, and measure the bits at the model's own L."""
        a, out = self.args, self.args.out / name
        report = out / "result.json"
        if a.reuse and report.is_file():
            r = json.loads(report.read_text())
            print(f"[{name}] reused: {100 * r['accuracy']:.2f}%", flush=True)
            self.results[name] = r
            return r
        t0 = time.time()
        print(f"[{name}] train {' '.join(train_args)}", flush=True)
        edgeqtl("train", "--preset", "tiny", *train_args, *self.data, "--steps", str(a.steps), "--seed", str(a.seed),
                "--threads", str(a.threads), "--out", str(out), "--quiet")
        train_s = time.time() - t0
        edgeqtl("eval", "--model", str(out), *self.eval_data, "--threads", str(a.threads), "--json", str(out / "eval.json"))
        r = json.loads((out / "eval.json").read_text())
        r.update(name=name, train_s=train_s, args=list(train_args))
        split = json.loads((out / "edgeqtl_split.json").read_text())["split"]
        r["levels"] = split["levels"] if split["quantizer"] == "fsq" else None
        if r["levels"]:
            r["calibration"] = self.calibrate(out, f"{r['levels']}-{r['levels']}")["rows"][0]
        report.write_text(json.dumps(r, indent=2))
        self.results[name] = r
        print(f"[{name}] {100 * r['accuracy']:.2f}%" + (
            f", rANS {r['calibration']['rans_payload_bits']:.3f} bits a code" if r["levels"] else "") +
              f" ({(time.time() - t0) / 60:.1f} min)", flush=True)
        return r

    def calibrate(self, model: Path, levels: str, *extra: str) -> dict:
        out = model / f"calib-{levels}"
        data = ["--data", str(self.args.eval_data)] if self.args.eval_data else []
        edgeqtl("calibrate", "--model", str(model), *data, "--samples", str(self.args.samples), "--levels", levels,
                "--threads", str(self.args.threads), "--out", str(out), *extra)
        return json.loads((out / "calibration.json").read_text())


def prune_dimensions(model_dir: Path, args, thresholds=(0.02, 0.05, 0.1, 0.2, 0.5)) -> list[dict]:
    """Force the code dimensions whose entropy is below each threshold to their most
    common level (so they need not be sent) and measure accuracy and the bits saved."""
    import torch

    from edgeqtl.export.calibration import batches, user_samples, world_samples
    from edgeqtl.models import jobs
    from edgeqtl.models.batches import image_spec_of
    from edgeqtl.models.load import load_prompts, load_split_model, world_of
    from edgeqtl.models.quantizer import dequantise, normalise, to_codes

    torch.set_num_threads(args.threads)
    model = load_split_model(model_dir).eval()
    prompts = load_prompts(model_dir, model)
    enc, levels = model.client.encoder, model.split.levels
    picked = user_samples(args.eval_data, args.samples) if args.eval_data else \
        world_samples(args.samples, heldout=False, world=world_of(model_dir))
    codes = []
    with torch.inference_mode():
        for inputs in batches(picked, prompts, image_spec_of(model), 16):
            ids, mask = torch.from_numpy(inputs.input_ids), torch.from_numpy(inputs.attention_mask)
            sent = mask.bool() & (ids == model.client.image_token_id)
            c, _ = enc(model.client.hidden(ids, mask, torch.from_numpy(inputs.pixel_values)))
            codes.append(c[sent].numpy())
    codes = np.concatenate(codes)
    p = np.stack([np.bincount(codes[:, d], minlength=levels) for d in range(codes.shape[1])]) / len(codes)
    h = -(np.where(p > 0, p * np.log2(np.maximum(p, 1e-12)), 0)).sum(1)
    mode = p.argmax(1)
    forward = enc.forward

    def evaluate() -> float:
        if args.eval_data:
            opts = jobs.DataOptions(args.eval_data, None, None, True, 16)
            recs = jobs.checked(args.eval_data, opts, model, prompts, lambda *_: None)
            return jobs.eval_records(model, prompts, recs, 16, progress=False).to_dict()["accuracy"]
        return jobs.eval_world(model, prompts, args.per_family, world_of(model_dir)).to_dict()["accuracy"]

    rows = [dict(threshold=0.0, dims=0, bits_saved=0.0, accuracy=evaluate())]
    for tau in thresholds:
        pruned = torch.from_numpy(h < tau)
        fixed = dequantise(torch.from_numpy(mode), levels)

        def patched(x, pruned=pruned, fixed=fixed):
            n = normalise(enc.in_proj(x), enc.clip_sigmas)
            n = torch.where(pruned, fixed.to(n.dtype), n)
            return to_codes(n, levels), n

        enc.forward = patched
        try:
            rows.append(dict(threshold=tau, dims=int(pruned.sum()), bits_saved=float(h[h < tau].sum() / len(h)),
                             accuracy=evaluate()))
        finally:
            enc.forward = forward
    print(f"\nper-dimension entropy of {model_dir.name} (bits): min {h.min():.3f}, median {np.median(h):.3f}, "
          f"max {h.max():.3f}, mean {h.mean():.3f}; {int((h < 0.05).sum())} of {len(h)} below 0.05")
    print(f"{'prune H <':>10} {'dims':>5} {'bits a code saved':>18} {'accuracy':>9}")
    for r in rows:
        print(f"{r['threshold']:>10.2f} {r['dims']:>5} {r['bits_saved']:>18.4f} {100 * r['accuracy']:>8.2f}%")
    return rows


def print_table(results: dict) -> None:
    base = results.get("fp16", {}).get("accuracy")
    print(f"\n{'run':<12}{'L':>3}{'accuracy':>10}{'vs 16-bit':>10}{'entropy':>9}{'rANS':>7}{'packed':>8}"
          f"{'wire':>7}{'wire/hidden':>12}{'B/question':>11}{'saved':>7}")
    for name, r in results.items():
        delta = f"{100 * (r['accuracy'] - base):+10.2f}" if base is not None else f"{'-':>10}"
        c = r.get("calibration")
        bits = (f"{c['entropy_bits']:>9.3f}{c['rans_payload_bits']:>7.3f}{c['packed_bits']:>8.3f}{c['wire_bits']:>7.3f}"
                f"{c['wire_bits'] * r['code_dim'] / r['hidden']:>12.3f}") if c else f"{'16 bits a hidden element':>43}"
        if "wire_bytes_per_sample" in r:  # the built-in world's eval counts them; a data file's does not
            sent = f"{r['wire_bytes_per_sample']:>11.0f}{100 * (1 - r['wire_bytes_per_sample'] / r['fp16_bytes_per_sample']):>6.1f}%"
        else:
            sent = f"{'-':>11}{'-':>7}"
        print(f"{name:<12}{r['levels'] or '-':>3}{100 * r['accuracy']:>9.2f}%{delta}{bits}{sent}")
    print("bits are per code element at the image positions (entropy; rANS payload; packed frames and "
          "rANS-or-packed frames per question with 75-B headers); wire/hidden is per element of the hidden "
          "state the codes stand for; B/question is eval's packed uplink with prompt ids, against 16-bit")


def plot(results: dict, path: Path) -> None:
    from edgeqtl.bench.report import new_figure, save_figure

    fig, ax = new_figure()
    for name, r in results.items():
        c = r.get("calibration")
        if not c:
            ax.axhline(100 * r["accuracy"], color="grey", ls="--", label=f"16-bit ({100 * r['accuracy']:.1f}%)")
            continue
        ax.plot([c["rans_payload_bits"]], [100 * r["accuracy"]], "o", label=f"{name}")
        ax.annotate(name, (c["rans_payload_bits"], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xlabel("rANS payload, bits per code element")
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=7)
    ax.set_title("accuracy against measured rate")
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lambdas", default="0.02,0.05,0.2", help="rate weights to train at L = 4")
    ap.add_argument("--target-bits", type=float, default=2.8,
                    help="calibrate's target (bits a code on the wire, tiny frames' headers included)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: pick, lambdas, prune")
    ap.add_argument("--data", type=Path, default=None, help="LLaVA training records instead of the built-in world")
    ap.add_argument("--eval-data", type=Path, default=None, help="LLaVA held-out records (with --data)")
    ap.add_argument("--per-family", type=int, default=200)
    ap.add_argument("--samples", type=int, default=128, help="calibrate's questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/rate"))
    ap.add_argument("--reuse", action="store_true", help="take a run from an earlier invocation when it finished")
    args = ap.parse_args(argv)
    if bool(args.data) != bool(args.eval_data):
        ap.error("--data and --eval-data go together")
    skip = set(filter(None, args.skip.split(",")))
    b = Bench(args)

    b.run("fp16", "--baseline")
    b.run("L4", "--levels", "4")
    if "pick" not in skip:
        cal = b.calibrate(args.out / "L4", "2-16", "--target-bits", str(args.target_bits))
        pick = cal["recommended"]
        print(f"calibrate on L4 for {args.target_bits} bits a code on the wire recommends L = {pick}", flush=True)
        for lv in sorted({max(2, pick - 1), pick, min(16, pick + 1)} - {4}):
            b.run(f"L{lv}", "--levels", str(lv))
    if "lambdas" not in skip:
        for lam in filter(None, args.lambdas.split(",")):
            b.run(f"L4-rate{lam}", "--levels", "4", "--rate-weight", lam)

    tiny = json.loads((args.out / "L4" / "config.json").read_text()) if (args.out / "L4" / "config.json").is_file() else {}
    hidden = tiny.get("text_config", {}).get("hidden_size", 64)
    for r in b.results.values():
        r.update(code_dim=128, hidden=hidden)
        if (args.out / r["name"] / "edgeqtl_split.json").is_file():
            r["code_dim"] = json.loads((args.out / r["name"] / "edgeqtl_split.json").read_text())["split"]["code_dim"]
    print_table(b.results)
    report = dict(results=b.results, steps=args.steps, seed=args.seed, data=str(args.data) if args.data else "shapes")
    if "prune" not in skip:
        lams = [n for n in b.results if n.startswith("L4-rate")]
        report["pruning"] = {n: prune_dimensions(args.out / n, args) for n in ["L4", *lams[:1]]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    plot(b.results, args.out / "rate_curve.png")
    print(f"\nwrote {args.out / 'report.json'} and {args.out / 'rate_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
