"""What a lab cluster scrapes from a server agent: Prometheus metrics (prometheus_client)
and liveness/readiness, on one small HTTP port.

    GET /metrics   the counters and histograms below, Prometheus text format
    GET /healthz   200 while the process runs (liveness)
    GET /readyz    200 while connected to the broker, else 503 (readiness)

The Responder (edgeqtl.transport) reports every batch it answers through `observe_batch`
and every frame it cannot decode through `observe_bad_frame`; the training service's
applied steps and the sessions held are read at each scrape. Each AgentMetrics has its own registry, so two agents in one process
(the tests) do not share counters. Torch-free.
"""
from __future__ import annotations

import http.server
import json
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class AgentMetrics:
    def __init__(self, server_id: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        labels = {"server": server_id}
        self.requests = Counter("edgeqtl_requests", "Requests answered, by frame kind", ["server", "kind"], registry=r)
        self.errors = Counter("edgeqtl_errors", "ERROR replies, by code", ["server", "code"], registry=r)
        self.duplicates = Counter("edgeqtl_duplicates", "Repeated requests answered from the cache", ["server"],
                                  registry=r)
        self.latency = Histogram("edgeqtl_request_seconds", "Time from taking a batch to its replies, per request",
                                 ["server"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("edgeqtl_batch_size", "Requests answered together", ["server"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.bytes_in = Counter("edgeqtl_bytes_in", "Request bytes received, by codec", ["server", "codec"],
                                registry=r)
        self.bytes_out = Counter("edgeqtl_bytes_out", "Reply bytes sent, by codec", ["server", "codec"], registry=r)
        self.sessions = Gauge("edgeqtl_sessions", "Generations (cut > 0) or training devices held", ["server"],
                              registry=r)
        self.training_steps = Counter("edgeqtl_training_steps", "Split-training steps applied", ["server"],
                                      registry=r)
        self._labels = labels
        self.sessions_fn: Callable[[], int] | None = None
        self.steps_fn: Callable[[], int] | None = None  # the training service's applied steps so far
        self._steps_seen = 0

    def observe_batch(self, frames, replies, encoded: list[bytes], seconds: float, bytes_in: list[int]) -> None:
        s = self._labels["server"]
        self.batch_size.labels(s).observe(len(frames))
        for frame, reply, data, n_in in zip(frames, replies, encoded, bytes_in):
            self.requests.labels(s, frame.kind.name).inc()
            self.latency.labels(s).observe(seconds)
            self.bytes_in.labels(s, frame.codec.name).inc(n_in)
            self.bytes_out.labels(s, reply.codec.name).inc(len(data))
            if reply.kind.name == "ERROR":
                try:
                    code = str(reply.json().get("code", "error"))
                except Exception:  # noqa: BLE001 - a metric never breaks a reply
                    code = "error"
                self.errors.labels(s, code).inc()

    def observe_bad_frame(self, n_bytes: int) -> None:
        s = self._labels["server"]
        self.errors.labels(s, "bad_frame").inc()
        self.bytes_in.labels(s, "undecodable").inc(n_bytes)

    def observe_duplicate(self) -> None:
        self.duplicates.labels(self._labels["server"]).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        if self.steps_fn is not None:
            steps = self.steps_fn()
            if steps > self._steps_seen:
                self.training_steps.labels(self._labels["server"]).inc(steps - self._steps_seen)
                self._steps_seen = steps
        if self.sessions_fn is not None:
            try:
                self.sessions.labels(self._labels["server"]).set(self.sessions_fn())
            except Exception:  # noqa: BLE001 - a dict changing size under us: next scrape
                pass
        return generate_latest(self.registry)


class MetricsServer:
    """The HTTP port: /metrics, /healthz, /readyz. `ready()` says whether the agent can serve."""

    def __init__(self, metrics: AgentMetrics, ready: Callable[[], bool], port: int, host: str = "0.0.0.0"):
        metrics_, ready_ = metrics, ready

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server name
                if self.path.split("?")[0] == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST

                    self._send(200, metrics_.render(), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    self._send(200, b'{"alive": true}\n', "application/json")
                elif self.path == "/readyz":
                    ok = ready_()
                    self._send(200 if ok else 503, json.dumps({"ready": ok}).encode() + b"\n", "application/json")
                else:
                    self._send(404, b"not found: /metrics, /healthz, /readyz\n", "text/plain")

            def _send(self, code: int, body: bytes, kind: str):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds: not worth a log line each
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="edgeqtl-metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
