"""Client-half latency and peak memory: ONNX Runtime fp32 and int8 against PyTorch eager.

    python benchmarks/client_latency.py                         # tiny preset, cut 2
    python benchmarks/client_latency.py --model runs/tiny-2bit  # a trained split model
    python benchmarks/client_latency.py --bundle bundles/x --model runs/x

Same CPU, same inputs (one held-out question, batch 1, as on a device), same thread
count. Each runtime runs in its own subprocess, so its peak RSS (ru_maxrss) counts only
what that runtime needs: the PyTorch client pays for importing torch, as a device would.
Prints median and p90 latency, ratios against PyTorch, and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeqtl.memory import peak_rss_mb


def _inputs(manifest_dir: Path, batch: int):
    import numpy as np

    from edgeqtl import shapes
    from edgeqtl.bundle import BundleManifest
    from edgeqtl.imageproc import preprocess
    from edgeqtl.prompt import PromptEncoder

    m = BundleManifest.load(manifest_dir)
    samples = shapes.heldout(20)[:batch]
    ids, mask = PromptEncoder.from_bundle(manifest_dir, m.text).encode([s.question for s in samples])
    pix = preprocess(np.stack([s.image for s in samples]), m.image)
    return m, pix, ids, mask


def worker(kind: str, bundle: Path, model_dir: Path, threads: int, runs: int, batch: int) -> dict:
    import numpy as np

    m, pix, ids, mask = _inputs(bundle, batch)
    if kind == "torch":
        import torch

        from edgeqtl.models.load import SPLIT_CONFIG_FILE, load_split_model
        from edgeqtl.models.split import SplitConfig

        torch.set_num_threads(threads)
        # a plain checkpoint (no split config of its own) is cut as its bundle was
        split = None if (model_dir / SPLIT_CONFIG_FILE).is_file() else SplitConfig(cut=m.cut, levels=m.levels)
        client = load_split_model(model_dir, split).client.eval()
        t_pix, t_ids, t_mask = map(torch.from_numpy, (pix, ids, mask))

        def step():
            with torch.inference_mode():
                client(t_ids, t_mask, t_pix)
    else:
        import onnxruntime as ort  # directly, as the device agent does: no torch in this process

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(bundle / m.graph("prefill", kind).file), so,
                                    providers=["CPUExecutionProvider"])
        feeds = {"pixel_values": pix, "input_ids": ids, "attention_mask": mask}

        def step():
            sess.run(["codes"], feeds)
    for _ in range(max(5, runs // 10)):
        step()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * float(np.median(times)), "p90_ms": 1e3 * float(np.percentile(times, 90)),
            "peak_rss_mb": peak_rss_mb(), "torch": "torch" in sys.modules}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="trained split model dir (default: tiny preset, cut 2)")
    ap.add_argument("--bundle", type=Path, default=None, help="an exported bundle of --model (default: export one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--worker", choices=["torch", "fp32", "int8"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.bundle, args.model, args.threads, args.runs, args.batch)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="edgeqtl-bench-"))
    model_dir = args.model
    if model_dir is None:  # the tiny preset at cut 2, saved as `edgeqtl train` saves it
        from edgeqtl.models.presets import build_tiny
        from edgeqtl.models.split import SplitConfig, SplitModel
        from edgeqtl.models.checkpoint import save_checkpoint

        model_dir = tmp / "tiny"
        save_checkpoint(SplitModel(build_tiny(0), SplitConfig(cut=2, levels=4)), model_dir)
    bundle = args.bundle
    if bundle is None:
        from edgeqtl.export.bundle import ExportOptions, export_bundle

        bundle = tmp / "bundle"
        export_bundle(ExportOptions(model_dir, bundle, verify=False), progress=None)

    results = {}
    for kind in ("torch", "fp32", "int8"):
        out = subprocess.run([sys.executable, __file__, "--worker", kind, "--bundle", str(bundle), "--model",
                              str(model_dir), "--threads", str(args.threads), "--runs", str(args.runs),
                              "--batch", str(args.batch)], check=True, capture_output=True, text=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["torch"]["median_ms"]
    print(f"client half, prefill, batch {args.batch}, {args.threads} threads, {args.runs} runs, model {model_dir}")
    print(f"{'runtime':<16}{'median ms':>10}{'p90 ms':>9}{'speedup':>9}{'peak RSS MB':>13}{'torch loaded':>14}")
    names = {"torch": "PyTorch eager", "fp32": "ORT fp32", "int8": "ORT int8"}
    for k, r in results.items():
        print(f"{names[k]:<16}{r['median_ms']:>10.2f}{r['p90_ms']:>9.2f}{base / r['median_ms']:>8.2f}x"
              f"{r['peak_rss_mb']:>13.0f}{str(r['torch']):>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
