"""Client-half latency and peak memory: ONNX Runtime fp32 and int8 against PyTorch eager.

    python benchmarks/client_latency.py                         # tiny preset, cut 2
    python benchmarks/client_latency.py --model runs/tiny-2bit  # a trained split model
    python benchmarks/client_latency.py --bundle bundles/x --model runs/x

Same CPU, same inputs (held-out questions, batch 1 by default, as on a device), same
thread count. Each runtime runs in its own subprocess, so its peak RSS counts only what
that runtime needs: the PyTorch client pays for importing torch, as a device would.
Prints median and p90 latency, ratios against PyTorch, and peak RSS.

A thin wrapper: the measuring is `edgeqtl bench client`'s (edgeqtl/bench/client.py), which
writes the same figures into a report with a plot; this script keeps its options and its
table (and, as before, defaults to an untrained tiny preset at cut 2, where the bench suite
measures the model it trains or --model).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edgeqtl.bench.client import RUNTIME_NAMES, RUNTIMES, WORKER_TIMEOUT_S, run_worker


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="trained split model dir (default: tiny preset, cut 2)")
    ap.add_argument("--bundle", type=Path, default=None, help="an exported bundle of --model (default: export one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)

    import numpy as np

    from edgeqtl.models.load import world_of

    tmp = Path(tempfile.mkdtemp(prefix="edgeqtl-bench-"))
    model_dir = args.model
    if model_dir is None:  # the tiny preset at cut 2, saved as `edgeqtl train` saves it
        from edgeqtl.models.checkpoint import save_checkpoint
        from edgeqtl.models.presets import build_tiny
        from edgeqtl.models.split import SplitConfig, SplitModel

        model_dir = tmp / "tiny"
        save_checkpoint(SplitModel(build_tiny(0), SplitConfig(cut=2, levels=4)), model_dir)
    bundle = args.bundle
    if bundle is None:
        from edgeqtl.export.bundle import ExportOptions, export_bundle

        bundle = tmp / "bundle"
        export_bundle(ExportOptions(model_dir, bundle, verify=False), progress=None)

    world = world_of(model_dir)
    samples = world.heldout(max(1, -(-args.batch // len(world.FAMILIES))))[: args.batch]
    np.save(tmp / "images.npy", np.stack([s.image for s in samples]))
    results = {}
    for kind in RUNTIMES:
        job = {"kind": kind, "bundle": str(bundle), "model": str(model_dir), "threads": args.threads,
               "runs": args.runs, "images": str(tmp / "images.npy"), "questions": [s.question for s in samples],
               "codes_out": str(tmp / f"codes-{kind}.npy")}
        results[kind] = run_worker(job, tmp / f"job-{kind}.json", WORKER_TIMEOUT_S[False])
    base = results["torch"]["median_ms"]
    print(f"client half, prefill, batch {args.batch}, {args.threads} threads, {args.runs} runs, model {model_dir}")
    print(f"{'runtime':<18}{'median ms':>10}{'p90 ms':>9}{'speedup':>9}{'peak RSS MB':>13}{'torch loaded':>14}")
    for k, r in results.items():
        print(f"{RUNTIME_NAMES[k]:<18}{r['median_ms']:>10.2f}{r['p90_ms']:>9.2f}{base / r['median_ms']:>8.2f}x"
              f"{r['peak_rss_mb']:>13.0f}{str(r['torch_imported']):>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
