"""Generation at real size: time to the first token and per-token time at cut 0 and cut 2,
on loopback and over an emulated link; bytes up for several questions about one image,
with and without the image sent by reference.

    python benchmarks/generation.py                              # llava-interleave-qwen-0.5b, random weights
    python benchmarks/generation.py --scale 0.1 --new-tokens 8   # the same structure, small: minutes

Steps:
  1. the checkpoint from the published config (`edgeqtl zoo`, nothing downloaded), unless
     --checkpoint names one;
  2. `edgeqtl export --cut C --bits 2 --no-verify` for each cut (kept under --work);
  3. per cut, mosquitto, one server agent and the device client in this process: each
     question streamed (cut 0: a TOKENS frame per token; cut > 0: a round trip per
     token), on loopback and through the link relay with each --links profile. The end
     ids are replaced by one no model makes, so that every answer has --new-tokens
     tokens and the per-token time is over the same count (random weights would stop
     anywhere);
  4. per cut, --questions questions about one image, asked with and without the image by
     reference: the bytes each sends, headers included.

Time to first token: from the question (the device's encoding included) to the first
token on the device. Per-token time: (answer received - first token) / (tokens - 1).
Random weights measure cost, never accuracy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

EDGEQTL = [sys.executable, "-m", "edgeqtl.cli"]
QUESTIONS = ["describe the image .", "what is in the middle ?", "how many objects are there ?",
             "what color is the largest object ?", "is there any text ?", "what is on the left ?"]


def sh(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - t0


def image_of():
    from edgeqtl import shapes

    return shapes.heldout(1)[0].image


def timing_rows(bundle: Path, cut: int, links: list[str], new_tokens: int, repeats: int) -> list[dict]:
    import dataclasses

    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.link import PROFILES, LinkRelay
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.transport import BrokerConfig, RequestClient
    from edgeqtl.wire import InferOptions

    engine = load_engine(bundle / "server", max_new_tokens=new_tokens)
    engine.settings = dataclasses.replace(engine.settings, eos_token_ids=(2 ** 31 - 1,))
    client = DeviceClient(bundle, reuse_images=False)
    options = InferOptions(stream=1 if cut == 0 else 0)
    image = image_of()
    rows = []
    with MosquittoBroker() as broker, ServerAgent(engine, BrokerConfig(port=broker.port)):
        for link in ["loopback", *links]:
            relay = None if link == "loopback" else LinkRelay("127.0.0.1", 0, "127.0.0.1", broker.port,
                                                              PROFILES[link]).start()
            port = broker.port if relay is None else relay.port
            with RequestClient(BrokerConfig(port=port), f"gen-bench-{link}-cut{cut}") as t:
                answers = [client.ask(t, image, QUESTIONS[i % len(QUESTIONS)], timeout=600, options=options)
                           for i in range(repeats)]
            if relay is not None:
                relay.stop()
            ttft = statistics.median(a.first_token_s for a in answers)
            per = statistics.median((a.latency_s - a.first_token_s) / max(1, a.tokens - 1) for a in answers)
            rows.append({"cut": cut, "link": link, "tokens": answers[0].tokens, "questions": repeats,
                         "first_token_s": round(ttft, 3), "per_token_ms": round(1e3 * per, 1),
                         "answer_s": round(statistics.median(a.latency_s for a in answers), 3),
                         "bytes_up": answers[0].bytes_up})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def reference_rows(bundle: Path, cut: int, questions: int) -> list[dict]:
    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.transport import BrokerConfig, RequestClient

    engine = load_engine(bundle / "server", max_new_tokens=2)
    image = image_of()
    rows = []
    with MosquittoBroker() as broker, ServerAgent(engine, BrokerConfig(port=broker.port)):
        for reuse in (False, True):
            client = DeviceClient(bundle, reuse_images=reuse)
            with RequestClient(BrokerConfig(port=broker.port), f"gen-bench-ref{int(reuse)}-cut{cut}") as t:
                answers = [client.ask(t, image, QUESTIONS[i % len(QUESTIONS)], timeout=600) for i in range(questions)]
            rows.append({"cut": cut, "image_by_reference": reuse, "questions": questions,
                         "bytes_up": sum(a.bytes_up for a in answers), "per_question": [a.bytes_up for a in answers],
                         "by_reference": sum(a.image_by_reference for a in answers),
                         "bytes_up_fp16": sum(a.bytes_up_fp16 for a in answers)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="A checkpoint to use instead of `edgeqtl zoo`.")
    ap.add_argument("--zoo", default="llava-interleave-qwen-0.5b")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--cuts", default="0,2")
    ap.add_argument("--links", default="4g", help="Link profiles besides loopback (comma-separated; '' for none).")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="Questions per (cut, link); the median is reported.")
    ap.add_argument("--questions", type=int, default=5, help="Questions about one image, for the bytes.")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-generation"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint or args.work / f"{args.zoo}-x{args.scale:g}"
    if not (ckpt / "config.json").is_file():
        print(f"building {ckpt} ...", flush=True)
        sh([*EDGEQTL, "zoo", args.zoo, "--out", str(ckpt), "--scale", str(args.scale)], args.work / "zoo.log")
    out = {"checkpoint": str(ckpt), "timing": [], "bytes": []}
    for cut in [int(c) for c in args.cuts.split(",")]:
        bundle = args.work / f"bundle-{ckpt.name}-cut{cut}"
        if not (bundle / "manifest.json").is_file():
            print(f"exporting {bundle} ...", flush=True)
            s = sh([*EDGEQTL, "export", "--model", str(ckpt), "--cut", str(cut), "--bits", "2", "--no-verify",
                    "--out", str(bundle)], args.work / f"export-cut{cut}.log")
            print(f"  exported in {s:.0f} s", flush=True)
        out["timing"] += timing_rows(bundle, cut, [x for x in args.links.split(",") if x], args.new_tokens,
                                     args.repeats)
        out["bytes"] += reference_rows(bundle, cut, args.questions)
    (args.work / "generation.json").write_text(json.dumps(out, indent=2))
    print("\n| cut | link | first token | per token | answer | bytes up |\n| --- | --- | --- | --- | --- | --- |")
    for r in out["timing"]:
        print(f"| {r['cut']} | {r['link']} | {r['first_token_s']:.2f} s | {r['per_token_ms']:.0f} ms | "
              f"{r['answer_s']:.2f} s ({r['tokens']} tokens) | {r['bytes_up']:,} B |")
    print(f"\n| cut | {args.questions} questions, one image | bytes up | by reference |\n| --- | --- | --- | --- |")
    for r in out["bytes"]:
        print(f"| {r['cut']} | {'image by reference' if r['image_by_reference'] else 'image every time'} | "
              f"{r['bytes_up']:,} B | {r['by_reference']} |")


if __name__ == "__main__":
    main()
