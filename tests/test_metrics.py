"""The server agent's Prometheus metrics and health endpoints, on a real mosquitto."""
from __future__ import annotations

import re
import urllib.error
import urllib.request

from edgeqtl.errors import CodedError
from edgeqtl.metrics import AgentMetrics, MetricsServer
from edgeqtl.transport import BrokerConfig, RequestClient, Responder, one_by_one, request_topic
from edgeqtl.wire import FrameKind, error_frame, json_frame, new_request_id


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _value(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_errors_bytes_and_health(mosquitto):
    def handle(frame):
        if frame.json().get("fail"):
            return error_frame(CodedError("bad_shape", "no"), **frame.reply_fields())
        return json_frame(FrameKind.ANSWER, {"text": "ok"}, **frame.reply_fields())

    cfg = BrokerConfig(port=mosquitto.port)
    agent = Responder(cfg, one_by_one(handle), client_id="srv-metrics").start()
    agent.metrics = AgentMetrics(agent.server_id)
    agent.metrics.sessions_fn = lambda: 3
    http = MetricsServer(agent.metrics, ready=lambda: agent.endpoint.connected, port=0, host="127.0.0.1").start()
    base = f"http://127.0.0.1:{http.port}"
    try:
        assert _get(base + "/healthz")[0] == 200 and _get(base + "/readyz")[0] == 200
        _, before = _get(base + "/metrics")
        assert _value(before, "edgeqtl_requests_total", kind="INFER_REQUEST") == 0
        with RequestClient(cfg, "dev-metrics") as dev:
            for fail in (False, False, True):
                dev.request(json_frame(FrameKind.INFER_REQUEST, {"fail": fail}, request_id=new_request_id(),
                                       fingerprint=bytes(16)), timeout=5)
            dev.endpoint.publish(request_topic("dev-metrics"), b"not a frame", dev.reply_topic, bytes(16))
            dev.request(json_frame(FrameKind.INFER_REQUEST, {}, request_id=new_request_id(), fingerprint=bytes(16)),
                        timeout=5)  # after the garbage: it has been counted by now
        _, after = _get(base + "/metrics")
        assert _value(after, "edgeqtl_requests_total", kind="INFER_REQUEST", server="srv-metrics") == 4
        assert _value(after, "edgeqtl_errors_total", code="bad_shape") == 1
        assert _value(after, "edgeqtl_errors_total", code="bad_frame") == 1
        assert _value(after, "edgeqtl_bytes_in_total", codec="JSON") > 0
        assert _value(after, "edgeqtl_bytes_out_total", codec="JSON") > 0
        assert _value(after, "edgeqtl_request_seconds_count") == 4
        assert _value(after, "edgeqtl_batch_size_count") == 4
        assert re.search(r'edgeqtl_sessions\{server="srv-metrics"\} 3\.0', after)
        agent.stop()
        assert _get(base + "/readyz")[0] == 503  # not connected: not ready
        assert _get(base + "/healthz")[0] == 200
    finally:
        http.stop()
