"""Sessions across reconnects on a real mosquitto: a server agent with a kept session gets
the requests published while it was away; a request older than the device's patience is
dropped by the broker, not answered late."""
from __future__ import annotations

import threading
import time

import pytest

from edgeqtl.transport import BrokerConfig, RequestClient, RequestTimeout, Responder, one_by_one
from edgeqtl.wire import FrameKind, json_frame, new_request_id


def _echo(seen: list):
    def handle(frame):
        seen.append(frame.request_id)
        return json_frame(FrameKind.ANSWER, {"text": "ok"}, **frame.reply_fields())
    return one_by_one(handle)


def _request():
    return json_frame(FrameKind.INFER_REQUEST, {}, request_id=new_request_id(), fingerprint=bytes(16))


def test_a_server_with_a_kept_session_gets_what_came_while_it_was_away(mosquitto):
    kept = BrokerConfig(port=mosquitto.port, session_expiry=60)
    seen = []
    Responder(kept, _echo(seen), client_id="srv-kept").start().stop()  # leaves its session (and subscription)
    with RequestClient(BrokerConfig(port=mosquitto.port), "dev-kept") as dev:
        box = []
        asker = threading.Thread(target=lambda: box.append(dev.request(_request(), timeout=15, retries=0)))
        asker.start()
        time.sleep(1.0)  # published and queued while no server is connected
        assert not box
        with Responder(kept, _echo(seen), client_id="srv-kept"):
            asker.join(20)
        assert box and box[0].kind == FrameKind.ANSWER and len(seen) == 1


def test_a_clean_server_session_keeps_nothing(mosquitto):
    seen = []
    clean = BrokerConfig(port=mosquitto.port)
    Responder(clean, _echo(seen), client_id="srv-clean").start().stop()
    with RequestClient(BrokerConfig(port=mosquitto.port), "dev-clean") as dev:
        with pytest.raises(RequestTimeout):
            dev.request(_request(), timeout=1, retries=0)
    with Responder(clean, _echo(seen), client_id="srv-clean"):
        time.sleep(1.0)
    assert seen == []


def test_an_expired_request_is_not_processed(mosquitto):
    kept = BrokerConfig(port=mosquitto.port, session_expiry=60)
    seen = []
    Responder(kept, _echo(seen), client_id="srv-late").start().stop()
    with RequestClient(BrokerConfig(port=mosquitto.port), "dev-late") as dev:
        with pytest.raises(RequestTimeout):
            dev.request(_request(), timeout=1, retries=0)  # the device's patience: 1 s, the message's expiry
        time.sleep(1.5)
        fresh = _request()
        box = []
        asker = threading.Thread(target=lambda: box.append(dev.request(fresh, timeout=15, retries=0)))
        asker.start()
        time.sleep(0.5)
        with Responder(kept, _echo(seen), client_id="srv-late"):
            asker.join(20)
    assert seen == [fresh.request_id]  # the stale one was dropped by the broker; the fresh one answered
    assert box and box[0].kind == FrameKind.ANSWER


def test_session_expiry_is_read_from_the_broker_url():
    assert BrokerConfig.from_url("mqtt://h:1883?session_expiry=600").session_expiry == 600
    assert BrokerConfig.from_url("mqtt://h").session_expiry is None
