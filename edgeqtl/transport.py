"""MQTT transport for edgeqtl frames (paho-mqtt 2.x, CallbackAPIVersion.VERSION2).

Topics (docs/PROTOCOL.md):
    edgeqtl/v1/req/<device-id>     requests; every server agent reads them through the
                                   shared subscription $share/<group>/edgeqtl/v1/req/+
    edgeqtl/v1/srv/<server-id>/req/<device-id>
                                   decode steps (cut > 0), sent back to the one server
                                   agent that holds the generation's KV cache
    edgeqtl/v1/reply/<device-id>   replies to one device

Rules kept here, not left to paho:
  - TCP_NODELAY on the socket (paho leaves Nagle on: ~44 ms per small round trip);
  - a payload is checked against the broker's CONNACK MaximumPacketSize before it is
    published (paho does not check, and an oversize QoS 1 publish is retried forever);
  - nothing runs inside a paho callback but a queue put: a worker thread handles
    messages, so a slow handler never stalls the network loop;
  - MQTT 5 request/response (ResponseTopic + CorrelationData), with the reply address
    also in the frame header so that MQTT 3.1.1 brokers work;
  - QoS 1, and request ids that make a duplicate delivery harmless;
  - sessions: a session expiry (MQTT 5 clean start off; 3.1.1 clean session off) keeps a
    peer's subscriptions and queued messages at the broker while it is away; requests
    carry a message expiry of the device's patience, so a request nobody answered in
    time is dropped by the broker instead of being answered after a long outage;
  - reconnect with backoff (paho's loop, 1 s doubling to 30 s) and resubscription.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import queue
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from typing import Callable

from .chunking import ChunkError, Reassembler, is_chunk, split_frame
from .errors import CodedError, EdgeqtlError
from .wire import Frame, FrameKind, ProtocolError, decode_frame, encode_frame, error_frame, frame_ids

log = logging.getLogger("edgeqtl.transport")

TOPIC_ROOT = "edgeqtl/v1"
DEFAULT_GROUP = "edgeqtl-servers"
MQTT_MAX_PACKET = 268_435_455 + 5  # the protocol's own ceiling
DEVICE_SESSION_EXPIRY = 300  # seconds a device's session outlives a disconnect (MQTT 5)
REPLY_EXPIRY = 300  # seconds a reply waits at the broker for a device that is away


def request_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/req/{device_id}"


def reply_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/reply/{device_id}"


def server_request_topic(server_id: str, device_id: str) -> str:
    """One server agent's own request topic: decode steps go back to the server that
    holds the generation's KV cache (cut > 0), while new prompts use the shared topic."""
    return f"{TOPIC_ROOT}/srv/{server_id}/req/{device_id}"


def shared_request_subscription(group: str = DEFAULT_GROUP) -> str:
    return f"$share/{group}/{TOPIC_ROOT}/req/+"


