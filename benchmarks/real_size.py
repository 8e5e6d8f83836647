"""Real size, end to end: a random-weight checkpoint of a published VLM, exported, run
on the device runtimes and served, with every figure printed side by side.

    python benchmarks/real_size.py                                  # llava-interleave-qwen-0.5b, ~15 min
    python benchmarks/real_size.py --scale 0.1 --batches 1,2        # a quick look at the structure

Steps, each in its own process where memory is measured (peak RSS = ru_maxrss of that
process alone):
  1. build the checkpoint from the published config (models/zoo.py; nothing downloaded);
  2. `edgeqtl export --cut 0 --bits 2 --target arm64`: wall time and peak RSS, against
     the client half's fp32 size; bundle size per variant;
  3. the client half, batch 1, on the same threads: ONNX Runtime fp32 and int8 against
     PyTorch eager fp32 (benchmarks/client_latency.py's workers): latency, peak RSS;
  4. uplink bytes per question: the request frame packed and entropy-coded, and its
     chunks under AWS IoT Core's 128 KiB message limit, against 16-bit hidden states;
  5. the server half on the CPU: time to the first token at batch 1, and answers/s at
     each batch size (answers of `--new-tokens` tokens; random weights rarely stop early).

Random weights measure cost (time, memory, bytes), never accuracy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edgeqtl.memory import children_peak_rss_mb

HERE = Path(__file__).resolve().parent
EDGEQTL = [sys.executable, "-m", "edgeqtl.cli"]
MB = 1024 * 1024


def run_timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one command run in a fresh process."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    # a fresh process per measurement: RUSAGE_CHILDREN is the maximum over all children so far
    return wall, children_peak_rss_mb()


def measure_in_child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


UPLINK = r"""
import json, sys
import numpy as np
from edgeqtl import shapes
from edgeqtl.chunking import split_frame
from edgeqtl.wire import FrameKind, encode_frame
from edgeqtl.device_agent.client import DeviceClient
from edgeqtl.memory import peak_rss_mb
c = DeviceClient(sys.argv[1], variant="int8", threads=int(sys.argv[2]))
rows = []
for s in shapes.heldout(2)[:4]:
    ids, _ = c.prompts.encode([s.question])
    tokens, dim = ids.shape[1], c.manifest.hidden_size  # 16 bits: every position as a hidden state
    coded = encode_frame(c.request_frame(s.image, s.question, request_id=b"r" * 16))
    c.entropy, ent = None, c.entropy
    plain = encode_frame(c.request_frame(s.image, s.question, request_id=b"r" * 16))
    c.entropy = ent
    def chunked(raw):  # as sent to a broker that takes at most 128 KiB a message (AWS IoT Core)
        return split_frame(raw, b"r" * 16, 0, 131072) if len(raw) > 131072 else [raw]
    rows.append({"tokens": tokens, "dim": dim, "fp16": tokens * dim * 2, "packed": len(plain),
                 "entropy": len(coded), "packed_chunks": len(chunked(plain)),
                 "packed_chunked": sum(map(len, chunked(plain))), "chunks": len(chunked(coded)),
                 "chunked": sum(map(len, chunked(coded)))})
print(json.dumps({"rows": rows, "peak_rss_mb": peak_rss_mb(), "entropy_model": c.entropy is not None}))
"""

SERVER = r"""
import dataclasses, json, os, sys, time
import numpy as np
import torch
from edgeqtl import shapes
from edgeqtl.wire import FrameKind, decode_frame, encode_frame
from edgeqtl.device_agent.client import DeviceClient
from edgeqtl.server_agent.agent import load_engine
from edgeqtl.memory import peak_rss_mb
bundle, threads, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
batches = [int(b) for b in sys.argv[4].split(",")]
torch.set_num_threads(threads)
c = DeviceClient(bundle, variant="int8", threads=threads)
s = shapes.heldout(1)[0]
prompt = c.request_frame(s.image, s.question)
def frames(n):
    return [decode_frame(encode_frame(dataclasses.replace(prompt, request_id=os.urandom(16)))) for _ in range(n)]
out = {}
first = load_engine(os.path.join(bundle, "server"), max_new_tokens=1)
first.handle_batch(frames(1))  # warm up
t0 = time.perf_counter(); first.handle_batch(frames(1)); out["ttft_s"] = time.perf_counter() - t0
del first
engine = load_engine(os.path.join(bundle, "server"), max_new_tokens=new_tokens)
for b in batches:
    fs = frames(b)
    t0 = time.perf_counter(); replies = engine.handle_batch(fs); dt = time.perf_counter() - t0
    kinds = {r.kind.name for r in replies}
    out[f"batch{b}"] = {"seconds": dt, "answers_per_s": b / dt, "kinds": sorted(kinds)}
