"""Frames larger than a broker takes travel as chunks; the receiver puts them back
together and checks them. Beside the frame format (edgeqtl/wire.py), spec in
docs/PROTOCOL.md ("Chunks").

A real-size question does not fit every broker: 729 image tokens x 1024 dims at 2 bits
is ~187 KB, and AWS IoT Core takes at most 128 KB a message. A frame whose MQTT
message would exceed the limit (the broker's CONNACK Maximum Packet Size, or one the
user sets) is cut into chunks, each its own message on the same topic:

    offset size  field
    0      4     magic b"EQTC"
    4      1     version (1)
    5      1     reserved, 0
    6      2     index (0-based)
    8      2     count (2 .. 65535)
    10     2     reserved, 0
    12     16    request id of the frame (as in its header)
    28     4     step of the frame
    32     4     total length of the frame, bytes
    36     4     CRC32 of the whole frame
    40     n     this chunk's slice of the frame
    end-4  4     CRC32 of every byte of this chunk before it

The receiver keeps chunks per (sender topic, request id, step) until all `count` have
arrived, then checks the whole frame's CRC and hands the frame on; a duplicate chunk is
ignored, a corrupt one dropped (its sender retries the request, with the same id). What
it holds is bounded: at most `max_pending_bytes` per sender topic and `max_frame` per
frame (larger totals are refused at their first chunk), and an incomplete frame is
dropped `timeout` seconds after its last chunk arrived.
"""
from __future__ import annotations

import dataclasses
import math
import struct
import threading
import time
import zlib

from .errors import EdgeqtlError

MAGIC = b"EQTC"
VERSION = 1
_HEAD = struct.Struct("<4sBBHHH16sIII")  # 40 bytes
_CRC = struct.Struct("<I")
OVERHEAD = _HEAD.size + _CRC.size
MAX_CHUNKS = 65535


class ChunkError(EdgeqtlError, ValueError):
    """A chunk that is malformed, corrupt, or does not fit the others of its frame."""


def is_chunk(data: bytes) -> bool:
    return data[:4] == MAGIC


def split_frame(data: bytes, request_id: bytes, step: int, max_chunk: int) -> list[bytes]:
    """An encoded frame -> chunks of at most `max_chunk` bytes each (envelope included)."""
    room = max_chunk - OVERHEAD
    if room < 1:
        raise ChunkError(f"a chunk of {max_chunk} bytes has no room for data after its {OVERHEAD}-byte envelope")
    count = max(2, math.ceil(len(data) / room))
    if count > MAX_CHUNKS:
        raise ChunkError(f"a frame of {len(data)} bytes needs {count} chunks of {max_chunk} bytes; at most "
                         f"{MAX_CHUNKS}: allow larger messages on the broker")
    room = math.ceil(len(data) / count)  # even chunks
    total_crc = zlib.crc32(data)
    out = []
    for i in range(count):
        body = _HEAD.pack(MAGIC, VERSION, 0, i, count, 0, request_id, step, len(data), total_crc) + \
            data[i * room:(i + 1) * room]
        out.append(body + _CRC.pack(zlib.crc32(body)))
    return out


@dataclasses.dataclass
class Chunk:
    index: int
    count: int
    request_id: bytes
    step: int
    total: int
    total_crc: int
    data: bytes


def parse_chunk(data: bytes) -> Chunk:
    if len(data) < OVERHEAD:
        raise ChunkError(f"a chunk of {len(data)} bytes is shorter than its envelope")
    (crc,) = _CRC.unpack_from(data, len(data) - 4)
    if zlib.crc32(memoryview(data)[:-4]) != crc:
        raise ChunkError("chunk CRC32 mismatch: corrupt or truncated")
    magic, version, _, index, count, _, rid, step, total, total_crc = _HEAD.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION:
        raise ChunkError(f"chunk version {version}; this edgeqtl reads chunk version {VERSION}")
    if not 2 <= count <= MAX_CHUNKS or index >= count:
        raise ChunkError(f"chunk {index} of {count}: not a valid chunk number")
    return Chunk(index, count, bytes(rid), step, total, total_crc, bytes(data[_HEAD.size:-4]))


@dataclasses.dataclass
class _Partial:
    count: int
    total: int
    total_crc: int
    parts: dict[int, bytes]
    size: int
    touched: float


class Reassembler:
    """Chunks in, whole frames out; thread-safe, bounded (see the module docstring)."""

    def __init__(self, max_pending_bytes: int = 64 * 1024 * 1024, max_frame: int = 64 * 1024 * 1024,
                 timeout: float = 60.0, clock=time.monotonic):
        self.max_pending_bytes = max_pending_bytes
        self.max_frame = max_frame
        self.timeout = timeout
        self.clock = clock
        self._partials: dict[tuple, _Partial] = {}
        self._lock = threading.Lock()
        self.dropped = 0  # chunks refused or frames given up

    def add(self, sender: str, data: bytes) -> bytes | None:
        """A chunk from `sender` (its topic); returns the whole frame when this chunk
        completes it. Raises ChunkError for a chunk that cannot be used (counted in
        `dropped`; the frame's other chunks are kept until it completes or times out)."""
        try:
            c = parse_chunk(data)
        except ChunkError:
            self.dropped += 1
            raise
        key = (sender, c.request_id, c.step)
        now = self.clock()
        with self._lock:
            self._expire(now)
            p = self._partials.get(key)
            if p is None:
                if c.total > self.max_frame:
                    self.dropped += 1
                    raise ChunkError(f"a chunked frame of {c.total} bytes exceeds the {self.max_frame}-byte limit")
                p = self._partials[key] = _Partial(c.count, c.total, c.total_crc, {}, 0, now)
            if (c.count, c.total, c.total_crc) != (p.count, p.total, p.total_crc):
                self.dropped += 1
                raise ChunkError(f"chunk {c.index} does not fit the other chunks of its frame")
            if c.index in p.parts:
                return None  # a duplicate delivery (QoS 1): harmless
            if self._pending(sender) + len(c.data) > self.max_pending_bytes:
                self.dropped += 1
                raise ChunkError(f"{sender} has more than {self.max_pending_bytes} bytes of chunks pending")
            p.parts[c.index] = c.data
            p.size += len(c.data)
            p.touched = now
            if len(p.parts) < p.count:
                return None
            del self._partials[key]
        frame = b"".join(p.parts[i] for i in range(p.count))
        if len(frame) != p.total or zlib.crc32(frame) != p.total_crc:
            self.dropped += 1
            raise ChunkError("the reassembled frame does not match its length and CRC32")
        return frame

    def _pending(self, sender: str) -> int:
        return sum(p.size for (s, _, _), p in self._partials.items() if s == sender)

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self._partials.items() if now - p.touched > self.timeout]:
            del self._partials[key]
            self.dropped += 1

    @property
    def pending_frames(self) -> int:
        with self._lock:
            return len(self._partials)
