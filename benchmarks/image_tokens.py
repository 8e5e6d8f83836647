"""Fewer image tokens up (models/reduce.py), at real size: for each reducer and K, the
bytes one question sends, the device's encoding time, and the server's time to the
first token and to the whole answer, against the bundle that sends every image token,
side by side.

    python benchmarks/image_tokens.py                                  # interleave-0.5b, cut 0, K = 64
    python benchmarks/image_tokens.py --scale 0.1 --configs none,divprune:64,pool:16   # minutes
    python benchmarks/image_tokens.py --cut 2 --configs none,divprune:64,fastv:64      # FastV prunes at the cut

Steps:
  1. the checkpoint from the published config (`edgeqtl zoo`), or --checkpoint;
  2. `edgeqtl export --cut C --bits 2 --no-verify [--image-tokens K --reducer R]` per config
     (kept under --work, reused when there);
  3. per bundle: mosquitto, one server agent, the device client in this process; --repeats
     questions about one image, each a full resend (no image by reference), answers of
     --new-tokens tokens (the end ids replaced by one no model makes). Bytes up are the
     frames sent, headers included, entropy-coded (the bundle's default) and plainly
     packed, against the same prompt as 16-bit hidden states with every image token;
     device time is the prefill graph's run on the preprocessed image; then, in a fresh
     process as the device agent runs, one question's frame built end to end (median) and
     that process's peak RSS (fp32 graph, 1 thread); the first token
     is timed from the question on (at cut 0 without streaming: the whole answer).

Random weights measure cost (bytes, time), never accuracy: what each reducer keeps of a
trained model's answers is not measured here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

EDGEQTL = [sys.executable, "-m", "edgeqtl.cli"]
QUESTIONS = ["describe the image .", "what is in the middle ?", "how many objects are there ?"]


def sh(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-2000:]}")
    return time.perf_counter() - t0


DEVICE = r"""
import json, statistics, sys, time
from edgeqtl import shapes
from edgeqtl.device_agent.client import DeviceClient
from edgeqtl.memory import peak_rss_mb
c = DeviceClient(sys.argv[1], variant="fp32", threads=1)
s = shapes.heldout(1)[0]
c.request_frame(s.image, s.question)  # warm-up
times = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    c.request_frame(s.image, s.question)  # the whole device path: preprocess, prefill graph, codes, frame
    times.append(time.perf_counter() - t0)
