"""The link relay (edgeqtl.link): rate, delay and jitter per direction on loopback, MQTT
through it unchanged, and a stop() that leaves nothing behind. Timing bounds are
generous: the machine that runs this is shared."""
from __future__ import annotations

import contextlib
import gc
import queue
import random
import socket
import struct
import threading
import time
import warnings

import pytest

from edgeqtl.broker import free_port
from edgeqtl.link import PROFILES, LinkProfile, LinkRelay, parse_duration, parse_rate, run_link

FAST = 200e6  # bit/s: a rate that adds nothing measurable


@pytest.fixture(autouse=True)
def no_relay_thread_left():
    yield
    assert [t for t in threading.enumerate() if t.name == "edgeqtl-link"] == []


class FarEnd:
    """The broker's side: a loopback server that runs handle(conn, self.result) on its one
    connection, in a thread."""

    def __init__(self, handle):
        self.handle, self.result = handle, {}
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.handle(conn, self.result)

    def join(self):
        self.thread.join(15)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.join()
        self.listener.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_eof(sock) -> bytes:
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def echo(conn, result):
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def sink(conn, result):
    result["bytes"] = len(read_until_eof(conn))
    result["done_at"] = time.monotonic()


def exchange(sock, size: int) -> tuple[float, int, float]:
    """Send `size` bytes and half-close while reading until EOF:
    (started sending, bytes received, time the EOF came)."""
    started = time.monotonic()

    def send():
        sock.sendall(bytes(size))
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    received = len(read_until_eof(sock))
    done = time.monotonic()
    sender.join(10)
    return started, received, done


# --- specs ------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, bits", [("10mbit", 10e6), ("10Mbit/s", 10e6), ("60kbit", 60e3), ("1gbit", 1e9),
                                        ("800bit", 800), ("2mbps", 2e6), ("64 kbps", 64e3), ("1e6", 1e6),
                                        ("1.5mbit", 1.5e6), ("9600", 9600), (5e6, 5e6)])
def test_parse_rate_accepts_the_documented_forms(spec, bits):
    assert parse_rate(spec) == pytest.approx(bits)


@pytest.mark.parametrize("spec", ["", "fast", "10 mbits", "10mb", "mbit", "-1mbit", "0", "inf", "nan", "1e999", True])
def test_parse_rate_rejects_bad_input_in_one_line(spec):
    with pytest.raises(ValueError, match="bad rate") as e:
        parse_rate(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, seconds", [("20ms", 0.02), ("1s", 1.0), ("1.5 s", 1.5), ("500us", 5e-4),
                                           ("0", 0.0), ("0ms", 0.0), (0.25, 0.25)])
def test_parse_duration_accepts_the_documented_forms(spec, seconds):
    assert parse_duration(spec) == pytest.approx(seconds)


@pytest.mark.parametrize("spec", ["", "20", "20 sec", "1h", "ms", "-5ms", "abc", float("nan")])
def test_parse_duration_rejects_bad_input_in_one_line(spec):
    with pytest.raises(ValueError, match="bad duration") as e:
        parse_duration(spec)
    assert "\n" not in str(e.value)


def test_named_profiles():
    assert set(PROFILES) >= {"nbiot", "ltem", "4g", "wifi"}
    assert (PROFILES["4g"].up, PROFILES["4g"].down, PROFILES["4g"].delay) == (10e6, 10e6, 0.020)
    assert (PROFILES["wifi"].up, PROFILES["wifi"].delay) == (50e6, 0.002)
    assert PROFILES["nbiot"].up > PROFILES["nbiot"].down  # NB-IoT sends faster than it receives
    with pytest.raises(ValueError, match="rate must be > 0"):
        LinkProfile("broken", up=0, down=1e6, delay=0)


# --- shaping ----------------------------------------------------------------------------