class _DebugOnly(logging.Filter):
    """paho's packet log is worth having at DEBUG; its errors ("Client is not connected")
    repeat what edgeqtl raises or logs itself, once per message, during every outage."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno <= logging.DEBUG


_PAHO_LOG = logging.getLogger("edgeqtl.transport.paho")
_PAHO_LOG.addFilter(_DebugOnly())


class TransportError(EdgeqtlError, RuntimeError):
    """A transport failure the user can act on; the message says what and how."""


class BrokerUnavailable(TransportError):
    pass


class PayloadTooLarge(TransportError):
    pass


class RequestTimeout(TransportError):
    pass


@dataclasses.dataclass
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)  # never in a log line
    protocol: int = 5  # 5 or 311
    keepalive: int = 30
    nodelay: bool = True  # only the benchmark turns it off, to show the difference
    # The largest message to send (bytes); larger frames go as chunks. None: the broker's
    # CONNACK Maximum Packet Size (MQTT 5) alone. AWS IoT Core: 131072.
    max_message_size: int | None = None
    # Seconds the broker keeps this client's session (subscriptions, queued QoS 1
    # messages) after it disconnects; None: a clean session, dropped at once.
    session_expiry: int | None = None

    @classmethod
    def from_url(cls, url: str, **overrides) -> "BrokerConfig":
        """mqtt://[user:pass@]host[:port][?protocol=3.1.1][&max_message_size=BYTES][&session_expiry=SECONDS]
        or mqtts://... (TLS, default port 8883)."""
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise TransportError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
        if not u.hostname:
            raise TransportError(f"broker URL {url!r} has no host")
        tls = u.scheme in ("mqtts", "ssl")
        q = urllib.parse.parse_qs(u.query)
        proto = q.get("protocol", ["5"])[0]
        if proto not in ("5", "3.1.1", "311"):
            raise TransportError(f"protocol must be 5 or 3.1.1, got {proto!r}")
        limit = q.get("max_message_size", [None])[0]
        if limit is not None and not limit.isdigit():
            raise TransportError(f"max_message_size must be a number of bytes, got {limit!r}")
        expiry = q.get("session_expiry", [None])[0]
        if expiry is not None and not expiry.isdigit():
            raise TransportError(f"session_expiry must be a number of seconds, got {expiry!r}")
        cfg = cls(host=u.hostname, port=u.port or (8883 if tls else 1883), tls=tls,
                  username=urllib.parse.unquote(u.username) if u.username else None,
                  password=urllib.parse.unquote(u.password) if u.password else None,
                  protocol=5 if proto == "5" else 311, max_message_size=int(limit) if limit else None,
                  session_expiry=int(expiry) if expiry is not None else None)
        return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    def describe(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port} (MQTT {'5' if self.protocol == 5 else '3.1.1'})"


@dataclasses.dataclass
class Message:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None