print(json.dumps({"device_question_s": statistics.median(times), "device_peak_rss_mb": peak_rss_mb()}))
"""


def device_process(bundle: Path, repeats: int) -> dict:
    """The device's side alone, in a fresh process (as the device agent runs): one
    question's request frame built end to end, its median time and the process's peak RSS."""
    out = subprocess.run([sys.executable, "-c", DEVICE, str(bundle), str(repeats)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(bundle: Path, new_tokens: int, repeats: int) -> dict:
    import numpy as np

    from edgeqtl import shapes
    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.imageproc import preprocess
    from edgeqtl.server_agent.agent import ServerAgent, load_engine
    from edgeqtl.transport import BrokerConfig, RequestClient

    engine = load_engine(bundle / "server", max_new_tokens=new_tokens)
    engine.settings = dataclasses.replace(engine.settings, eos_token_ids=(2 ** 31 - 1,))
    client = DeviceClient(bundle, reuse_images=False)
    image = shapes.heldout(1)[0].image
    pix = preprocess([image], client.manifest.image)
    feeds = {"pixel_values": pix}
    if not client.manifest.prompt_ids:
        ids, mask = client.prompts.encode([QUESTIONS[0]])
        feeds.update(input_ids=ids, attention_mask=mask)
    client.prefill.run(None, feeds)  # warm-up
    device = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        client.prefill.run(None, feeds)
        device.append(time.perf_counter() - t0)
    with MosquittoBroker() as broker, ServerAgent(engine, BrokerConfig(port=broker.port)):
        with RequestClient(BrokerConfig(port=broker.port), f"tokens-bench-{abs(hash(bundle.name)) % 10**6}") as t:
            client.ask(t, image, QUESTIONS[0], timeout=600)  # warm-up
            answers = [client.ask(t, image, QUESTIONS[i % len(QUESTIONS)], timeout=600) for i in range(repeats)]
            packed = DeviceClient(bundle, reuse_images=False, entropy=False).ask(t, image, QUESTIONS[0], timeout=600)
    m = client.manifest
    del client, engine
    red = m.image_reduction or {}
    # FastV's prompt holds every image token and its frame K of them (+ OneVision's newline, not counted here)
    sent = red["tokens"] if red.get("reducer") == "fastv" else m.text.image_token_count
    return {**device_process(bundle, repeats), "bundle": bundle.name, "image_tokens": sent,
            "reducer": (m.image_reduction or {}).get("reducer", "none"),
            "bytes_up": int(np.median([a.bytes_up for a in answers])), "bytes_up_packed": packed.bytes_up,
            "bytes_up_fp16": answers[0].bytes_up_fp16,
            "device_s": round(statistics.median(device), 3),
            "first_token_s": round(statistics.median(a.first_token_s for a in answers), 3),
            "answer_s": round(statistics.median(a.latency_s for a in answers), 3),
            "tokens": answers[0].tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="A checkpoint to use instead of `edgeqtl zoo`.")
    ap.add_argument("--zoo", default="llava-interleave-qwen-0.5b")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--cut", type=int, default=0)
    ap.add_argument("--configs", default="none,divprune:64,pool:64,random:64",
                    help="Comma-separated: none, or REDUCER:K.")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="Questions per bundle (the median is reported).")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-image-tokens"))
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint or args.work / f"{args.zoo}-x{args.scale:g}"
    if not (ckpt / "config.json").is_file():
        print(f"building {ckpt} ...", flush=True)
        sh([*EDGEQTL, "zoo", args.zoo, "--out", str(ckpt), "--scale", str(args.scale)], args.work / "zoo.log")
    rows = []
    for config in args.configs.split(","):
        name = config.replace(":", "-")
        bundle = args.work / f"bundle-{ckpt.name}-cut{args.cut}-{name}"
        if not (bundle / "manifest.json").is_file():
            flags = [] if config == "none" else ["--reducer", config.split(":")[0], "--image-tokens",
                                                 config.split(":")[1]]
            print(f"exporting {bundle} ...", flush=True)
            s = sh([*EDGEQTL, "export", "--model", str(ckpt), "--cut", str(args.cut), "--bits", "2", "--no-verify",
                    *flags, "--out", str(bundle)], args.work / f"export-{name}.log")
            print(f"  exported in {s:.0f} s", flush=True)
        rows.append(measure(bundle, args.new_tokens, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    (args.work / "image_tokens.json").write_text(json.dumps(rows, indent=2))
    base = rows[0]
    print(f"\n{ckpt.name}, cut {args.cut}, 2 bits, answers of {base['tokens']} tokens, median of {args.repeats}")
    print(f"16-bit hidden states of the whole prompt with every image token: {base['bytes_up_fp16']:,} B")
    print("| reducer | image tokens | bytes up, packed | bytes up, entropy-coded | device prefill | device question, "
          "own process | device peak RSS | first token |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    fp16 = base["bytes_up_fp16"]
    for r in rows:
        print(f"| {r['reducer']} | {r['image_tokens']} | {r['bytes_up_packed']:,} B "
              f"({100 * (1 - r['bytes_up_packed'] / fp16):.2f}% less than 16-bit) | {r['bytes_up']:,} B "
              f"({100 * (1 - r['bytes_up'] / fp16):.2f}% less) | {r['device_s']:.2f} s "
              f"({base['device_s'] / r['device_s']:.2f}x) | {r['device_question_s']:.2f} s | "
              f"{r['device_peak_rss_mb']:,.0f} MB | {r['first_token_s']:.2f} s "
              f"({base['first_token_s'] / r['first_token_s']:.2f}x) |")


if __name__ == "__main__":
    main()
