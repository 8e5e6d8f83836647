"""The fuzz driver's full run: 10,000 malformed frames (edgeqtl/fuzz.py's defects, in
turn) at a server agent running as its own process over mosquitto, with a valid question
after every 100; the server's RSS before and after.

    python benchmarks/fuzz.py                 # ~2 min on 2 cores
    python benchmarks/fuzz.py --count 50000
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from edgeqtl import shapes
    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.fuzz import fuzz_server
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.transport import BrokerConfig, RequestClient
    from edgeqtl.wire import InferOptions

    work = Path(tempfile.mkdtemp(prefix="edgeqtl-fuzz-"))
    save_checkpoint(SplitModel(build_tiny(3), SplitConfig(cut=0, levels=4)), work / "model")
    export_bundle(ExportOptions(work / "model", work / "bundle", verify=False), progress=None)
    client = DeviceClient(work / "bundle", reuse_images=False)
    samples = shapes.heldout(2)[:6]
    valid = []
    for s in samples:
        for opts in (InferOptions(), InferOptions(max_new_tokens=2, temperature=0.5)):
            valid.append(client.request_frame(s.image, s.question, opts))

    def ask(transport, k):
        return client.ask(transport, samples[k].image, samples[k].question, timeout=20).text

    with MosquittoBroker() as broker:
        cfg = BrokerConfig(port=broker.port)
        server = subprocess.Popen([sys.executable, "-m", "edgeqtl.cli", "server", "serve", "--server-half",
                                   str(work / "bundle" / "server"), "--broker", f"mqtt://127.0.0.1:{broker.port}",
                                   "--max-new-tokens", "3", "--server-id", "fuzz-srv"],
                                  stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"))
        try:
            with RequestClient(cfg, "fuzz-warmup") as t:  # the reference answers, from the server itself
                expected = [ask(t, k) for k in range(len(samples))]
            before = rss_mb(server.pid)
            report = fuzz_server(cfg, valid, expected, ask, count=args.count, every=args.every, seed=args.seed,
                                 alive=lambda: server.poll() is None)
            time.sleep(1)
            after = rss_mb(server.pid) if server.poll() is None else float("nan")
            crashed = server.poll() is not None
        finally:
            server.terminate()
            server.wait(10)
    figures = {"malformed_frames": report.malformed, "by_defect": report.by_defect,
               "error_replies": report.replies_to_malformed, "valid_asked": report.valid_asked,
               "valid_correct": report.valid_correct, "valid_wrong": report.valid_wrong,
               "valid_failed": report.valid_failed, "server_crashed": crashed, "server_rss_mb_before": round(before, 1),
               "server_rss_mb_after": round(after, 1), "seconds": round(report.seconds, 1),
               "failures": report.failures[:10]}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
