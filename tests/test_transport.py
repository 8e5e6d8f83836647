"""MQTT transport over a real mosquitto on loopback (bounded loops, 127.0.0.1 only)."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from edgeqtl.broker import MosquittoBroker, free_port
from edgeqtl.transport import (BrokerConfig, BrokerUnavailable, Message, MqttEndpoint, PayloadTooLarge,
                               RequestClient, Responder, TransportError, one_by_one, reply_topic, request_topic)
from edgeqtl.wire import FrameKind, codes_frame, decode_frame, encode_frame, json_frame, new_request_id

FP = bytes(16)


def echo_one(frame):
    """Answers with the sum of the codes: proves the payload arrived intact."""
    return json_frame(FrameKind.ANSWER, {"sum": int(frame.array().sum()), "n": frame.array().size},
                      request_id=frame.request_id, fingerprint=frame.fingerprint)


echo = one_by_one(echo_one)


def _request(levels=4, shape=(1, 6, 8), seed=0):
    codes = np.random.default_rng(seed).integers(0, levels, size=shape).astype(np.uint8)
    return codes, codes_frame(FrameKind.INFER_REQUEST, codes, levels, request_id=new_request_id(), fingerprint=FP)


@pytest.mark.parametrize("protocol", [5, 311], ids=["mqtt5", "mqtt311"])
def test_request_response_round_trip(mosquitto, protocol):
    cfg = BrokerConfig(port=mosquitto.port, protocol=protocol)
    with Responder(cfg, echo), RequestClient(cfg, "dev-a") as dev:
        for seed in range(3):
            codes, req = _request(seed=seed)
            reply = dev.request(req, timeout=5)
            assert reply.kind == FrameKind.ANSWER and reply.request_id == req.request_id
            assert reply.json() == {"sum": int(codes.sum()), "n": codes.size}


def test_shared_subscription_spreads_work_over_two_servers(mosquitto):
    cfg = BrokerConfig(port=mosquitto.port)
    a, b = Responder(cfg, echo, client_id="srv-a"), Responder(cfg, echo, client_id="srv-b")
    with a, b, RequestClient(cfg, "dev-b") as dev:
        for seed in range(24):
            dev.request(_request(seed=seed)[1], timeout=5)
    assert a.served + b.served == 24
    assert a.served > 0 and b.served > 0, (a.served, b.served)


def test_duplicate_request_is_answered_from_cache(mosquitto):
    cfg = BrokerConfig(port=mosquitto.port)
    calls = []
    replies = []
    got = threading.Event()

    def handle(frames):
        calls.extend(f.request_id for f in frames)
        return echo(frames)

    def on_reply(batch: list[Message]):
        replies.extend(decode_frame(m.payload) for m in batch)
        if len(replies) == 2:
            got.set()

    _, req = _request()
    req.device_id, req.reply_topic = "dev-c", reply_topic("dev-c")
    data = encode_frame(req)
    with Responder(cfg, handle) as srv, MqttEndpoint(cfg, "raw-c", on_reply, [reply_topic("dev-c")]) as raw:
        raw.publish(request_topic("dev-c"), data)
        raw.publish(request_topic("dev-c"), data)  # as a QoS 1 redelivery or a retry would
        assert got.wait(5)
    assert len(calls) == 1 and srv.duplicates == 1
    assert replies[0] == replies[1]


def test_a_frame_that_claims_another_device_is_refused(mosquitto):
    """The broker's ACLs tie a request topic to its login; the server ties the frame's
    device id to the topic, so a device cannot pass as another inside the frame."""
    cfg = BrokerConfig(port=mosquitto.port)
    calls, replies, got = [], [], threading.Event()

    def on_reply(batch: list[Message]):
        replies.extend(decode_frame(m.payload) for m in batch)
        got.set()

    _, req = _request()
    req.device_id, req.reply_topic = "dev-b", reply_topic("dev-a")
    with Responder(cfg, lambda frames: calls.extend(frames) or echo(frames)), \
            MqttEndpoint(cfg, "raw-a", on_reply, [reply_topic("dev-a")]) as raw:
        raw.publish(request_topic("dev-a"), encode_frame(req))
        assert got.wait(5)
    assert calls == [] and replies[0].kind == FrameKind.ERROR
    assert replies[0].json()["code"] == "device_mismatch" and "dev-b" in replies[0].json()["message"]


def test_oversize_payload_that_is_not_a_frame_is_refused_before_sending():
    with MosquittoBroker(max_packet_size=4096) as broker:
        cfg = BrokerConfig(port=broker.port)
        with MqttEndpoint(cfg, "big") as ep:
            assert ep.max_packet_size == 4096  # from the CONNACK
            ep.publish("edgeqtl/v1/x", b"\0" * 2000)
            with pytest.raises(PayloadTooLarge, match="limit of 4096 bytes"):
                ep.publish("edgeqtl/v1/x", b"\0" * 8192)


@pytest.mark.parametrize("limit", ["connack", "configured"])
def test_frames_over_the_limit_travel_as_chunks_both_ways(limit):
    """A request of ~60 KB through a broker that takes 4 KB messages (CONNACK), or one
    whose user capped messages at 4 KB (AWS IoT Core style, MQTT 3.1.1 too): it arrives
    whole, and so does a large reply."""
    def big_echo(frame):
        codes = frame.array()
        return codes_frame(FrameKind.ANSWER, codes, 4, request_id=frame.request_id, fingerprint=frame.fingerprint)

    kw = {"max_packet_size": 4096} if limit == "connack" else {}
    with MosquittoBroker(**kw) as broker:
        cfg = BrokerConfig(port=broker.port, **({} if limit == "connack" else {"max_message_size": 4096,
                                                                                 "protocol": 311}))
        with Responder(cfg, one_by_one(big_echo)) as srv, RequestClient(cfg, "dev-big") as dev:
            codes, req = _request(shape=(1, 120, 2048), seed=5)
            reply = dev.request(req, timeout=10)
            assert np.array_equal(reply.array(), codes)
            assert srv.endpoint.reassembler.pending_frames == 0 and dev.endpoint.reassembler.pending_frames == 0


def test_corrupt_frame_gets_an_error_and_the_next_request_is_answered(mosquitto):
    cfg = BrokerConfig(port=mosquitto.port)
    errors = []
    got = threading.Event()

    def on_reply(batch):
        errors.extend(decode_frame(m.payload) for m in batch)
        got.set()

    _, req = _request()
    bad = bytearray(encode_frame(req))
    bad[20] ^= 0xFF
    with Responder(cfg, echo), MqttEndpoint(cfg, "raw-d", on_reply, [reply_topic("dev-d")]) as raw, \
            RequestClient(cfg, "dev-e") as dev:
        raw.publish(request_topic("dev-d"), bytes(bad))
        assert got.wait(5)
        assert errors[0].kind == FrameKind.ERROR and errors[0].json()["code"] == "bad_frame"
        assert "CRC32" in errors[0].json()["message"]
        codes, good = _request(seed=5)
        assert dev.request(good, timeout=5).json()["sum"] == int(codes.sum())


def test_dead_broker_is_a_clear_error():
    cfg = BrokerConfig(port=free_port())
    t0 = time.time()
    with pytest.raises(BrokerUnavailable, match="cannot reach broker"):
        MqttEndpoint(cfg, "nobody").start(timeout=1.5)
    assert time.time() - t0 < 10


def test_tcp_nodelay_is_set(mosquitto):
    with MqttEndpoint(BrokerConfig(port=mosquitto.port), "nd") as ep:
        assert ep.client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_client_reconnects_after_broker_restart(mosquitto):
    cfg = BrokerConfig(port=mosquitto.port)
    with Responder(cfg, echo), RequestClient(cfg, "dev-f") as dev:
        dev.request(_request()[1], timeout=5)
        mosquitto.restart()
        codes, req = _request(seed=9)
        assert dev.request(req, timeout=5, retries=6).json()["sum"] == int(codes.sum())


def test_broker_url_parsing():
    c = BrokerConfig.from_url("mqtts://alice:s%40cret@broker.lan?protocol=3.1.1", ca_file="/etc/ca.pem")
    assert (c.host, c.port, c.tls, c.username, c.password, c.protocol, c.ca_file) == \
        ("broker.lan", 8883, True, "alice", "s@cret", 311, "/etc/ca.pem")
    with pytest.raises(TransportError, match="mqtt://"):
        BrokerConfig.from_url("http://x")


def test_embedded_amqtt_broker_round_trip():
    from edgeqtl.broker import AmqttBroker

    with AmqttBroker() as broker:
        cfg = BrokerConfig.from_url(broker.url)
        assert cfg.protocol == 311
        with Responder(cfg, echo, group=None), RequestClient(cfg, "dev-g") as dev:
            codes, req = _request(seed=3)
            assert dev.request(req, timeout=5).json()["sum"] == int(codes.sum())


def _make_certs(directory):
    """A throwaway CA and a server certificate for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edgeqtl test CA")).issuer_name(name("edgeqtl test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "server.crt").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                             serialization.NoEncryption()))
    return directory / "ca.crt"


