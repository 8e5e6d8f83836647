"""The edgeqtl frame: the one place the wire format lives. Spec: docs/PROTOCOL.md.

    offset size  field
    0      4     magic b"EQTL"
    4      1     version (1)
    5      1     kind (FrameKind)
    6      1     codec (Codec)
    7      1     ndim (0..4)
    8      2     levels (codes only; else 0)
    10     2     flags (reserved, 0)
    12     16    request id (UUID bytes)
    28     16    bundle fingerprint (first 16 bytes of its SHA-256)
    44     4     step (decode step or training step; 0 otherwise)
    48     4*nd  dims, uint32 each
    ..     1     device id length, then that many UTF-8 bytes (<= 64)
    ..     2     reply topic length, then that many UTF-8 bytes (<= 512)
    ..     4     payload length
    ..     n     payload
    end-4  4     CRC32 of every byte before it

All integers little-endian. A decoder checks every field and every size before it
allocates anything, and raises one ProtocolError saying what is wrong. Nothing in a
frame is ever unpickled or executed: payloads are packed codes, raw little-endian
numbers, or UTF-8 JSON text.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import struct
import uuid
import zlib

import numpy as np

from .codec import CodecError, pack_codes, packed_nbytes, unpack_codes

MAGIC = b"EQTL"
VERSION = 1
MAX_NDIM = 4
MAX_DEVICE_ID = 64
MAX_REPLY_TOPIC = 512
MAX_PAYLOAD = 64 * 1024 * 1024  # hard ceiling; transports enforce the broker's own limit
_FIXED = struct.Struct("<4sBBBBHH16s16sI")  # magic .. step: 48 bytes
_CRC = struct.Struct("<I")


class ProtocolError(ValueError):
    """A frame that is malformed, truncated, corrupt or from another version."""


class FrameKind(enum.IntEnum):
    INFER_REQUEST = 1  # device -> server: codes of the prompt (and image)
    ANSWER = 2  # server -> device: JSON {text, tokens, ...}
    DECODE_STEP = 3  # device -> server: codes of one new token (cut > 0)
    NEXT_TOKEN = 4  # server -> device: JSON {token_id, done}
    ERROR = 5  # either way: JSON {code, message}
    TRAIN_REQUEST = 16  # device -> server: codes + answer ids + mask (training issue)
    GRADIENT = 17  # server -> device: compressed gradient (training issue)


class Codec(enum.IntEnum):
    CODES = 1  # base-L packed integer codes (edgeqtl.codec), `levels` set
    FLOAT16 = 2  # raw little-endian float16
    FLOAT32 = 3  # raw little-endian float32
    INT32 = 4  # raw little-endian int32 (token ids, masks)
    JSON = 5  # UTF-8 JSON text, ndim 0


_ITEMSIZE = {Codec.FLOAT16: 2, Codec.FLOAT32: 4, Codec.INT32: 4}
_DTYPE = {Codec.FLOAT16: "<f2", Codec.FLOAT32: "<f4", Codec.INT32: "<i4"}


@dataclasses.dataclass
class Frame:
    kind: FrameKind
    request_id: bytes  # 16 bytes
    fingerprint: bytes  # 16 bytes
    codec: Codec
    payload: bytes
    shape: tuple[int, ...] = ()
    levels: int = 0
    device_id: str = ""
    reply_topic: str = ""
    step: int = 0

    # ---------------------------------------------------------------- payload views
    def array(self) -> np.ndarray:
        """The payload as an array of `shape` (codes unpacked to uint8)."""
        if self.codec == Codec.CODES:
            return unpack_codes(self.payload, self.levels, self.shape)
        if self.codec in _DTYPE:
            return np.frombuffer(self.payload, dtype=_DTYPE[self.codec]).reshape(self.shape)
        raise ProtocolError(f"a {self.codec.name} payload is not an array")

    def json(self) -> dict:
        if self.codec != Codec.JSON:
            raise ProtocolError(f"a {self.codec.name} payload is not JSON")
        try:
            obj = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(f"JSON payload does not parse: {e}") from None
        if not isinstance(obj, dict):
            raise ProtocolError("JSON payload must be an object")
        return obj


def new_request_id() -> bytes:
    return uuid.uuid4().bytes


def codes_frame(kind: FrameKind, codes: np.ndarray, levels: int, **fields) -> Frame:
    return Frame(kind=kind, codec=Codec.CODES, payload=pack_codes(codes, levels), shape=tuple(codes.shape),
                 levels=levels, **fields)


def array_frame(kind: FrameKind, arr: np.ndarray, **fields) -> Frame:
    codec = {np.dtype("float16"): Codec.FLOAT16, np.dtype("float32"): Codec.FLOAT32,
             np.dtype("int32"): Codec.INT32}.get(arr.dtype)
    if codec is None:
        raise ProtocolError(f"no codec for dtype {arr.dtype}")
    return Frame(kind=kind, codec=codec, payload=np.ascontiguousarray(arr, dtype=_DTYPE[codec]).tobytes(),
                 shape=tuple(arr.shape), **fields)


def json_frame(kind: FrameKind, obj: dict, **fields) -> Frame:
    return Frame(kind=kind, codec=Codec.JSON, payload=json.dumps(obj, separators=(",", ":")).encode(), **fields)


# --------------------------------------------------------------------------- encode


def encode_frame(f: Frame) -> bytes:
    _check_fields(f)
    dev = f.device_id.encode("utf-8")
    reply = f.reply_topic.encode("utf-8")
    head = _FIXED.pack(MAGIC, VERSION, int(f.kind), int(f.codec), len(f.shape), f.levels, 0,
                       f.request_id, f.fingerprint, f.step)
    parts = [head, struct.pack(f"<{len(f.shape)}I", *f.shape), struct.pack("<B", len(dev)), dev,
             struct.pack("<H", len(reply)), reply, struct.pack("<I", len(f.payload)), f.payload]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def header_nbytes(f: Frame) -> int:
    """Bytes a frame adds around its payload (header + CRC)."""
    return _FIXED.size + 4 * len(f.shape) + 1 + len(f.device_id.encode()) + 2 + len(f.reply_topic.encode()) + 4 + 4


def _check_fields(f: Frame) -> None:
    if len(f.request_id) != 16 or len(f.fingerprint) != 16:
        raise ProtocolError("request id and fingerprint must be 16 bytes each")
    if len(f.shape) > MAX_NDIM:
        raise ProtocolError(f"at most {MAX_NDIM} dims, got {len(f.shape)}")
    if len(f.device_id.encode()) > MAX_DEVICE_ID:
        raise ProtocolError(f"device id longer than {MAX_DEVICE_ID} bytes")
    if len(f.reply_topic.encode()) > MAX_REPLY_TOPIC:
        raise ProtocolError(f"reply topic longer than {MAX_REPLY_TOPIC} bytes")
    if not 0 <= f.step < 2 ** 32:
        raise ProtocolError("step out of range")
    _check_payload_size(f.codec, f.shape, f.levels, len(f.payload))


def _check_payload_size(codec: Codec, shape: tuple[int, ...], levels: int, n: int) -> None:
    if n > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {n} bytes exceeds the {MAX_PAYLOAD}-byte ceiling")
    if codec == Codec.CODES:
        if not 2 <= levels <= 256:
            raise ProtocolError(f"codes need levels in [2, 256], got {levels}")
        expected = packed_nbytes(math.prod(shape), levels)
    elif codec in _ITEMSIZE:
        expected = math.prod(shape) * _ITEMSIZE[codec]
    elif codec == Codec.JSON:
        if shape:
            raise ProtocolError("a JSON payload has no shape")
        return
    else:  # pragma: no cover - Codec is closed
        raise ProtocolError(f"unknown codec {codec}")
    if n != expected:
        raise ProtocolError(f"payload is {n} bytes but shape {list(shape)} with codec {codec.name} needs {expected}")


# --------------------------------------------------------------------------- decode


def decode_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Parse and validate a frame. Any defect raises ProtocolError."""
    buf = memoryview(data)
    n = len(buf)
    if n < _FIXED.size + 1 + 2 + 4 + 4:
        raise ProtocolError(f"frame of {n} bytes is shorter than the smallest header")
    (crc,) = _CRC.unpack_from(buf, n - 4)
    if zlib.crc32(buf[: n - 4]) != crc:
        raise ProtocolError("CRC32 mismatch: the frame is corrupt or truncated")
    magic, version, kind, codec, ndim, levels, flags, rid, fp, step = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}: not an edgeqtl frame")
    if version != VERSION:
        raise ProtocolError(f"frame version {version}; this edgeqtl speaks version {VERSION}")
    try:
        kind, codec = FrameKind(kind), Codec(codec)
    except ValueError as e:
        raise ProtocolError(f"unknown field value: {e}") from None
    if ndim > MAX_NDIM:
        raise ProtocolError(f"ndim {ndim} exceeds {MAX_NDIM}")
    if flags:
        raise ProtocolError(f"reserved flags set: {flags:#x}")
    off = _FIXED.size
    end = n - 4

    def take(size: int, what: str) -> memoryview:
        nonlocal off
        if off + size > end:
            raise ProtocolError(f"truncated in {what}")
        out = buf[off: off + size]
        off += size
        return out

    shape = struct.unpack(f"<{ndim}I", take(4 * ndim, "dims"))
    dev = _text(take(take(1, "device id length")[0], "device id"), "device id")
    (rlen,) = struct.unpack("<H", take(2, "reply topic length"))
    if rlen > MAX_REPLY_TOPIC:
        raise ProtocolError(f"reply topic length {rlen} exceeds {MAX_REPLY_TOPIC}")
    reply = _text(take(rlen, "reply topic"), "reply topic")
    if len(dev.encode()) > MAX_DEVICE_ID:
        raise ProtocolError(f"device id longer than {MAX_DEVICE_ID} bytes")
    (plen,) = struct.unpack("<I", take(4, "payload length"))
    _check_payload_size(codec, shape, levels, plen)  # before touching the payload
    payload = bytes(take(plen, "payload"))
    if off != end:
        raise ProtocolError(f"{end - off} stray bytes after the payload")
    return Frame(kind=kind, request_id=bytes(rid), fingerprint=bytes(fp), codec=codec, payload=payload,
                 shape=tuple(shape), levels=levels, device_id=dev, reply_topic=reply, step=step)


def _text(b: memoryview, what: str) -> str:
    try:
        return bytes(b).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


__all__ = ["Frame", "FrameKind", "Codec", "ProtocolError", "CodecError", "encode_frame", "decode_frame",
           "codes_frame", "array_frame", "json_frame", "new_request_id", "header_nbytes"]
