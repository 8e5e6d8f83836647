"""Emulate a slow link without root: a TCP relay in front of the MQTT broker that shapes
each direction with a rate, a one-way delay and jitter.

    device --> relay (shaped: up) --> broker
    device <-- relay (shaped: down) <-- broker

The kernel's netem needs root (and is missing from some kernels); this needs neither.
Point the device at the relay's port instead of the broker's.

What it emulates, per TCP connection and per direction: a link of a given bandwidth
(bytes serialize one chunk after another at `rate`) followed by a pipe of a given
one-way delay, plus an optional per-chunk random extra delay (jitter) that never
reorders bytes. A small message thus arrives after delay + size/rate, and a bulk
transfer's throughput approaches the rate. A sender faster than the link fills a
bounded queue and then gets TCP back-pressure, as behind a real bottleneck.

What it does not emulate:
  - loss or reordering: the relay speaks TCP on both sides, so there is nothing to lose
    (a lossy radio shows up to TCP as extra delay and less throughput: model it as that);
  - TCP's own behaviour on the slow link (slow start, retransmits, the handshake's round
    trip): this is TCP on top of TCP, and the relay's own loopback hops are not shaped;
  - sharing: every connection gets its own pair of links, so two devices through one
    relay do not compete for bandwidth;
  - the radio's state machine (NB-IoT/LTE-M paging, PSM, eDRX wake-up delays).

Standard library only (asyncio in one thread); no torch.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import random
import re
import threading
import time
from typing import Callable

# The bottleneck's buffer: bytes queued for the link beyond what the pipe itself holds
# (rate x delay). Past it the relay stops reading and the sender feels TCP back-pressure.
QUEUE_BYTES = 64 * 1024
# Bytes in the pipe are capped too, so that an unlimited rate over a long delay cannot
# hold unbounded memory (such a link then carries at most this much per delay).
MAX_PIPE_BYTES = 16 * 1024 * 1024
# A chunk is delivered whole once its last byte has crossed (store and forward), so
# chunks are kept to about 5 ms of link time, and at least one TCP segment.
CHUNK_SECONDS = 0.005
MIN_CHUNK, MAX_CHUNK = 1460, 64 * 1024


@dataclasses.dataclass
class LinkProfile:
    """A link: `up` (device -> broker) and `down` (broker -> device) in bit/s, `delay`
    one-way in seconds, each direction. `jitter`: each chunk waits an extra uniform
    random [0, jitter] seconds, but never overtakes the chunk before it (a TCP stream
    stays in order, so a late chunk holds up the ones behind it, as TCP would).
    `seed` makes the jitter reproducible. A rate of math.inf means no rate limit."""

    name: str
    up: float
    down: float
    delay: float
    jitter: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        for field, rate in (("up", self.up), ("down", self.down)):
            if not rate > 0:  # also rejects NaN
                raise ValueError(f"link profile {self.name!r}: {field} rate must be > 0 bit/s, got {rate}")
        for field, seconds in (("delay", self.delay), ("jitter", self.jitter)):
            if not (seconds >= 0 and math.isfinite(seconds)):
                raise ValueError(f"link profile {self.name!r}: {field} must be >= 0 s, got {seconds}")

    def describe(self) -> str:
        return (f"{self.name}: up {format_rate(self.up)}, down {format_rate(self.down)}, "
                f"delay {format_duration(self.delay)}, jitter {format_duration(self.jitter)}")


# Typical published figures, not measurements; jitter is left at 0 so that a profile is
# predictable (add it with --jitter).
PROFILES: dict[str, LinkProfile] = {
    # NB-IoT (3GPP Rel-13 Cat-NB1): peak ~60 kbit/s up (multi-tone), ~26 kbit/s down;
    # latency is seconds (3GPP's target is < 10 s for an exception report), ~1 s one-way
    # is a common planning figure for a connected device.
    "nbiot": LinkProfile("nbiot", up=60e3, down=26e3, delay=1.0),
    # LTE-M (Cat-M1): ~1 Mbit/s peak each way; 100-200 ms round trips are typical.
    "ltem": LinkProfile("ltem", up=1e6, down=1e6, delay=0.075),
    # 4G/LTE as a modest real-world rate, not the category's peak.
    "4g": LinkProfile("4g", up=10e6, down=10e6, delay=0.020),
    # Home or office Wi-Fi to a server on the same LAN.
    "wifi": LinkProfile("wifi", up=50e6, down=50e6, delay=0.002),
}


# --- specs as text: "10mbit", "20ms" -------------------------------------------------

_NUMBER = r"([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)"
# Decimal prefixes, bits throughout. Note: tc spells bytes as "kbps"; here kbps is
# kbit/s, as in everyday use.
_RATE_UNITS = {"": 1, "bit": 1, "bps": 1, "kbit": 1e3, "kbps": 1e3, "mbit": 1e6, "mbps": 1e6,
               "gbit": 1e9, "gbps": 1e9}
_DURATION_UNITS = {"s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def _number_and_unit(spec) -> tuple[float, str] | None:
    """(number, lower-case unit) from "10 Mbit", or None if it is not of that form."""
    if isinstance(spec, bool):
        return None
    if isinstance(spec, (int, float)):
        return float(spec), ""
    m = re.fullmatch(_NUMBER + r"\s*([a-zµ]*)", spec.strip().lower()) if isinstance(spec, str) else None
    return (float(m.group(1)), m.group(2)) if m else None


def parse_rate(spec: str | float) -> float:
    """A rate in bit/s from "10mbit", "60kbit", "1gbit", "800bit", "2mbps" (bits), "1e6"
    or a number; an optional "/s" is allowed ("10mbit/s")."""
    parsed = _number_and_unit(spec.strip().lower().removesuffix("/s") if isinstance(spec, str) else spec)
    if parsed is None or parsed[1] not in _RATE_UNITS:
        raise ValueError(f"bad rate {spec!r}: give a number and a unit of bit, kbit, mbit or gbit "
                         f"(kbps, mbps, gbps mean the same), e.g. 10mbit")
    rate = parsed[0] * _RATE_UNITS[parsed[1]]
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"bad rate {spec!r}: must be a finite number of bit/s above 0")
    return rate


def parse_duration(spec: str | float) -> float:
    """Seconds from "20ms", "1s", "1.5s", "500us"; a number is taken as seconds, but text
    must carry a unit (is "20" 20 ms or 20 s?), except "0"."""
    parsed = _number_and_unit(spec)
    if isinstance(spec, str) and parsed is not None and parsed[1] == "" and parsed[0] != 0:
        parsed = None  # text needs its unit
    if parsed is None or parsed[1] not in _DURATION_UNITS and parsed[1] != "":
        raise ValueError(f"bad duration {spec!r}: give a number and a unit of s, ms or us, e.g. 20ms")
    seconds = parsed[0] * _DURATION_UNITS.get(parsed[1], 1)
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"bad duration {spec!r}: must be a finite number of seconds, 0 or more")
    return seconds


def format_rate(rate: float) -> str:
    if math.isinf(rate):
        return "unlimited"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:g} {unit}"
    return f"{rate:g} bit/s"


def format_duration(seconds: float) -> str:
    return f"{seconds:g} s" if seconds >= 1 else f"{seconds * 1e3:g} ms"


# --- one shaped direction of one connection ------------------------------------------

_EOF = b""  # queued after the data: the half-close crosses the link behind it


class _ShapedDirection:
    """Reads chunks from `source`, stamps each with its delivery time on the link model,
    and writes it to `sink` at that time. Two loops: read() and deliver()."""

    def __init__(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, rate: float, delay: float,
                 jitter: float, rng: random.Random, count: Callable[[int], None]):
        self.source, self.sink, self.count = source, sink, count
        self.rate, self.delay, self.jitter, self.rng = rate, delay, jitter, rng
        self.chunk = int(min(MAX_CHUNK, max(MIN_CHUNK, rate / 8 * CHUNK_SECONDS)))
        pipe_bytes = 0 if delay + jitter == 0 else min(MAX_PIPE_BYTES, rate / 8 * (delay + jitter))
        self.max_in_flight = pipe_bytes + QUEUE_BYTES
        self.in_flight = 0  # read and not yet written
        self.room = asyncio.Event()
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = asyncio.Event()
        self.link_free_at = 0.0  # when the link has serialized everything read so far
        self.last_delivery_at = 0.0

    def _stamp(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        # Serialize after the previous chunk (or now, if the link is idle), then cross the pipe.
        self.link_free_at = max(now, self.link_free_at) + len(data) * 8 / self.rate
        arrives = self.link_free_at + self.delay + (self.rng.uniform(0, self.jitter) if self.jitter else 0.0)
        self.last_delivery_at = max(self.last_delivery_at, arrives)  # jitter never reorders
        self.queue.append((self.last_delivery_at, data))
        self.in_flight += len(data)
        self.queued.set()

    async def read(self) -> None:
        while True:
            while self.in_flight >= self.max_in_flight:  # full: stop reading, TCP pushes back
                self.room.clear()
                await self.room.wait()
            data = await self.source.read(self.chunk)
            self._stamp(data)
            if data == _EOF:
                return

    async def deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.queued.clear()
                await self.queued.wait()
            deliver_at, data = self.queue[0]
            wait = deliver_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.queue.popleft()
            if data == _EOF:
                if self.sink.can_write_eof() and not self.sink.is_closing():
                    self.sink.write_eof()
                return
            self.sink.write(data)  # asyncio sets TCP_NODELAY: a small chunk leaves at once
            await self.sink.drain()  # a slow receiver holds up the link, as TCP would
            self.count(len(data))
            self.in_flight -= len(data)
            self.room.set()


# --- the relay --------------------------------------------------------------------------

class LinkRelay:
    """Listens on listen_host:listen_port (0: a free port, then see `.port`), and relays
    every connection to target_host:target_port through a shaped link per direction.
    start() returns once listening; stop() closes everything. Counters: bytes_up and
    bytes_down (delivered), connections (accepted so far)."""

    def __init__(self, listen_host: str, listen_port: int, target_host: str, target_port: int,
                 profile: LinkProfile):
        self.listen_host, self.port = listen_host, listen_port
        self.target_host, self.target_port = target_host, target_port
        self.profile = profile
        self.bytes_up = self.bytes_down = self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._relays: dict[asyncio.Task, list[asyncio.StreamWriter]] = {}  # a relay task: its sockets

    def start(self, timeout: float = 10.0) -> "LinkRelay":
        ready = threading.Event()
        self._error: BaseException | None = None

        def run():
            try:
                asyncio.run(self._serve(ready))
            except BaseException as e:  # reported by start()
                self._error = e
                ready.set()

        self._thread = threading.Thread(target=run, name="edgeqtl-link", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._error is not None:
            self.stop()
            raise self._error or TimeoutError(f"link relay did not listen within {timeout} s")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listening socket and every relayed connection (in-flight data is
        dropped); returns once the relay's thread has ended."""
        if self._loop is not None and self._stopping is not None:
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop has already closed
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "LinkRelay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _serve(self, ready: threading.Event) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._on_connection, self.listen_host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        await self._stopping.wait()
        server.close()
        await self._close_connections()
        await server.wait_closed()

    async def _close_connections(self, timeout: float = 5.0) -> None:
        """Abort every relayed connection, and wait for every other task: a connection
        accepted just before the listener closed has no relay task yet, and would leak
        its socket if asyncio.run cancelled it before it ran (its relay, once started,
        sees _stopping and closes at once)."""
        loop, cancelled = asyncio.get_running_loop(), set()
        deadline = loop.time() + timeout
        while (others := asyncio.all_tasks() - {asyncio.current_task()}) and loop.time() < deadline:
            for task, writers in self._relays.items():
                for writer in writers:  # abort, not close: close waits for a peer to read
                    writer.transport.abort()
                if task not in cancelled:
                    task.cancel()
                    cancelled.add(task)
            await asyncio.wait(others, timeout=0.05)

    async def _on_connection(self, device_reader: asyncio.StreamReader, device_writer: asyncio.StreamWriter) -> None:
        """asyncio's callback for a new connection: runs the relay as a task of its own for
        stop() to cancel (Python 3.11 logs an error when the callback's task is cancelled)."""
        relay = asyncio.create_task(self._relay(device_reader, device_writer))
        await asyncio.wait([relay])
        if not relay.cancelled():
            relay.result()  # a bug in the relay reaches asyncio's exception handler

    async def _relay(self, device_reader: asyncio.StreamReader, device_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        writers = self._relays[task] = [device_writer]
        failed = True  # until every direction has ended cleanly: then close, else abort
        try:
            if self._stopping.is_set():  # accepted just as stop() began
                return
            self.connections += 1
            number = self.connections
            try:
                broker_reader, broker_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:  # the device sees its connection close, as if the broker were down
                return
            writers.append(broker_writer)
            p = self.profile
            up = _ShapedDirection(device_reader, broker_writer, p.up, p.delay, p.jitter, self._rng(number, "up"),
                                  self._count_up)
            down = _ShapedDirection(broker_reader, device_writer, p.down, p.delay, p.jitter,
                                    self._rng(number, "down"), self._count_down)
            loops = [asyncio.create_task(c) for c in (up.read(), up.deliver(), down.read(), down.deliver())]
            try:
                # Each half-close crosses on its own; a reset or error ends both directions.
                done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
                failed = any(t.cancelled() or t.exception() is not None for t in done)
            finally:
                for t in loops:
                    t.cancel()
                await asyncio.gather(*loops, return_exceptions=True)
        finally:
            try:
                for writer in writers:
                    if failed:
                        writer.transport.abort()
                    else:
                        writer.close()
                for writer in writers:
                    try:
                        await writer.wait_closed()
                    except OSError:  # the reset that ended the relay
                        pass
            finally:
                del self._relays[task]

    def _rng(self, number: int, direction: str) -> random.Random:
        seed = self.profile.seed
        return random.Random(f"{seed}/{number}/{direction}") if seed is not None else random.Random()

    def _count_up(self, n: int) -> None:
        self.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.bytes_down += n


# --- the CLI's entry point -------------------------------------------------------------

def _host_port(address: str | int, what: str, default_host: str | None = None) -> tuple[str, int]:
    """"HOST:PORT", "[::1]:PORT", or (when default_host is given) a bare PORT."""
    text = str(address).strip()
    m = re.fullmatch(r"(?:\[([^\]]+)\]|([^:\[\]]+)):(\d+)", text)
    if m:
        host, port = m.group(1) or m.group(2), int(m.group(3))
    elif default_host is not None and text.isdigit():
        host, port = default_host, int(text)
    else:
        form = "HOST:PORT or PORT" if default_host is not None else "HOST:PORT"
        raise ValueError(f"bad {what} address {address!r}: expected {form}, e.g. 127.0.0.1:1883")
    if not 0 <= port <= 65535:
        raise ValueError(f"bad {what} address {address!r}: port must be 0-65535")
    return host, port


def run_link(listen: str | int, to: str, rate: str | float | None = None, delay: str | float | None = None,
             jitter: str | float | None = None, profile: str | None = None, *, up: str | float | None = None,
             down: str | float | None = None, seed: int | None = None,
             until: threading.Event | None = None) -> LinkRelay:
    """Relay `listen` (PORT, on 127.0.0.1, or HOST:PORT) to `to` (HOST:PORT) through a
    shaped link, until Ctrl-C (or until `until` is set). Starts from the named `profile`
    (else an unlimited rate and no delay); `rate` sets both directions, `up`/`down` one
    each, and `delay`/`jitter` override. Prints what it relays, then the byte counts."""
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"unknown link profile {profile!r}: choose one of {', '.join(PROFILES)}")
    base = PROFILES[profile] if profile else LinkProfile("custom", up=math.inf, down=math.inf, delay=0.0)
    both = parse_rate(rate) if rate is not None else None
    modified = profile and any(v is not None for v in (rate, up, down, delay, jitter))
    shaped = LinkProfile(
        name=f"{base.name} (modified)" if modified else base.name,
        up=parse_rate(up) if up is not None else both or base.up,
        down=parse_rate(down) if down is not None else both or base.down,
        delay=parse_duration(delay) if delay is not None else base.delay,
        jitter=parse_duration(jitter) if jitter is not None else base.jitter,
        seed=seed if seed is not None else base.seed)
    listen_host, listen_port = _host_port(listen, "listen", default_host="127.0.0.1")
    target_host, target_port = _host_port(to, "target")
    relay = LinkRelay(listen_host, listen_port, target_host, target_port, shaped).start()
    print(f"link relay on {listen_host}:{relay.port} -> {target_host}:{target_port}, {shaped.describe()} "
          f"(Ctrl-C to stop)", flush=True)
    try:
        if until is None:
            while True:
                time.sleep(1)
        until.wait()
    except KeyboardInterrupt:
        pass
    finally:
        relay.stop()
        print(f"link relay stopped: {relay.connections} connections, up {relay.bytes_up} bytes, "
              f"down {relay.bytes_down} bytes", flush=True)
    return relay