def test_bulk_transfer_runs_at_the_configured_rate():
    rate, delay, size = 8e6, 0.020, 1_500_000  # 1.5 s of link time
    with FarEnd(sink) as far, LinkRelay("127.0.0.1", 0, "127.0.0.1", far.port,
                                        LinkProfile("bulk", rate, rate, delay)) as relay:
        with connect(relay.port) as device:
            started = time.monotonic()
            device.sendall(bytes(size))
            device.shutdown(socket.SHUT_WR)
            assert device.recv(1) == b""  # the far end closed after reading everything
    assert far.result["bytes"] == size and relay.bytes_up == size
    measured = size * 8 / (far.result["done_at"] - started - delay)
    print(f"bulk: {measured / 1e6:.3f} Mbit/s through an {rate / 1e6:g} Mbit/s link ({measured / rate - 1:+.1%})")
    assert measured == pytest.approx(rate, rel=0.10)


def test_a_small_round_trip_takes_twice_the_one_way_delay():
    delay = 0.100
    with FarEnd(echo) as far, LinkRelay("127.0.0.1", 0, "127.0.0.1", far.port,
                                        LinkProfile("slow", FAST, FAST, delay)) as relay:
        with connect(relay.port) as device:
            round_trips = []
            for _ in range(3):
                started = time.monotonic()
                device.sendall(b"ping")
                reply = b""
                while len(reply) < 4:
                    reply += device.recv(4 - len(reply))
                round_trips.append(time.monotonic() - started)
                assert reply == b"ping"
    print("round trips (ms):", [round(t * 1e3, 1) for t in round_trips])
    assert min(round_trips) >= 2 * delay
    assert sorted(round_trips)[1] < 2 * delay + 0.100  # the median: one hiccup on a loaded machine is forgiven


def test_each_direction_has_its_own_rate():
    up, down, size = 1.6e6, 3.2e6, 200_000  # 1.0 s up, 0.5 s down, at the same time

    def far_exchange(conn, result):
        result["sent_at"], result["received"], result["done_at"] = exchange(conn, size)

    with FarEnd(far_exchange) as far, LinkRelay("127.0.0.1", 0, "127.0.0.1", far.port,
                                                LinkProfile("asym", up, down, delay=0.0)) as relay:
        with connect(relay.port) as device:
            sent_at, received, done_at = exchange(device, size)
        far.join()  # the slower direction is still crossing
    # Both half-closes crossed, each after its direction's data.
    assert received == size and far.result["received"] == size
    down_rate = size * 8 / (done_at - far.result["sent_at"])
    up_rate = size * 8 / (far.result["done_at"] - sent_at)
    print(f"asymmetric: up {up_rate / 1e6:.3f} Mbit/s (set {up / 1e6:g}), down {down_rate / 1e6:.3f} Mbit/s "
          f"(set {down / 1e6:g})")
    assert up_rate == pytest.approx(up, rel=0.15)
    assert down_rate == pytest.approx(down, rel=0.15)
    assert (relay.bytes_up, relay.bytes_down) == (size, size)


def test_jitter_never_reorders_bytes():
    count = 100
    profile = LinkProfile("jittery", FAST, FAST, delay=0.010, jitter=0.050, seed=1)
    with FarEnd(echo) as far, LinkRelay("127.0.0.1", 0, "127.0.0.1", far.port, profile) as relay:
        with connect(relay.port) as device:
            for i in range(count):  # small writes apart in time: each its own chunk with its own jitter
                device.sendall(struct.pack("!I", i))
                time.sleep(0.002)
            device.shutdown(socket.SHUT_WR)
            echoed = read_until_eof(device)
    assert list(struct.unpack(f"!{count}I", echoed)) == list(range(count))


def test_a_fast_sender_gets_back_pressure():
    """At 80 kbit/s the relay holds a bounded amount: the sender blocks after the socket
    buffers fill, instead of the relay reading everything into memory."""
    block, limit = bytes(1 << 16), 64 << 20
    with FarEnd(sink) as far, LinkRelay("127.0.0.1", 0, "127.0.0.1", far.port,
                                        LinkProfile("thin", 80e3, 80e3, delay=0.010)) as relay:
        with connect(relay.port) as device:
            device.setblocking(False)
            sent, deadline = 0, time.monotonic() + 0.5
            while sent < limit and time.monotonic() < deadline:
                try:
                    sent += device.send(block)
                except BlockingIOError:
                    time.sleep(0.01)
    print(f"back-pressure: the sender got {sent / 2**20:.1f} MiB in before blocking")
    assert sent < 16 << 20