class MqttEndpoint:
    """One paho client with the rules above. `handler(Message)` runs on a worker thread."""

    def __init__(self, cfg: BrokerConfig, client_id: str, handler: Callable[[list[Message]], None] | None = None,
                 subscriptions: list[str] | None = None, max_packet_fallback: int = MQTT_MAX_PACKET,
                 max_batch: int = 1):
        """`handler` receives the messages waiting when the worker is free, at most
        `max_batch` at a time (a list of one with the default)."""
        import paho.mqtt.client as mqtt

        self.cfg = cfg
        self.client_id = client_id
        self.handler = handler
        self.max_batch = max(1, max_batch)
        self.subscriptions = list(subscriptions or [])
        self.max_packet_size = max_packet_fallback
        self._connected = threading.Event()
        self._connected_once = False
        self._refused = threading.Event()
        self._stopping = threading.Event()
        self._connect_error: str | None = None
        self._inbox: queue.Queue[Message | None] = queue.Queue()
        self.reassembler = Reassembler()  # chunked frames put back together, on the worker thread
        proto = mqtt.MQTTv5 if cfg.protocol == 5 else mqtt.MQTTv311
        self._mqtt = mqtt
        persistent = bool(cfg.session_expiry)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto,
                                  **({} if cfg.protocol == 5 else {"clean_session": not persistent}))
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            self.client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file,
                                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.enable_logger(_PAHO_LOG)  # its packet log, at DEBUG
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_socket_open = self._on_socket_open
        self._worker = threading.Thread(target=self._work, name=f"edgeqtl-{client_id}", daemon=True)

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 10.0) -> "MqttEndpoint":
        """Connect, or say why not in one line. The first connection is made here, so that
        a refused TLS certificate or an unreachable host is named; after it, paho's loop
        reconnects by itself."""
        self._worker.start()
        self.client.socket_timeout = min(timeout, 10.0)
        try:
            self.client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive, **self._session_args())
        except ssl.SSLCertVerificationError as e:
            self._worker_stop()
            raise BrokerUnavailable(f"the TLS certificate of broker {self.cfg.describe()} could not be verified "
                                    f"with CA file {self.cfg.ca_file or '(the system CAs)'} ({e.verify_message}); "
                                    "pass the CA it was made with (--ca-file)") from None
        except (OSError, ValueError) as e:
            self._worker_stop()
            raise BrokerUnavailable(f"cannot reach broker {self.cfg.describe()}: {e}; is it running? "
                                    "(`edgeqtl broker` starts one)") from None
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if self._refused.is_set() or time.monotonic() > deadline:
                self.stop()
                if self._refused.is_set():
                    raise BrokerUnavailable(f"broker {self.cfg.describe()} refused the login ({self._connect_error})"
                                            f"; check the username and password (or the login file) of "
                                            f"{self.cfg.username or 'this client'}") from None
                raise BrokerUnavailable(f"broker {self.cfg.describe()} accepted the connection but did not answer "
                                        f"within {timeout:g} s; is it an MQTT broker?")
        return self

    def _session_args(self) -> dict:
        """MQTT 5: clean start off and a Session Expiry Interval when the session is kept
        (paho sends the same on each reconnect). 3.1.1 has no interval: the broker keeps
        an unclean session until its own limit (mosquitto: persistent_client_expiration)."""
        if self.cfg.protocol != 5:
            return {}
        if not self.cfg.session_expiry:
            return {"clean_start": True}
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = int(self.cfg.session_expiry)
        return {"clean_start": False, "properties": props}

    def _worker_stop(self) -> None:
        self._inbox.put(None)

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self._inbox.put(None)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # ---------------------------------------------------------------- paho callbacks (never block)
    def _on_socket_open(self, client, userdata, sock):
        if self.cfg.nodelay:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # e.g. a unix socket
                pass

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
            if not self._connected_once:
                self._refused.set()  # start() says so at once; later refusals are logged and retried
                client.disconnect()
            else:
                log.warning("%s: broker refused the connection: %s", self.client_id, reason_code)
            return
        if not self._connected_once:
            log.info("%s: connected to %s%s", self.client_id, self.cfg.describe(),
                     f" as {self.cfg.username}" if self.cfg.username else "")  # never the password
        self._connected_once = True
        limit = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        if limit:
            self.max_packet_size = int(limit)
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected.clear()
        if not self._stopping.is_set() and not self._refused.is_set():
            log.warning("%s: disconnected (%s); reconnecting", self.client_id, reason_code)

    def _on_message(self, client, userdata, msg):
        props = getattr(msg, "properties", None)
        self._inbox.put(Message(msg.topic, bytes(msg.payload), getattr(props, "ResponseTopic", None),
                                getattr(props, "CorrelationData", None)))

    def _complete(self, m: Message) -> Message | None:
        """The message, or for a chunk the whole frame once its last chunk is here."""
        if not is_chunk(m.payload):
            return m
        try:
            whole = self.reassembler.add(m.topic, m.payload)
        except ChunkError as e:
            log.warning("%s: dropped a chunk on %s: %s", self.client_id, m.topic, e)
            return None
        return dataclasses.replace(m, payload=whole) if whole is not None else None

    def _work(self):
        while True:
            m = self._inbox.get()
            if m is None:
                return
            m = self._complete(m)
            if m is None:
                continue
            batch = [m]
            # Take what else is already waiting, without waiting for more: under load the
            # batches grow by themselves, and a lone request is never delayed.
            while len(batch) < self.max_batch:
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._inbox.put(None)
                    break
                nxt = self._complete(nxt)
                if nxt is not None:
                    batch.append(nxt)
            if self.handler is None:
                continue
            try:
                self.handler(batch)
            except Exception:  # one bad message never stops the endpoint
                log.exception("%s: handler failed on %d message(s) from %s", self.client_id, len(batch), m.topic)

    # ---------------------------------------------------------------- publishing
    def packet_size(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None) -> int:
        """Upper bound of the PUBLISH packet's size on the wire."""
        props = 0
        if self.cfg.protocol == 5:
            props += 3 + len(response_topic.encode()) if response_topic else 0
            props += 3 + len(correlation) if correlation else 0
            props += 4  # property length varint, at most
        return 1 + 4 + 2 + len(topic.encode()) + 2 + props + len(payload)

    @property
    def message_limit(self) -> int:
        """The largest MQTT packet this endpoint sends: the broker's CONNACK Maximum
        Packet Size, or the configured max_message_size when smaller."""
        limit = self.max_packet_size
        return min(limit, self.cfg.max_message_size) if self.cfg.max_message_size else limit

    def publish(self, topic: str, payload: bytes, response_topic: str | None = None,
                correlation: bytes | None = None, qos: int = 1, expiry: int | None = None):
        """Publish an encoded frame; one too large for the limit goes as chunks
        (edgeqtl.chunking), each a message of its own on the same topic. expiry: seconds
        after which the broker drops the message undelivered (MQTT 5)."""
        limit = self.message_limit
        size = self.packet_size(topic, payload, response_topic, correlation) + (5 if expiry else 0)
        if size <= limit:
            return self._publish_one(topic, payload, response_topic, correlation, qos, expiry)
        room = limit - (size - len(payload))
        try:
            request_id, step = frame_ids(payload)
            chunks = split_frame(payload, request_id, step, room)
        except (ChunkError, ProtocolError) as e:
            raise PayloadTooLarge(f"message of {size} bytes exceeds the limit of {limit} bytes and cannot be "
                                  f"chunked ({e}); raise the broker's max_packet_size") from None
        for c in chunks:
            info = self._publish_one(topic, c, response_topic, correlation, qos, expiry)
        return info

    def _publish_one(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None,
                     qos: int, expiry: int | None = None):
        properties = None
        if self.cfg.protocol == 5 and (response_topic or correlation or expiry):
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            properties = Properties(PacketTypes.PUBLISH)
            if response_topic:
                properties.ResponseTopic = response_topic
            if correlation:
                properties.CorrelationData = correlation
            if expiry:
                properties.MessageExpiryInterval = int(expiry)
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        if info.rc == self._mqtt.MQTT_ERR_NO_CONN:
            raise BrokerUnavailable(f"not connected to {self.cfg.describe()}; the message was not queued")
        return info