out["peak_rss_mb"] = peak_rss_mb()
out["tokens"] = int(c.prompts.encode([s.question])[0].shape[1])
print(json.dumps(out))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llava-interleave-qwen-0.5b", help="a name from `edgeqtl zoo`")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=Path("runs/real-size"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="timed client runs per runtime (after 5 warm-up runs)")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--server-only", action="store_true", help="with --reuse-bundle: the server figures alone")
    ap.add_argument("--reuse-bundle", action="store_true",
                    help="measure the bundle an earlier run exported (its export figures are not measured again)")
    ap.add_argument("--calibration-data", type=Path, default=None,
                    help="images for the entropy model (default: export's own fallback)")
    args = ap.parse_args(argv)

    work = args.work / f"{args.model}-x{args.scale:g}"
    ckpt, bundle = work / "ckpt", work / "bundle"
    work.mkdir(parents=True, exist_ok=True)
    if not (ckpt / "config.json").is_file():
        wall, peak = run_timed([*EDGEQTL, "zoo", args.model, "--out", str(ckpt), "--scale", str(args.scale)],
                               work / "zoo.log")
        print(f"checkpoint {ckpt}: built in {wall:.0f} s")
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))

    export_cmd = [*EDGEQTL, "export", "--model", str(ckpt), "--cut", "0", "--bits", "2", "--target", "arm64",
                  "--out", str(bundle)]
    if args.calibration_data:
        export_cmd += ["--calibration-data", str(args.calibration_data)]
    reuse = args.reuse_bundle and (bundle / "manifest.json").is_file()
    if not reuse:
        wall, export_peak = run_timed(export_cmd, work / "export.log")

    from edgeqtl.bundle import BundleManifest

    m = BundleManifest.load(bundle)
    fp32_client = sum(f.size for f in m.files if f.name.startswith("client_") and ".int8." not in f.name
                      and ".fp16." not in f.name)
    print(f"\n{args.model} x{args.scale:g}: checkpoint {ckpt_bytes / 2**30:.2f} GiB of safetensors, "
          f"{m.text.image_token_count} image tokens, cut {m.cut}, "
          f"{m.levels} levels")
    if reuse:
        print(f"export: reused {bundle} (its figures are in {work / 'export.log'}'s run)")
    else:
        print(f"export: {wall:.0f} s wall, peak RSS {export_peak / 1024:.2f} GB = "
              f"{export_peak * MB / fp32_client:.2f}x the client half's fp32 size ({fp32_client / 2**30:.2f} GiB)"
              f"  [goals: <= 600 s, <= 3x]")
    print("bundle files:")
    for f in sorted(m.files, key=lambda f: f.name):
        print(f"  {f.size / MB:10.1f} MiB  {f.name}")

    if reuse and args.server_only:
        return _server(bundle, args)
    import numpy as np

    from edgeqtl import shapes
    from edgeqtl.bench.client import WORKER_TIMEOUT_S, run_worker

    sample = shapes.heldout(1)[0]  # batch 1, as on a device
    np.save(work / "images.npy", sample.image[None])
    lat = {}
    for kind in ("torch", "fp32", "int8"):  # each runtime in its own process (edgeqtl bench client's worker)
        job = {"kind": kind, "bundle": str(bundle), "model": str(ckpt), "threads": args.threads, "runs": args.runs,
               "images": str(work / "images.npy"), "questions": [sample.question],
               "codes_out": str(work / f"codes-{kind}.npy")}
        lat[kind] = run_worker(job, work / f"job-{kind}.json", WORKER_TIMEOUT_S[False])
    base = lat["torch"]["median_ms"]
    print(f"\nclient half, batch 1, {args.threads} threads, {args.runs} timed runs  "
          f"[goal: int8 >= 2x PyTorch, peak RSS <= 1.5 GB]")
    print(f"{'runtime':<16}{'median s':>10}{'p90 s':>9}{'speedup':>9}{'peak RSS MB':>13}")
    for k, name in (("torch", "PyTorch eager"), ("fp32", "ORT fp32"), ("int8", "ORT int8")):
        r = lat[k]
        print(f"{name:<16}{r['median_ms'] / 1e3:>10.2f}{r['p90_ms'] / 1e3:>9.2f}{base / r['median_ms']:>8.2f}x"
              f"{r['peak_rss_mb']:>13.0f}")

    up = measure_in_child(UPLINK, str(bundle), str(args.threads))
    rows = up["rows"]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k not in ("tokens", "dim")}
    print(f"\nuplink per question ({len(rows)} questions, {rows[0]['tokens']} tokens x {rows[0]['dim']} dims; "
          f"entropy model: {up['entropy_model']})  [goal: >= 87.5% below 16-bit]")
    print(f"  16-bit hidden states      {mean['fp16']:>10.0f} B")
    for key, label in (("packed", "2-bit packed frame"),
                       ("packed_chunked", f"  as {mean['packed_chunks']:.0f} message(s) <= 128 KiB"),
                       ("entropy", "entropy-coded frame"),
                       ("chunked", f"  as {mean['chunks']:.0f} message(s) <= 128 KiB")):
        print(f"  {label:<26}{mean[key]:>10.0f} B  {100 * (1 - mean[key] / mean['fp16']):6.2f}% less")

    return _server(bundle, args)


def _server(bundle, args) -> int:
    srv = measure_in_child(SERVER, str(bundle), str(args.threads), str(args.new_tokens), args.batches)
    print(f"\nserver half on the CPU, {args.threads} threads, {srv['tokens']}-token prompts, "
          f"answers of {args.new_tokens} tokens, peak RSS {srv['peak_rss_mb']:.0f} MB")
    print(f"  time to first token, batch 1: {srv['ttft_s']:.2f} s")
    for b in args.batches.split(","):
        r = srv[f"batch{b}"]
        print(f"  batch {b:>2}: {r['seconds']:7.2f} s, {r['answers_per_s']:.3f} answers/s  ({', '.join(r['kinds'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