def test_tls_and_password_round_trip(tmp_path):
    import subprocess

    ca = _make_certs(tmp_path)
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(tmp_path / "passwd"), "pi-1", "s3cret"], check=True)
    for p in tmp_path.iterdir():
        p.chmod(0o644)  # mosquitto may drop privileges before reading them
    conf = (f"certfile {tmp_path / 'server.crt'}\nkeyfile {tmp_path / 'server.key'}\ncafile {ca}\n"
            f"password_file {tmp_path / 'passwd'}")
    with MosquittoBroker(extra_config=conf, allow_anonymous=False) as broker:
        url = f"mqtts://pi-1:s3cret@127.0.0.1:{broker.port}"
        cfg = BrokerConfig.from_url(url, ca_file=str(ca))
        with Responder(cfg, echo), RequestClient(cfg, "pi-1") as dev:
            codes, req = _request(seed=4)
            assert dev.request(req, timeout=5).json()["sum"] == int(codes.sum())
        wrong = BrokerConfig.from_url(f"mqtts://pi-1:wrong@127.0.0.1:{broker.port}", ca_file=str(ca))
        with pytest.raises(BrokerUnavailable, match="refused|cannot reach"):
            MqttEndpoint(wrong, "intruder").start(timeout=3)
        no_tls = BrokerConfig(port=broker.port, username="pi-1", password="s3cret")
        with pytest.raises(BrokerUnavailable):
            MqttEndpoint(no_tls, "plain").start(timeout=3)