# --------------------------------------------------------------------------- request / response


class _OwnsEndpoint:
    """Start, stop and `with` for a class built around one MqttEndpoint."""

    endpoint: MqttEndpoint

    def start(self, timeout: float = 10.0):
        self.endpoint.start(timeout)
        return self

    def stop(self) -> None:
        self.endpoint.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class RequestClient(_OwnsEndpoint):
    """Device side: send a request frame, wait for the reply with the same request id
    and step. Retries reuse both, so the server answers a retry from its cache."""

    def __init__(self, cfg: BrokerConfig, device_id: str):
        """Over MQTT 5 the device's session is kept DEVICE_SESSION_EXPIRY seconds unless the
        config says otherwise (`?session_expiry=0` in the URL: a clean session), so that a
        reply that comes while it is reconnecting waits at the broker instead of being lost."""
        if cfg.protocol == 5 and cfg.session_expiry is None:
            cfg = dataclasses.replace(cfg, session_expiry=DEVICE_SESSION_EXPIRY)
        self.device_id = device_id
        self.reply_topic = reply_topic(device_id)
        # keyed by (request id, step): the decode steps of one generation share an id
        self._pending: dict[tuple[bytes, int], tuple[threading.Event, list, Callable | None]] = {}
        self._lock = threading.Lock()
        self.resends = 0  # requests sent again after a timeout
        self.endpoint = MqttEndpoint(cfg, f"edgeqtl-dev-{device_id}", self._on_reply, [self.reply_topic])

    def _on_reply(self, batch: list[Message]) -> None:
        for m in batch:
            try:
                f = decode_frame(m.payload)
            except ProtocolError as e:
                log.warning("dropped a corrupt reply on %s: %s", m.topic, e)
                continue
            with self._lock:
                slot = self._pending.get((f.request_id, f.step))
            if slot is None:
                continue  # a late duplicate of a reply already taken
            if f.kind == FrameKind.TOKENS:  # a partial reply: the request still waits for its answer
                if slot[2] is not None:
                    try:
                        slot[2](f)
                    except Exception:  # noqa: BLE001 - the caller's callback must not stop the replies
                        log.exception("partial-reply callback failed")
                continue
            slot[1].append(f)
            slot[0].set()

    def address(self, frame: Frame) -> Frame:
        """The frame as it is sent: this device's id, and the reply topic in the header
        only under MQTT 3.1.1 (MQTT 5 carries it as the ResponseTopic property)."""
        return dataclasses.replace(frame, device_id=self.device_id,
                                   reply_topic="" if self.endpoint.cfg.protocol == 5 else self.reply_topic)

    def request(self, frame: Frame, timeout: float = 10.0, retries: int = 2, server_id: str | None = None,
                on_partial: Callable[[Frame], None] | None = None) -> Frame:
        """server_id: send to that server agent's own topic instead of the shared one.
        on_partial: called (on the transport's thread) with each partial reply (TOKENS)
        that comes before the reply; every partial resets the wait."""
        topic = server_request_topic(server_id, self.device_id) if server_id else request_topic(self.device_id)
        frame = self.address(frame)
        data = encode_frame(frame)
        event, box = threading.Event(), []
        key = (frame.request_id, frame.step)
        progress = threading.Event()

        def partial(f: Frame) -> None:
            progress.set()
            if on_partial is not None:
                on_partial(f)

        with self._lock:
            self._pending[key] = (event, box, partial)
        sent = 0
        try:
            for attempt in range(retries + 1):
                if not self.endpoint.wait_connected(timeout):
                    continue
                self.resends += sent > 0
                # the broker drops it once the device has stopped waiting (after a long outage)
                self.endpoint.publish(topic, data, self.reply_topic, frame.request_id,
                                      expiry=math.ceil(timeout * (retries + 1 - attempt)))
                sent += 1
                if self._wait(event, progress, timeout):
                    return box[0]
                log.info("request %s: no reply in %.1f s (attempt %d)", frame.request_id.hex()[:8], timeout, attempt + 1)
            if not sent:
                raise BrokerUnavailable(f"not connected to broker {self.endpoint.cfg.describe()} for "
                                        f"{retries + 1} tries of {timeout:.0f} s; the request was not sent. Is the "
                                        "broker running?")
            raise RequestTimeout(f"no reply from any server in {sent} tries of {timeout:.0f} s; "
                                 "is a server agent running on this broker?")
        finally:
            with self._lock:
                self._pending.pop(key, None)


    @staticmethod
    def _wait(event: threading.Event, progress: threading.Event, timeout: float) -> bool:
        """Wait for the reply; a streamed answer still coming (partials arriving) is not a timeout."""
        while True:
            if event.wait(timeout):
                return True
            if not progress.is_set():
                return False
            progress.clear()


