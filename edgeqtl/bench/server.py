"""`edgeqtl bench server`: answers per second against the number of devices asking at
once, a server agent (`edgeqtl server serve`, its own process) micro-batching requests
(--max-batch 16) against answering them one at a time (--max-batch 1), over a real
mosquitto on loopback.

The devices are threads of this process sending request frames computed before the clock
starts (at cut 0; a bundle cut deeper answers decode steps too, so there each device runs
its client half while it asks): the figure is the server's, since on a fleet each device
runs its half on its own CPU. One untimed question per device warms the server up first.
"""
from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

TITLE = "Server throughput: answers/s against devices, micro-batched against one at a time"

FULL_DEVICES, QUICK_DEVICES = (1, 4, 16), (1, 4)
FULL_PER_DEVICE, QUICK_PER_DEVICE = 16, 8
MAX_BATCHES = (1, 16)  # one at a time, micro-batched
REQUEST_TIMEOUT_S = 120.0  # a reply later than this is a failure, not a slow answer
SERVER_START_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 20.0


class ServerProcess:
    """`edgeqtl server serve` in its own process: started in __init__ (ready when it says
    so), stopped by stop(), which returns the statistics it prints when it stops."""

    def __init__(self, bundle: Path, port: int, max_batch: int, threads: int, log: Path):
        self.log = log
        cmd = [sys.executable, "-m", "edgeqtl.cli", "server", "serve", "--server-half", str(bundle / "server"),
               "--broker", f"mqtt://127.0.0.1:{port}", "--max-batch", str(max_batch), "--threads", str(threads)]
        with log.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while "server agent on" not in log.read_text():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server agent exited ({self.proc.returncode}) before it was up:\n"
                                       f"{log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server agent was not up after {SERVER_START_TIMEOUT_S:.0f} s:\n"
                                       f"{log.read_text()[-2000:]}")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> dict:
        """SIGTERM (it stops as on Ctrl-C and prints its statistics), then SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        stats = [ln for ln in self.log.read_text().splitlines() if ln.startswith("stopped: ")]
        return json.loads(stats[-1][len("stopped: "):]) if stats else {}


def measure(bundle: Path, port: int, devices: int, per_device: int, questions, run_id: str) -> dict:
    """`devices` threads, each asking `per_device` questions in turn as fast as answers come.
    Returns answers/s over the timed part, per-answer latencies and the answers."""
    import numpy as np

    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.transport import BrokerConfig, RequestClient
    from edgeqtl.wire import FrameKind, new_request_id

    client = DeviceClient(bundle)
    asked = devices * per_device
    picked = [questions[i % len(questions)] for i in range(asked)]
    precomputed = client.manifest.cut == 0  # deeper cuts answer decode steps: the device must run then
    prompts = [client.request_frame(q.image, q.question) for q in picked] if precomputed else None
    answers: list[str | None] = [None] * asked
    latencies: list[float] = [0.0] * asked
    failures: list[str] = []
    transports = []
    try:
        for d in range(devices):
            transports.append(RequestClient(BrokerConfig(port=port), f"bench-{run_id}-{d}").start())

        def ask(d: int, i: int) -> str:
            if not precomputed:
                return client.ask(transports[d], picked[i].image, picked[i].question, timeout=REQUEST_TIMEOUT_S).text
            frame = dataclasses.replace(prompts[i], request_id=new_request_id())
            reply = transports[d].request(frame, timeout=REQUEST_TIMEOUT_S, retries=0)
            if reply.kind != FrameKind.ANSWER:
                raise RuntimeError(f"a {reply.kind.name} reply: {reply.json()}")
            return reply.json()["text"]

        for d in range(devices):  # warm-up, not timed: one question each
            ask(d, d)
        barrier = threading.Barrier(devices + 1)

        def device(d: int):
            barrier.wait()
            for i in range(d, asked, devices):
                t0 = time.perf_counter()
                try:
                    answers[i] = ask(d, i)
                except Exception as e:  # noqa: BLE001 - counted and reported after the run
                    failures.append(f"{type(e).__name__}: {e}")
                    return
                latencies[i] = time.perf_counter() - t0

        threads = [threading.Thread(target=device, args=(d,), daemon=True) for d in range(devices)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S * (per_device + 1))
        elapsed = time.perf_counter() - t0
        if any(t.is_alive() for t in threads):
            failures.append("a device thread did not finish")
    finally:
        for t in transports:
            t.stop()
    if failures:
        raise RuntimeError(f"{devices} devices: {len(failures)} failed: {failures[:3]}")
    answered = sum(a is not None for a in answers)
    lat_ms = 1e3 * np.asarray(latencies)
    return {"devices": devices, "asked": asked, "answered": answered, "warmup_questions": devices,
            "seconds": elapsed, "answers_per_s": answered / elapsed,
            "latency_median_ms": float(np.median(lat_ms)), "latency_p90_ms": float(np.percentile(lat_ms, 90)),
            "precomputed_frames": precomputed, "answers": answers}


def run(ctx):
    from edgeqtl.broker import MosquittoBroker, find_mosquitto
    from edgeqtl.bundle import BundleManifest

    from .fixtures import bundle_of, questions, the_model
    from .report import Section, busy_machine_note, markdown_table

    if find_mosquitto() is None:
        raise RuntimeError("the server suite needs mosquitto (apt-get install mosquitto, or brew install mosquitto)")
    model_dir = the_model(ctx)
    bundle = bundle_of(ctx, model_dir)
    manifest = BundleManifest.load(bundle)
    device_counts = QUICK_DEVICES if ctx.quick else FULL_DEVICES
    per_device = QUICK_PER_DEVICE if ctx.quick else FULL_PER_DEVICE
    # one thread in quick mode: it shares two busy cores with the devices (see client.py)
    server_threads = 1 if ctx.quick else min(2, os.cpu_count() or 1)
    qs = questions(ctx, max(device_counts) * per_device)
    if not qs:
        raise RuntimeError("no questions to ask: the data holds no usable records")
    work = ctx.work("server")
    load_before = os.getloadavg()[0]

    runs: dict[int, dict] = {}
    with MosquittoBroker() as broker:
        for max_batch in MAX_BATCHES:
            ctx.echo(f"  server agent, --max-batch {max_batch}: devices {', '.join(map(str, device_counts))}")
            server = ServerProcess(bundle, broker.port, max_batch, server_threads, work / f"server-{max_batch}.log")
            by_devices = {}
            try:
                for n in device_counts:
                    by_devices[n] = measure(bundle, broker.port, n, per_device, qs, f"b{max_batch}-d{n}")
            finally:
                stats = server.stop()
            runs[max_batch] = {"max_batch": max_batch, "server_stats": stats, "by_devices": by_devices}

    one, batched = runs[1]["by_devices"], runs[16]["by_devices"]
    largest = max(device_counts)
    same = {n: sum(a == b for a, b in zip(one[n]["answers"], batched[n]["answers"])) for n in device_counts}
    table_rows = []
    for n in device_counts:
        for label, r in (("one at a time (--max-batch 1)", one[n]), ("micro-batched (--max-batch 16)", batched[n])):
            table_rows.append([n, label, r["answered"], r["asked"], r["seconds"], r["answers_per_s"],
                               r["latency_median_ms"], r["latency_p90_ms"]])
    speedups = {n: batched[n]["answers_per_s"] / one[n]["answers_per_s"] for n in device_counts}
    for r in runs.values():
        st = r["server_stats"]
        r["questions_sent"] = sum(v["asked"] + v["warmup_questions"] for v in r["by_devices"].values())
        r["mean_batch"] = st["served"] / st["batches"] if st.get("batches") else None  # None: it printed none
        for v in r["by_devices"].values():
            v.pop("answers")  # the texts are compared above; the figures keep the counts
    # JSON keys are strings: the figures say "4", not 4, so that they read back as written
    json_runs = {str(k): {**v, "by_devices": {str(n): r for n, r in v["by_devices"].items()}} for k, v in runs.items()}
    figures = {"model": str(model_dir), "bundle": str(bundle), "cut": manifest.cut, "levels": manifest.levels,
               "server_threads": server_threads, "per_device": per_device, "device_counts": list(device_counts),
               "largest_devices": largest, "runs": json_runs,
               "answers_per_s": {"one_at_a_time": {str(n): one[n]["answers_per_s"] for n in device_counts},
                                 "batched": {str(n): batched[n]["answers_per_s"] for n in device_counts}},
               "batched_vs_one": {str(n): s for n, s in speedups.items()},
               "same_answers": {str(n): same[n] for n in device_counts},
               "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
               "cpu_count": os.cpu_count()}

    plot = _plot(ctx, device_counts, one, batched)
    table = markdown_table(["devices", "server", "answered", "asked", "seconds", "answers/s", "median ms/answer",
                            "p90 ms/answer"], table_rows)
    stats_table = markdown_table(
        ["server", "questions sent", "served", "batches", "mean batch"],
        [[f"--max-batch {k}", r["questions_sent"], r["server_stats"].get("served", "-"),
          r["server_stats"].get("batches", "-"), r["mean_batch"]] for k, r in runs.items()])
    how = ("request frames computed before the clock starts (cut 0: the server does all the generating)"
           if manifest.cut == 0 else f"the device half run by each device thread as it asks (cut {manifest.cut}: "
                                     "decode steps go back and forth), so device compute is in these figures")
    md = [f"A server agent (`edgeqtl server serve --max-batch N --threads {server_threads}`, its own process) "
          f"on the server half of `{bundle}`; 1 to {largest} devices (threads of the bench process, one MQTT "
          f"connection each) ask {per_device} questions each in turn over mosquitto on loopback, with {how}. "
          "One untimed question per device first.", "", table, "",
          "![answers/s against devices](server.png)", "",
          f"At {largest} devices: micro-batched {batched[largest]['answers_per_s']:.1f} answers/s against "
          f"{one[largest]['answers_per_s']:.1f} one at a time ({speedups[largest]:.2f}x). The same answers "
          "batched as one at a time: " + ", ".join(f"{same[n]}/{one[n]['asked']} at {n} device{'s' * (n > 1)}"
                                                   for n in device_counts) + ". At 1 device both servers do "
          "the same work (no request waits to be batched with another): a difference there is noise.", "",
          "What each server agent counted (warm-ups included; "
          + ("served equals questions sent when no request was repeated" if manifest.cut == 0 else
             "served counts each decode step too") + "):", "", stats_table, "",
          f"Caveats: the server, the devices and the broker share this machine's {os.cpu_count()} CPU cores "
          f"(load average {load_before:.1f} before, {figures['load_average_after']:.1f} after), so the devices' "
          "threads take CPU from the server, which a server machine of its own would not share. Loopback MQTT: "
          "no network delay."]
    md += busy_machine_note(load_before, "the rates are lowered by other work, and unevenly, so small differences "
                                         "mean little")
    if ctx.quick:
        md += ["", f"Quick mode: {per_device} questions per device and at most {largest} devices; the full run "
                   "goes to 16."]
    headline = [(f"server answers/s at {largest} devices, micro-batched vs one at a time",
                 f"{batched[largest]['answers_per_s']:.1f} vs {one[largest]['answers_per_s']:.1f} "
                 f"({speedups[largest]:.2f}x)")]
    return Section("server", TITLE, "\n".join(md), figures, [plot], headline)


def _plot(ctx, device_counts, one: dict, batched: dict) -> Path:
    from .report import new_figure, save_figure

    fig, ax = new_figure()
    ax.plot(device_counts, [one[n]["answers_per_s"] for n in device_counts], "o-", label="one at a time (batch 1)")
    ax.plot(device_counts, [batched[n]["answers_per_s"] for n in device_counts], "s-",
            label="micro-batched (batch <= 16)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(device_counts), [str(n) for n in device_counts])
    ax.set_xlabel("devices asking at once")
    ax.set_ylabel("answers per second")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, ctx.path("server.png"))
