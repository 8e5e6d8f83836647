"""Load with faults: many devices asking at once against server agents on one shared
subscription, while a server is SIGKILLed and restarted and the broker restarts. Every
request must be answered exactly once, with the right answer.

    LoadTest(broker, start_server, requests, expected).run(devices, seconds, faults)

Each device is a thread with its own MQTT client that asks, waits for the answer and asks
again (closed loop), retrying a request (same id) through any outage as the device
runner does, until it is answered or `give_up_s` passes (then it counts as lost). The
server agents are processes (`start_server(i)` returns a Popen), so a kill is a real one.
Counted at the devices: requests sent, answered (each call returns one answer or none),
lost (none within give_up_s), wrong answers, and per request id every reply delivered,
so that deliveries beyond the first (a retry answered by both servers, a redelivery after
the broker restart; the device drops them) show what the faults cost. Torch-free.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .transport import BrokerConfig, RequestClient, TransportError
from .wire import Frame, decode_frame, new_request_id


@dataclasses.dataclass
class Fault:
    at_s: float  # seconds into the run
    action: str  # "kill_server" (SIGKILL, restart after `restart_after_s`) or "restart_broker"
    server: int = 0
    restart_after_s: float = 2.0


@dataclasses.dataclass
class LoadReport:
    devices: int
    seconds: float
    sent: int = 0
    answered: int = 0
    lost: int = 0
    wrong: int = 0
    late_duplicates: int = 0  # extra deliveries of an answer already taken, dropped by the device
    retries: int = 0
    latencies_s: list = dataclasses.field(default_factory=list)
    faults: list = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        lat = np.array(self.latencies_s) if self.latencies_s else np.array([np.nan])
        return {"devices": self.devices, "seconds": round(self.seconds, 1), "sent": self.sent,
                "answered": self.answered, "lost": self.lost, "wrong": self.wrong,
                "late_duplicates": self.late_duplicates,
                "retries": self.retries, "answers_per_s": round(self.answered / self.seconds, 1),
                "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 1),
                "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 1),
                "max_ms": round(1e3 * float(np.max(lat)), 1), "faults": self.faults}


class _CountingClient(RequestClient):
    """A RequestClient that also counts every reply delivered per request id, taken or not."""

    def __init__(self, cfg: BrokerConfig, device_id: str, counts: collections.Counter, lock: threading.Lock):
        super().__init__(cfg, device_id)
        self._counts, self._count_lock = counts, lock

    def _on_reply(self, batch) -> None:
        for m in batch:
            try:
                f = decode_frame(m.payload)
            except Exception:  # noqa: BLE001 - the base class logs and drops it
                continue
            with self._count_lock:
                self._counts[f.request_id] += 1
        super()._on_reply(batch)


class LoadTest:
    def __init__(self, broker, start_server: Callable[[int], object], requests: list[Frame],
                 check: Callable[[int, Frame], bool], servers: int = 2, timeout: float = 3.0,
                 give_up_s: float = 60.0, think_s: float = 0.05, ready_s: float = 120.0):
        """broker: a started MosquittoBroker (restart() is used); requests: one frame per
        kind of question; check(k, reply): whether reply answers request k rightly.
        The timed run starts once a server answers (at most ready_s after they start)."""
        self.broker, self.start_server, self.requests, self.check = broker, start_server, requests, check
        self.ready_s = ready_s
        self.servers, self.timeout, self.give_up_s, self.think_s = servers, timeout, give_up_s, think_s

    def wait_until_served(self) -> None:
        deadline = time.monotonic() + self.ready_s
        with RequestClient(BrokerConfig(port=self.broker.port), "load-warmup") as t:
            while time.monotonic() < deadline:
                try:
                    t.request(dataclasses.replace(self.requests[0], request_id=new_request_id()), timeout=2, retries=0)
                    return
                except TransportError:
                    continue
        raise TransportError(f"no server agent answered within {self.ready_s:.0f} s of starting")

    def run(self, devices: int, seconds: float, faults: list[Fault] = ()) -> LoadReport:
        procs = [self.start_server(i) for i in range(self.servers)]
        self.wait_until_served()
        time.sleep(1.0)  # the second server's subscription, too
        report = LoadReport(devices, seconds)
        delivered: collections.Counter = collections.Counter()
        lock = threading.Lock()
        stop = threading.Event()
        cfg = BrokerConfig(port=self.broker.port)
        clients = [_CountingClient(cfg, f"load-{d:03d}", delivered, lock).start(timeout=10) for d in range(devices)]
        mine: list[list[bytes]] = [[] for _ in range(devices)]

        def device(d: int) -> None:
            rng = np.random.default_rng(d)
            client = clients[d]
            while not stop.is_set():
                k = int(rng.integers(0, len(self.requests)))
                frame = dataclasses.replace(self.requests[k], request_id=new_request_id())
                mine[d].append(frame.request_id)
                t0 = time.monotonic()
                with lock:
                    report.sent += 1
                answer = None
                while answer is None and time.monotonic() - t0 < self.give_up_s:
                    try:
                        answer = client.request(frame, timeout=self.timeout, retries=0)
                    except TransportError:
                        with lock:
                            report.retries += 1
                        time.sleep(0.2)
                with lock:
                    if answer is None:
                        report.lost += 1
                    else:
                        report.answered += 1
                        report.latencies_s.append(time.monotonic() - t0)
                        report.wrong += not self.check(k, answer)
                time.sleep(float(rng.uniform(0, 2 * self.think_s)))

        threads = [threading.Thread(target=device, args=(d,), daemon=True) for d in range(devices)]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        try:
            for fault in sorted(faults, key=lambda f: f.at_s):
                time.sleep(max(0.0, t_start + fault.at_s - time.monotonic()))
                if fault.action == "kill_server":
                    os.kill(procs[fault.server].pid, signal.SIGKILL)
                    procs[fault.server].wait()
                    report.faults.append(f"{time.monotonic() - t_start:.1f} s: SIGKILL server {fault.server}")
                    time.sleep(fault.restart_after_s)
                    procs[fault.server] = self.start_server(fault.server)
                    report.faults.append(f"{time.monotonic() - t_start:.1f} s: server {fault.server} started again")
                elif fault.action == "restart_broker":
                    self.broker.restart()
                    report.faults.append(f"{time.monotonic() - t_start:.1f} s: broker restarted")
                else:
                    raise ValueError(f"unknown fault {fault.action!r}")
            time.sleep(max(0.0, t_start + seconds - time.monotonic()))
        finally:
            stop.set()
            for t in threads:
                t.join(self.give_up_s + self.timeout + 5)
            report.seconds = time.monotonic() - t_start
            time.sleep(1.0)  # late deliveries still in flight
            for c in clients:
                c.stop()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except Exception:  # noqa: BLE001 - a server that will not stop is killed
                    p.kill()
        with lock:
            for ids in mine:
                for rid in ids:
                    n = delivered.get(rid, 0)
                    report.late_duplicates += max(0, n - 1)
        return report


def tiny_setup(work: Path, max_new_tokens: int = 2):
    """A tiny bundle (untrained: the figures are the transport's), its request frames for a
    few questions, and their right answers (from the engine in this process; needs torch)."""
    from edgeqtl import shapes
    from edgeqtl.device_agent.client import DeviceClient
    from edgeqtl.export.bundle import ExportOptions, export_bundle
    from edgeqtl.models.checkpoint import save_checkpoint
    from edgeqtl.models.presets import build_tiny
    from edgeqtl.models.split import SplitConfig, SplitModel
    from edgeqtl.server_agent.agent import load_engine
    save_checkpoint(SplitModel(build_tiny(3), SplitConfig(cut=0, levels=4)), work / "model")
    export_bundle(ExportOptions(work / "model", work / "bundle", verify=False), progress=None)
    client = DeviceClient(work / "bundle", reuse_images=False)
    engine = load_engine(work / "bundle" / "server", max_new_tokens=max_new_tokens)
    frames = [client.request_frame(s.image, s.question) for s in shapes.heldout(1)[:5]]
    expected = [engine.handle(f).json()["text"] for f in frames]
    return work / "bundle" / "server", frames, expected


def server_process_starter(server_half: Path, port: int, work: Path, max_new_tokens: int = 2):
    def start(i: int):
        log = open(work / f"server{i}-{time.time():.0f}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "edgeqtl.cli", "server", "serve", "--server-half",
                                 str(server_half), "--broker", f"mqtt://127.0.0.1:{port}", "--server-id", f"load-srv-{i}",
                                 "--max-new-tokens", str(max_new_tokens), "--threads", "1"],
                                stdout=log, stderr=subprocess.STDOUT)
    return start