# --- MQTT through the relay --------------------------------------------------------------

def test_mqtt_traffic_passes_unchanged(mosquitto):
    import paho.mqtt.client as mqtt

    topic = "edgeqtl/test/link"
    payloads = [b"", b"hello", bytes(range(256)), random.Random(0).randbytes(300_000)]
    received: queue.Queue[bytes] = queue.Queue()
    subscribed = threading.Event()
    profile = LinkProfile("lan", 20e6, 20e6, delay=0.005)
    with LinkRelay("127.0.0.1", 0, mosquitto.host, mosquitto.port, profile) as relay:
        subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="link-sub", protocol=mqtt.MQTTv5)
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="link-pub", protocol=mqtt.MQTTv5)
        subscriber.on_subscribe = lambda client, userdata, mid, reasons, props: subscribed.set()
        subscriber.on_message = lambda client, userdata, message: received.put(message.payload)
        try:
            for client in (subscriber, publisher):
                client.connect("127.0.0.1", relay.port)
                client.loop_start()
            subscriber.subscribe(topic, qos=1)
            assert subscribed.wait(10), "no SUBACK through the relay"
            for payload in payloads:
                publisher.publish(topic, payload, qos=1).wait_for_publish(10)
            got = [received.get(timeout=10) for _ in payloads]
        finally:
            for client in (subscriber, publisher):
                client.disconnect()
                client.loop_stop()
    assert got == payloads
    assert relay.connections == 2
    assert relay.bytes_up > 300_000 and relay.bytes_down > 300_000


# --- lifecycle --------------------------------------------------------------------------

def test_stop_closes_connections_promptly_and_leaks_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with FarEnd(echo) as far:
            relay = LinkRelay("127.0.0.1", 0, "127.0.0.1", far.port, LinkProfile("far", FAST, FAST, delay=1.0)).start()
            with connect(relay.port) as device:
                device.sendall(b"still in flight when stop() comes")
                time.sleep(0.1)
                started = time.monotonic()
                relay.stop()
                stop_took = time.monotonic() - started
                assert device.recv(100) == b""  # EOF, and the in-flight bytes were dropped
            assert relay.connections == 1
        gc.collect()
    assert stop_took < 1.0
    assert not relay._thread.is_alive()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_an_unreachable_broker_closes_the_device_connection():
    with LinkRelay("127.0.0.1", 0, "127.0.0.1", free_port(), PROFILES["wifi"]) as relay:
        with connect(relay.port) as device:
            assert device.recv(1) == b""


def test_run_link_prints_what_it_relays_and_the_byte_counts(capsys):
    until = threading.Event()
    listen = free_port()
    with FarEnd(echo) as far:
        runner = threading.Thread(target=run_link, args=(listen, f"127.0.0.1:{far.port}"),
                                  kwargs={"profile": "wifi", "delay": "5ms", "until": until})
        runner.start()
        for _ in range(100):  # until it listens
            with contextlib.suppress(OSError), connect(listen) as device:
                device.sendall(b"hi")
                assert device.recv(2) == b"hi"
                break
            time.sleep(0.05)
        until.set()
        runner.join(10)
    first, last = capsys.readouterr().out.strip().splitlines()
    assert f"127.0.0.1:{listen} -> 127.0.0.1:{far.port}" in first and "50 Mbit/s" in first and "5 ms" in first
    assert "up 2 bytes, down 2 bytes" in last


@pytest.mark.parametrize("kwargs, message", [({"profile": "5g"}, "unknown link profile"),
                                             ({"rate": "fast"}, "bad rate"),
                                             ({"to": "localhost"}, "bad target address")])
def test_run_link_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_link(**{"listen": 0, "to": "127.0.0.1:1", **kwargs})
