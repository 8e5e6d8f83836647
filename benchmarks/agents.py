"""Split inference over a real mosquitto: uplink bytes, server throughput, device memory.

    python benchmarks/agents.py                        # tiny preset (untrained), cut 0 and cut 2
    python benchmarks/agents.py --model runs/bench/2bit-cut0

1. Uplink bytes per question, frames with their headers, against the same frames
   carrying 16-bit hidden states (the unquantized split), for each cut. At cut > 0 the
   decode steps' frames count too.
2. Answers per second with 16 devices asking at once, a server agent (its own process,
   `edgeqtl server`) with micro-batching (--max-batch 16) against one at a time
   (--max-batch 1). The devices send precomputed request frames, so the figure is the
   server's (on a device, the client half runs on the device's own CPU). Cut 0. The
   server process and the measuring are `edgeqtl bench server`'s (edgeqtl/bench/server.py),
   which also sweeps the number of devices (1, 4, 16) into a report with a plot.
3. Peak RSS of the device agent (ONNX Runtime, no torch) against a PyTorch client doing
   the same job (client half in PyTorch, same broker and server), each in its own process.
Needs mosquitto (apt-get install mosquitto).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgeqtl.memory import peak_rss_mb


def export_models(model: Path | None, tmp: Path) -> dict[int, Path]:
    """{cut: bundle dir}: the given trained model, or the tiny preset at cut 0 and 2."""
    from edgeqtl.export.bundle import ExportOptions, export_bundle

    if model is not None:
        bundle = tmp / "bundle"
        export_bundle(ExportOptions(model, bundle, verify=False), progress=None)
        from edgeqtl.bundle import BundleManifest

        return {BundleManifest.load(bundle).cut: bundle}
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.models.checkpoint import save_checkpoint

    out = {}
    for cut in (0, 2):
        save_checkpoint(SplitModel(build_tiny(0), SplitConfig(cut=cut, levels=4)), tmp / f"m{cut}")
        export_bundle(ExportOptions(tmp / f"m{cut}", tmp / f"b{cut}", verify=False), progress=None)
        out[cut] = tmp / f"b{cut}"
    return out


def uplink(bundle: Path, port: int, n: int) -> dict:
    """Bytes per question with entropy-coded codes (the default when the bundle has an
    entropy model), with plainly packed codes, and as 16-bit hidden states."""
    from edgeqtl import shapes
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.transport import BrokerConfig, RequestClient

    coded, plain = DeviceClient(bundle), DeviceClient(bundle, entropy=False)
    samples = shapes.heldout(max(1, n // len(shapes.FAMILIES)))
    rows = []
    with RequestClient(BrokerConfig(port=port), "bench-uplink") as t:
        for s in samples:
            a, b = coded.ask(t, s.image, s.question), plain.ask(t, s.image, s.question)
            rows.append((a.bytes_up, b.bytes_up, a.bytes_up_fp16, a.round_trips, a.text == b.text))
    m = coded.manifest
    return {"n": len(samples), "coded": statistics.mean(r[0] for r in rows),
            "packed": statistics.mean(r[1] for r in rows), "fp16": statistics.mean(r[2] for r in rows),
            "round_trips": statistics.mean(r[3] for r in rows), "same_answers": sum(r[4] for r in rows),
            "model_bits": coded.entropy.bits_per_code() if coded.entropy is not None else float("nan"),
            "levels": m.levels, "code_dim": m.code_dim, "hidden": m.hidden_size}


def rss_worker(kind: str, bundle: Path, model: Path | None, port: int, n: int) -> dict:
    """One process: the device agent (kind 'onnx') or a PyTorch client ('torch') answers n questions."""
    from edgeqtl import shapes
    from edgeqtl.transport import BrokerConfig, RequestClient

    samples = shapes.heldout(max(1, n // len(shapes.FAMILIES)))
    with RequestClient(BrokerConfig(port=port), f"bench-rss-{kind}") as t:
        if kind == "onnx":
            from edgeqtl.device_agent.client import DeviceClient

            client = DeviceClient(bundle, threads=2)
            answers = [client.ask(t, s.image, s.question).text for s in samples]
        else:
            import torch

            from edgeqtl.bundle import BundleManifest
            from edgeqtl.imageproc import preprocess
            from edgeqtl.models.load import load_split_model
            from edgeqtl.prompt import PromptEncoder
            from edgeqtl.wire import FrameKind, codes_frame, new_request_id

            torch.set_num_threads(2)
            m = BundleManifest.load(bundle)
            prompts = PromptEncoder.from_bundle(bundle, m.text)
            client = load_split_model(model).client.eval()
            answers = []
            for s in samples:
                ids, mask = prompts.encode([s.question])
                with torch.inference_mode():
                    codes = client(torch.from_numpy(ids), torch.from_numpy(mask),
                                   torch.from_numpy(preprocess(s.image, m.image))).wire.numpy()
                frame = codes_frame(FrameKind.INFER_REQUEST, codes, m.levels, request_id=new_request_id(),
                                    fingerprint=m.fingerprint_bytes)
                answers.append(t.request(frame).json()["text"])
    return {"peak_rss_mb": peak_rss_mb(),
            "torch_imported": "torch" in sys.modules, "answers": answers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a trained split model dir (default: tiny preset)")
    ap.add_argument("--questions", type=int, default=100, help="questions for the uplink figures")
    ap.add_argument("--devices", type=int, default=16)
    ap.add_argument("--per-device", type=int, default=8)
    ap.add_argument("--server-threads", type=int, default=2)
    ap.add_argument("--worker", choices=["onnx", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(rss_worker(args.worker, args.bundle, args.model, args.port, 20)))
        return 0

    from edgeqtl import shapes
    from edgeqtl.bench.server import ServerProcess, measure
    from edgeqtl.broker import MosquittoBroker

    tmp = Path(tempfile.mkdtemp(prefix="edgeqtl-agents-"))
    bundles = export_models(args.model, tmp)
    with MosquittoBroker() as broker:
        print("1. uplink bytes per question, frames with their headers (MQTT's own ~60 B a message is the same "
              "for all)")
        print(f"{'cut':>4}{'questions':>10}{'trips':>7}{'16-bit':>8}{'packed':>8}{'saved':>7}{'entropy':>9}"
              f"{'saved':>7}{'model bits/code':>17}{'same answers':>14}")
        for cut, bundle in bundles.items():
            srv = ServerProcess(bundle, broker.port, 16, args.server_threads, tmp / f"srv-up-{cut}.log")
            try:
                u = uplink(bundle, broker.port, args.questions)
            finally:
                srv.stop()
            print(f"{cut:>4}{u['n']:>10}{u['round_trips']:>7.2f}{u['fp16']:>8.0f}{u['packed']:>8.0f}"
                  f"{100 * (1 - u['packed'] / u['fp16']):>6.1f}%{u['coded']:>9.0f}{100 * (1 - u['coded'] / u['fp16']):>6.1f}%"
                  f"{u['model_bits']:>17.2f}{u['same_answers']:>10}/{u['n']}")

        cut0 = bundles.get(0) or next(iter(bundles.values()))
        rates = {}
        asked = shapes.heldout(max(1, args.devices * args.per_device // len(shapes.FAMILIES) + 1))
        for max_batch in (1, 16):
            srv = ServerProcess(cut0, broker.port, max_batch, args.server_threads, tmp / f"srv-{max_batch}.log")
            try:
                rates[max_batch] = measure(cut0, broker.port, args.devices, args.per_device, asked,
                                           f"agents-b{max_batch}")["answers_per_s"]
            finally:
                rates[f"stats{max_batch}"] = srv.stop()
        print(f"\n2. server throughput, {args.devices} devices asking at once, {args.devices * args.per_device} "
              f"questions, server with {args.server_threads} threads, cut {0 if 0 in bundles else '?'}")
        print(f"{'server':<26}{'answers/s':>10}{'batches':>9}{'speedup':>9}")
        for mb, name in ((1, "one at a time (batch 1)"), (16, "micro-batched (batch <=16)")):
            st = rates[f"stats{mb}"]
            print(f"{name:<26}{rates[mb]:>10.1f}{st.get('batches', 0):>9}{rates[mb] / rates[1]:>8.2f}x")

        srv = ServerProcess(cut0, broker.port, 16, args.server_threads, tmp / "srv-rss.log")
        model = args.model
        if model is None:
            model = tmp / "m0"
        try:
            res = {}
            for kind in ("onnx", "torch"):
                out = subprocess.run([sys.executable, __file__, "--worker", kind, "--bundle", str(cut0), "--model",
                                      str(model), "--port", str(broker.port)], check=True, capture_output=True,
                                     text=True)
                res[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            srv.stop()
        same = sum(a == b for a, b in zip(res["onnx"]["answers"], res["torch"]["answers"]))
        print(f"\n3. peak RSS answering {len(res['onnx']['answers'])} questions over the broker (cut 0, 2 threads)")
        print(f"{'client':<30}{'peak RSS MB':>12}{'torch loaded':>14}")
        print(f"{'device agent (ONNX Runtime)':<30}{res['onnx']['peak_rss_mb']:>12.0f}{str(res['onnx']['torch_imported']):>14}")
        print(f"{'PyTorch client half':<30}{res['torch']['peak_rss_mb']:>12.0f}{str(res['torch']['torch_imported']):>14}")
        print(f"ratio {res['torch']['peak_rss_mb'] / res['onnx']['peak_rss_mb']:.1f}x; same answers on "
              f"{same}/{len(res['onnx']['answers'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
