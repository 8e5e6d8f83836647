"""Train the tiny preset from scratch and compare held-out accuracy per family:
unquantized 16-bit baseline vs 2-bit codes (L = 4) vs 1-bit codes (L = 2).

    python benchmarks/train_shapes.py                       # all three, ~30 min on 2 cores
    python benchmarks/train_shapes.py --runs fp16,2bit      # a subset
    python benchmarks/train_shapes.py --cut 2 --steps 1500  # elsewhere on the curve

Each run trains in its own subprocess (same seed, same steps, same data), so the
wall-clock budget per run is measured honestly; the script fails if a run exceeds
--budget-min. Writes runs/bench/<name>/ checkpoints, a JSON report and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = {"fp16": ["--baseline"], "2bit": ["--bits", "2"], "1bit": ["--bits", "1"], "ternary": ["--levels", "3"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="fp16,2bit,1bit", help=f"comma list from {sorted(RUNS)}")
    ap.add_argument("--cut", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="stage-2 steps (default: edgeqtl's TrainConfig)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-family", type=int, default=500)
    ap.add_argument("--budget-min", type=float, default=15.0, help="fail if one run (train + eval) takes longer")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--reuse", action="store_true",
                    help="take a run's result from an earlier invocation when its eval.json and timing.json exist")
    args = ap.parse_args(argv)

    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {sorted(RUNS)}")
    results = {}
    for name in names:
        out = args.out / f"{name}-cut{args.cut}"
        report_path, timing_path = out / "eval.json", out / "timing.json"
        if args.reuse and report_path.is_file() and timing_path.is_file():
            rep = {**json.loads(report_path.read_text()), **json.loads(timing_path.read_text())}
            results[name] = rep
            print(f"[{name}] reused from {out}: mean {100 * rep['accuracy']:.2f}%", flush=True)
            continue
        cmd = [sys.executable, "-m", "edgeqtl.cli", "train", "--preset", "tiny", "--cut", str(args.cut),
               *RUNS[name], "--seed", str(args.seed), "--threads", str(args.threads), "--out", str(out), "--quiet"]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        t0 = time.time()
        print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        train_s = time.time() - t0
        subprocess.run([sys.executable, "-m", "edgeqtl.cli", "eval", "--model", str(out), "--threads",
                        str(args.threads), "--per-family", str(args.per_family), "--json", str(report_path)],
                       check=True, stdout=subprocess.DEVNULL)
        total_s = time.time() - t0
        rep = json.loads(report_path.read_text())
        timing = dict(train_s=train_s, total_s=total_s)
        timing_path.write_text(json.dumps(timing))
        rep.update(timing)
        results[name] = rep
        print(f"[{name}] mean {100 * rep['accuracy']:.2f}%  train {train_s / 60:.1f} min, "
              f"train+eval {total_s / 60:.1f} min", flush=True)

    print_table(results, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"report-cut{args.cut}.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / f"accuracy-cut{args.cut}.png")
    over = [n for n, r in results.items() if r["total_s"] > 60 * args.budget_min]
    if over:
        print(f"FAIL: {over} took longer than {args.budget_min} min", file=sys.stderr)
        return 1
    return 0


def print_table(results: dict, args) -> None:
    families = list(next(iter(results.values()))["per_category"])
    head = f"{'run':<8}" + "".join(f"{f:>10}" for f in families) + f"{'mean':>9}{'vs fp16':>9}{'B/sample':>10}{'saved':>8}{'min':>6}"
    print(f"\nshapes held-out accuracy, tiny preset, cut {args.cut}, seed {args.seed}, "
          f"{args.per_family} per family, {args.threads} threads")
    print(head)
    base = results.get("fp16", {}).get("accuracy")
    for name, r in results.items():
        acc = "".join(f"{100 * r['per_category'][f]['accuracy']:>9.2f}%" for f in families)
        delta = f"{100 * (r['accuracy'] - base):+8.2f}" if base is not None else f"{'-':>8}"
        saved = 1 - r["wire_bytes_per_sample"] / r["fp16_bytes_per_sample"]
        print(f"{name:<8}{acc}{100 * r['accuracy']:>8.2f}%{delta} {r['wire_bytes_per_sample']:>9.0f}"
              f"{100 * saved:>7.1f}%{r['total_s'] / 60:>6.1f}")


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is a convenience; the table is the result
        return
    families = list(next(iter(results.values()))["per_category"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(families))]
        ax.bar(xs, [100 * r["per_category"][f]["accuracy"] for f in families], width, label=f"{name} ({100 * r['accuracy']:.1f}%)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families))], families)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("tiny preset on shapes: 16-bit baseline vs quantized codes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