class Responder(_OwnsEndpoint):
    """Server side: reads requests through the shared subscription and publishes what
    `handle_batch(frames) -> frames` returns (one reply per frame, in order). Requests
    that arrive while the handler is busy are handed over together, at most `max_batch`.

    A request seen before is answered from a cache, so a duplicate delivery or a device's
    retry is never computed twice. The cache key is (device id, request id, kind, step):
    the decode steps of one generation share a request id."""

    def __init__(self, cfg: BrokerConfig, handle_batch: Callable[[list[Frame]], list[Frame]],
                 group: str | None = DEFAULT_GROUP, client_id: str | None = None, cache_size: int = 1024,
                 max_batch: int = 1):
        """group=None subscribes without a shared subscription (a broker without them,
        such as the embedded amqtt, and then only one server agent)."""
        self.handle_batch = handle_batch
        self.server_id = client_id or f"srv-{uuid.uuid4().hex[:12]}"
        if any(c in self.server_id for c in "/+#$"):
            raise TransportError(f"server id {self.server_id!r} must not contain / + # $")
        self.cache: collections.OrderedDict[tuple, bytes] = collections.OrderedDict()
        self.cache_size = cache_size
        self.duplicates = 0
        self.served = 0
        self.batches = 0
        self._lock = threading.Lock()
        self._handling: dict[tuple, list[Message]] = {}  # the batch being answered: where its partial replies go
        self.metrics = None  # an edgeqtl.metrics.AgentMetrics, when the agent exports metrics
        self.endpoint = MqttEndpoint(cfg, self.server_id, self._on_requests,
                                     [shared_request_subscription(group) if group else f"{TOPIC_ROOT}/req/+",
                                      server_request_topic(self.server_id, "+")], max_batch=max_batch)

    def _reply_address(self, m: Message, frame: Frame | None) -> str:
        if m.response_topic:  # MQTT 5
            return m.response_topic
        if frame is not None and frame.reply_topic:  # MQTT 3.1.1: from the frame header
            return frame.reply_topic
        return reply_topic(m.topic.rsplit("/", 1)[-1])  # last resort: the request topic's device id

    def _on_requests(self, batch: list[Message]) -> None:
        todo: dict[tuple, tuple[Frame, list[Message]]] = {}  # new work, with every message that asked for it
        for m in batch:
            try:
                frame = decode_frame(m.payload)
            except ProtocolError as e:
                # The sender cannot be trusted to be anyone, but a corrupt frame still gets an answer.
                rid = m.correlation if m.correlation and len(m.correlation) == 16 else bytes(16)
                self._publish(m, None, encode_frame(error_frame(CodedError("bad_frame", str(e)), rid)))
                if self.metrics is not None:
                    self.metrics.observe_bad_frame(len(m.payload))
                continue
            sender = m.topic.rsplit("/", 1)[-1]  # the broker's ACLs tie this to the login (docs/SECURITY.md)
            if frame.device_id != sender:
                self._publish(m, frame, encode_frame(error_frame(CodedError(
                    "device_mismatch", f"the frame says device {frame.device_id!r} but came on {sender!r}'s topic; "
                                       "a device sends only as itself"), **frame.reply_fields())))
                if self.metrics is not None:
                    self.metrics.observe_bad_frame(len(m.payload))
                continue
            key = (frame.device_id, frame.request_id, frame.kind, frame.step)
            with self._lock:
                cached = self.cache.get(key)
            if cached is not None or key in todo:
                self.duplicates += 1
                if self.metrics is not None:
                    self.metrics.observe_duplicate()
                if cached is not None:
                    self._publish(m, frame, cached)
                else:
                    todo[key][1].append(m)
                continue
            todo[key] = (frame, [m])
        if not todo:
            return
        frames = [f for f, _ in todo.values()]
        self._handling = {key: msgs for key, (_, msgs) in todo.items()}
        t0 = time.perf_counter()
        try:
            replies = self.handle_batch(frames)
        except Exception as e:  # keep serving other devices
            log.exception("handler failed on a batch of %d", len(frames))
            replies = [error_frame(CodedError("server_error", f"{type(e).__name__}: {e}"), **f.reply_fields())
                       for f in frames]
        finally:
            self._handling = {}
        self.batches += 1
        sent = []
        for (key, (frame, msgs)), reply in zip(todo.items(), replies):
            data = encode_frame(reply)
            sent.append(data)
            with self._lock:
                self.cache[key] = data
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
                self.served += 1
            for m in msgs:
                self._publish(m, frame, data)
        if self.metrics is not None:
            self.metrics.observe_batch(frames, replies, sent, time.perf_counter() - t0,
                                       [len(msgs[0].payload) for _, msgs in todo.values()])

    def emit(self, request: Frame, partial: Frame) -> None:
        """Publish a partial reply (streamed tokens) to whoever asked `request`, while the
        handler is still answering it. Not cached: a retry gets the final reply only."""
        msgs = self._handling.get((request.device_id, request.request_id, request.kind, request.step), [])
        data = encode_frame(partial)
        for m in msgs:
            self._publish(m, request, data)

    def _publish(self, m: Message, frame: Frame | None, data: bytes) -> None:
        try:
            self.endpoint.publish(self._reply_address(m, frame), data, correlation=m.correlation, expiry=REPLY_EXPIRY)
        except TransportError as e:  # the device retries; the reply waits in the cache
            log.warning("could not send a reply to %s: %s", self._reply_address(m, frame), e)


def one_by_one(handle: Callable[[Frame], Frame]) -> Callable[[list[Frame]], list[Frame]]:
    """A Responder handler from a per-frame function (no batching)."""
    return lambda frames: [handle(f) for f in frames]
