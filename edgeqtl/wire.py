"""The edgeqtl frame: the one place the wire format lives. Spec: docs/PROTOCOL.md.

    offset size  field
    0      4     magic b"EQTL"
    4      1     version (1 or 2: the lowest that has the frame's features; see VERSIONS)
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

import base64
import dataclasses
import enum
import json
import math
import struct
import uuid
import zlib

import numpy as np

from .codec import CODECS, GRADIENT_CODECS, Codec, CodecError, EntropyModel, encode_codes_entropy, pack_codes
from .errors import CodedError, EdgeqtlError, RemoteError

MAGIC = b"EQTL"
VERSION = 2  # the newest version this edgeqtl speaks; it reads every version from 1
# What each version added. The header layout is the same in all of them: a frame is sent
# as the lowest version that has its features, so a peer that speaks only version 1
# still serves a plain request, and refuses a newer one naming both versions.
VERSIONS = {1: "codes, answers, decode steps, split training, federated averaging",
            2: "INFER_REQUEST with options (generation settings, streaming, an image by reference); TOKENS"}
MAX_NDIM = 4
MAX_DEVICE_ID = 64
MAX_REPLY_TOPIC = 512
MAX_PAYLOAD = 64 * 1024 * 1024  # hard ceiling; transports enforce the broker's own limit
_FIXED = struct.Struct("<4sBBBBHH16s16sI")  # magic .. step: 48 bytes
_CRC = struct.Struct("<I")


class ProtocolError(EdgeqtlError, ValueError):
    """A frame that is malformed, truncated, corrupt or from another version."""


class FrameKind(enum.IntEnum):
    INFER_REQUEST = 1  # device -> server: codes of the prompt (and image)
    ANSWER = 2  # server -> device: JSON {text, tokens, ...}
    DECODE_STEP = 3  # device -> server: codes of one new token (cut > 0)
    NEXT_TOKEN = 4  # server -> device: JSON {token_id, done}
    ERROR = 5  # either way: JSON {code, message}
    TOKENS = 6  # server -> device (v2): JSON {i, ids}, streamed tokens i, i + 1, ... of an answer
    TRAIN_REQUEST = 16  # device -> server, TENSORS: codes, mask, answer positions, answer ids, JSON {ckpt_step}
    GRADIENT = 17  # server -> device, TENSORS: gradient w.r.t. the dequantised codes, JSON {loss, ...}
    FEDAVG_SUBMIT = 18  # device -> server, TENSORS: the device's trainable weights, flat float32; step = round
    FEDAVG_FETCH = 19  # device -> server, JSON {}: the round's average, or ERROR not_ready; step = round
    FEDAVG_RESULT = 20  # server -> device, TENSORS: the averaged weights, flat float32
    # label-private (U-shaped) split training: the device keeps the head, the labels and the loss
    TRUNK_REQUEST = 21  # device -> server, TENSORS: codes, mask, output positions, JSON {ckpt_step}
    TRUNK_HIDDEN = 22  # server -> device, TENSORS: the trunk's hidden states at the output positions, JSON {}
    HEAD_GRADIENT = 23  # device -> server, TENSORS: d loss / d those hidden states; the reply is a GRADIENT


_ARRAY_CODECS = {np.dtype("float16"): Codec.FLOAT16, np.dtype("float32"): Codec.FLOAT32,
                 np.dtype("int32"): Codec.INT32}
MAX_PARTS = 8
_PART = struct.Struct("<BBH")  # codec, ndim, levels; then dims, payload length, payload


@dataclasses.dataclass
class Part:
    """One tensor: a payload with its codec, shape and levels. A frame's own payload is
    one part; a TENSORS frame's payload holds several."""

    codec: Codec
    payload: bytes
    shape: tuple[int, ...] = ()
    levels: int = 0

    def array(self, entropy: EntropyModel | None = None) -> np.ndarray:
        """The payload as an array of `shape` (codes unpacked to uint8, gradients to
        float32). Entropy-coded codes need the bundle's `entropy` model."""
        spec = CODECS[self.codec]
        if spec.decode is None:
            raise ProtocolError(f"a {self.codec.name} payload is not an array")
        try:
            return spec.decode(self.payload, self.shape, levels=self.levels, entropy=entropy)
        except CodecError as e:
            raise ProtocolError(str(e)) from None

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
    _parts: list[Part] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def body(self) -> Part:
        return Part(self.codec, self.payload, self.shape, self.levels)

    def array(self, entropy: EntropyModel | None = None) -> np.ndarray:
        return self.body.array(entropy)

    def json(self) -> dict:
        return self.body.json()

    def parts(self) -> list[Part]:
        """The tensors of a TENSORS frame, in order (parsed once)."""
        if self.codec != Codec.TENSORS:
            raise ProtocolError(f"a {self.codec.name} payload has no parts")
        if self._parts is None:
            self._parts = _parse_parts(self.payload)
        return self._parts

    def reply_fields(self) -> dict:
        """The ids a reply to this frame carries, so the sender can match it."""
        return {"request_id": self.request_id, "fingerprint": self.fingerprint, "step": self.step}


def new_request_id() -> bytes:
    return uuid.uuid4().bytes


# --------------------------------------------------------------------------- building payloads


def codes_part(codes: np.ndarray, levels: int, entropy: EntropyModel | None = None) -> Part:
    """Codes packed at log2(L) bits, or entropy-coded with `entropy` when that is smaller."""
    packed = pack_codes(codes, levels)
    if entropy is not None:
        coded = encode_codes_entropy(codes, levels, entropy)
        if len(coded) < len(packed):
            return Part(Codec.CODES_RANS, coded, tuple(codes.shape), levels)
    return Part(Codec.CODES, packed, tuple(codes.shape), levels)


def array_part(arr: np.ndarray) -> Part:
    codec = _ARRAY_CODECS.get(arr.dtype)
    if codec is None:
        raise ProtocolError(f"no codec for dtype {arr.dtype}")
    return Part(codec, CODECS[codec].encode(arr), tuple(arr.shape))


def gradient_part(g: np.ndarray, codec: str, rng: np.random.Generator | None = None) -> Part:
    """codec: "fp16", "int8" or "int4" (edgeqtl.codec.GRADIENT_CODECS)."""
    wire_codec = GRADIENT_CODECS.get(codec)
    if wire_codec is None:
        raise ProtocolError(f"gradient codec must be one of {tuple(GRADIENT_CODECS)}, got {codec!r}")
    try:
        return Part(wire_codec, CODECS[wire_codec].encode(np.asarray(g, np.float32), rng=rng), tuple(np.shape(g)))
    except CodecError as e:
        raise ProtocolError(str(e)) from None


def json_part(obj: dict) -> Part:
    return Part(Codec.JSON, json.dumps(obj, separators=(",", ":")).encode())


def frame_of(kind: FrameKind, part: Part, **fields) -> Frame:
    return Frame(kind=kind, codec=part.codec, payload=part.payload, shape=part.shape, levels=part.levels, **fields)


def codes_frame(kind: FrameKind, codes: np.ndarray, levels: int, entropy: EntropyModel | None = None,
                **fields) -> Frame:
    return frame_of(kind, codes_part(codes, levels, entropy), **fields)


def array_frame(kind: FrameKind, arr: np.ndarray, **fields) -> Frame:
    return frame_of(kind, array_part(arr), **fields)


def json_frame(kind: FrameKind, obj: dict, **fields) -> Frame:
    return frame_of(kind, json_part(obj), **fields)


def tensors_frame(kind: FrameKind, parts: list[Part], **fields) -> Frame:
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ProtocolError(f"a TENSORS frame has 1 to {MAX_PARTS} parts, got {len(parts)}")
    out = [struct.pack("<B", len(parts))]
    for p in parts:
        if p.codec == Codec.TENSORS or len(p.shape) > MAX_NDIM:
            raise ProtocolError("a part is one tensor (no nesting), at most 4-d")
        _check_payload_size(p.codec, p.shape, p.levels, len(p.payload))
        out += [_PART.pack(int(p.codec), len(p.shape), p.levels), struct.pack(f"<{len(p.shape)}I", *p.shape),
                struct.pack("<I", len(p.payload)), p.payload]
    return Frame(kind=kind, codec=Codec.TENSORS, payload=b"".join(out), _parts=list(parts), **fields)


# --------------------------------------------------------------------------- errors


def error_frame(error: CodedError, request_id: bytes, fingerprint: bytes = bytes(16), step: int = 0) -> Frame:
    """The ERROR frame that carries `error` back to the sender of a request."""
    return json_frame(FrameKind.ERROR, {"code": error.code, "message": error.message}, request_id=request_id,
                      fingerprint=fingerprint, step=step)


def raise_if_error(frame: Frame) -> Frame:
    """`frame`, unless it is an ERROR frame: then the error it carries, as a RemoteError."""
    if frame.kind == FrameKind.ERROR:
        err = frame.json()
        raise RemoteError(str(err.get("code", "error")), str(err.get("message", "")))
    return frame


# --------------------------------------------------------------------------- split training's request


IGNORE_LABEL = -100  # a label position without loss (the prompt, padding)


@dataclasses.dataclass
class TrainRequest:
    """The body of a TRAIN_REQUEST: what the server needs for one step of one device."""

    codes: Part  # CODES (B, T, code_dim), or FLOAT16 values for a split without a quantizer
    labels: np.ndarray  # (B, T) int64, IGNORE_LABEL where there is no loss
    attention_mask: np.ndarray  # (B, T) int64: 0 padding, else the token's position step (position_steps_part)
    ckpt_step: int  # the device's last checkpointed step: replies up to it can be dropped


def train_request_frame(codes: Part, labels: np.ndarray, attention_mask: np.ndarray, ckpt_step: int,
                        **fields) -> Frame:
    """TRAIN_REQUEST: the labels travel sparse, as a 1-bit map of the answer positions and
    the answer token ids, and the attention mask as a 1-bit map; dense int32 labels and
    mask would cost 8 bytes a token, as much as 32 two-bit codes."""
    labels, mask = np.asarray(labels), np.asarray(attention_mask)
    answer = labels != IGNORE_LABEL
    parts = [codes, codes_part((mask > 0).astype(np.uint8), 2), codes_part(answer.astype(np.uint8), 2),
             array_part(labels[answer].astype(np.int32)), *position_steps_part(mask),
             json_part({"ckpt_step": int(ckpt_step)})]
    return tensors_frame(FrameKind.TRAIN_REQUEST, parts, **fields)


def position_steps_part(mask: np.ndarray) -> list[Part]:
    """[] for a 0/1 mask; else [the (B, T) INT32 position steps]: a reduced image whose
    kept tokens keep their original positions (models.split.position_mask). 4 bytes a
    token, about 1.5% of a row's 2-bit codes at a real model's width."""
    mask = np.asarray(mask)
    return [array_part(mask.astype(np.int32))] if (mask > 1).any() else []


def _position_steps(parts: list[Part], mask: np.ndarray, kind: str) -> np.ndarray:
    """The attention mask with the optional position steps part applied."""
    if not parts:
        return mask.astype(np.int64)
    steps = parts[0]
    if steps.codec != Codec.INT32 or tuple(steps.shape) != mask.shape:
        raise ProtocolError(f"{kind} position steps: a {list(mask.shape)} INT32 part")
    arr = steps.array().astype(np.int64)
    if ((arr > 0) != mask.astype(bool)).any() or (arr > MAX_IMAGE_SPAN).any():
        raise ProtocolError(f"{kind} position steps: positive exactly where the attention mask is set, at most "
                            f"{MAX_IMAGE_SPAN}")
    return arr


def parse_train_request(frame: Frame) -> TrainRequest:
    parts = frame.parts()
    if len(parts) not in (5, 6):
        raise ProtocolError(f"TRAIN_REQUEST has 5 parts (codes, attention mask, answer positions, answer ids, "
                            f"[position steps,] JSON), got {len(parts)}")
    codes, mask_part, answer_part, ids_part, *steps_part, info_part = parts
    mask = _bit_map(mask_part, "TRAIN_REQUEST", "attention mask")
    answer = _bit_map(answer_part, "TRAIN_REQUEST", "answer positions").astype(bool)
    if ids_part.codec != Codec.INT32 or len(ids_part.shape) != 1:
        raise ProtocolError("TRAIN_REQUEST answer ids: a 1-d INT32 part")
    ids = ids_part.array()
    if answer.shape != mask.shape or tuple(codes.shape[:2]) != mask.shape or len(codes.shape) != 3:
        raise ProtocolError(f"TRAIN_REQUEST shapes do not fit: codes {list(codes.shape)}, mask {list(mask.shape)}, "
                            f"answer positions {list(answer.shape)}")
    if ids.shape[0] != int(answer.sum()) or (ids < 0).any():
        raise ProtocolError(f"TRAIN_REQUEST: {ids.shape[0]} answer ids for {int(answer.sum())} answer positions, "
                            "or a negative id")
    ckpt = _ckpt_step(info_part, "TRAIN_REQUEST")
    labels = np.full(mask.shape, IGNORE_LABEL, dtype=np.int64)
    labels[answer] = ids
    return TrainRequest(codes, labels, _position_steps(steps_part, mask, "TRAIN_REQUEST"), ckpt)


def _bit_map(p: Part, kind: str, what: str) -> np.ndarray:
    if p.codec != Codec.CODES or p.levels != 2 or len(p.shape) != 2:
        raise ProtocolError(f"{kind} {what}: a (B, T) 1-bit CODES part")
    return p.array()


def _ckpt_step(p: Part, kind: str) -> int:
    ckpt = p.json().get("ckpt_step", 0)
    if not isinstance(ckpt, int) or isinstance(ckpt, bool) or ckpt < 0:
        raise ProtocolError(f"{kind} ckpt_step must be a non-negative integer")
    return ckpt


def output_positions(labels: np.ndarray) -> np.ndarray:
    """(B, T) bool: the positions whose next token is a label, the ones the loss reads
    logits at (position t predicts token t + 1)."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=bool)
    out[:, :-1] = labels[:, 1:] != IGNORE_LABEL
    return out


@dataclasses.dataclass
class TrunkRequest:
    """The body of a TRUNK_REQUEST (label-private training): a TRAIN_REQUEST without the
    answer ids. The server returns the trunk's hidden states at `positions`."""

    codes: Part
    attention_mask: np.ndarray  # (B, T) int64, as TrainRequest's
    positions: np.ndarray  # (B, T) bool: where the device's head computes the loss
    ckpt_step: int


def trunk_request_frame(codes: Part, attention_mask: np.ndarray, positions: np.ndarray, ckpt_step: int,
                        **fields) -> Frame:
    mask = np.asarray(attention_mask)
    parts = [codes, codes_part((mask > 0).astype(np.uint8), 2), codes_part(np.asarray(positions).astype(np.uint8), 2),
             *position_steps_part(mask), json_part({"ckpt_step": int(ckpt_step)})]
    return tensors_frame(FrameKind.TRUNK_REQUEST, parts, **fields)


def parse_trunk_request(frame: Frame) -> TrunkRequest:
    parts = frame.parts()
    if len(parts) not in (4, 5):
        raise ProtocolError(f"TRUNK_REQUEST has 4 parts (codes, attention mask, output positions, [position steps,] "
                            f"JSON), got {len(parts)}")
    codes, mask_part, pos_part, *steps_part, info_part = parts
    mask = _bit_map(mask_part, "TRUNK_REQUEST", "attention mask")
    positions = _bit_map(pos_part, "TRUNK_REQUEST", "output positions").astype(bool)
    if positions.shape != mask.shape or tuple(codes.shape[:2]) != mask.shape or len(codes.shape) != 3:
        raise ProtocolError(f"TRUNK_REQUEST shapes do not fit: codes {list(codes.shape)}, mask {list(mask.shape)}, "
                            f"output positions {list(positions.shape)}")
    if not positions.any():
        raise ProtocolError("TRUNK_REQUEST: no output position (a batch without an answer token)")
    return TrunkRequest(codes, _position_steps(steps_part, mask, "TRUNK_REQUEST"), positions,
                        _ckpt_step(info_part, "TRUNK_REQUEST"))


def hidden_part_of(frame: Frame, kind: FrameKind, rows: int | None = None) -> np.ndarray:
    """The (N, hidden) float32 tensor of a TRUNK_HIDDEN or HEAD_GRADIENT frame (first part)."""
    if frame.kind != kind:
        raise ProtocolError(f"expected {kind.name}, got {frame.kind.name}")
    part = frame.parts()[0]
    if len(part.shape) != 2 or (rows is not None and part.shape[0] != rows):
        raise ProtocolError(f"{kind.name}: a (N, hidden) tensor{f' with N = {rows}' if rows is not None else ''}, "
                            f"got {list(part.shape)}")
    return np.array(part.array(), dtype=np.float32)


# --------------------------------------------------------------------------- inference's request (v2)

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_STREAM_EVERY = 64
MAX_IMAGE_SPAN = 1 << 20  # positions one image may take: far past any model's context


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where the image's positions are in a prompt, and the digest of their codes. With
    by_reference the frame's codes leave those positions out: the server splices in the
    codes it kept from an earlier question (or answers `image_not_cached`)."""

    at: int  # the first image position in the whole prompt
    tokens: int  # how many positions
    digest: str  # image_digest() of those positions' codes, hex
    by_reference: bool = False
    # A reduced image whose tokens keep their original positions (models/reduce.py): the
    # positions the whole image takes, and where among them each of the `tokens` sits
    # (ascending). On the wire a bit map of `span` bits, base64: 92 bytes for 729 tokens.
    span: int | None = None
    kept: tuple[int, ...] | None = None

    def __post_init__(self):
        if (self.span is None) != (self.kept is None):
            raise ProtocolError("INFER_REQUEST options: image span and kept go together")
        if self.kept is not None:
            kept = self.kept
            if len(kept) != self.tokens or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= self.span:
                raise ProtocolError(f"INFER_REQUEST options: image kept must be {self.tokens} distinct ascending "
                                    f"positions below the span of {self.span}")

    def to_json(self) -> dict:
        out = {"at": self.at, "tokens": self.tokens, "digest": self.digest, "ref": self.by_reference}
        if self.kept is not None:
            bits = np.zeros(self.span, np.uint8)
            bits[list(self.kept)] = 1
            out.update(span=self.span, kept=base64.b64encode(np.packbits(bits).tobytes()).decode("ascii"))
        return out

    @classmethod
    def from_json(cls, image) -> "ImageRef":
        base, positional = {"at", "tokens", "digest", "ref"}, {"span", "kept"}
        if not isinstance(image, dict) or not base <= set(image) or not set(image) - base in (set(), positional):
            raise ProtocolError("INFER_REQUEST options: image is {at, tokens, digest, ref[, span, kept]}")
        at, n = _opt_int(image, "at", 0, 2 ** 31 - 1), _opt_int(image, "tokens", 1, 2 ** 31 - 1)
        digest = image["digest"]
        if at is None or n is None or not isinstance(image["ref"], bool) or not isinstance(digest, str) \
                or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ProtocolError("INFER_REQUEST options: image needs integer at >= 0 and tokens >= 1, a 64-digit "
                                "hex digest and a boolean ref")
        if "span" not in image:
            return cls(at, n, digest, image["ref"])
        span = _opt_int(image, "span", n, MAX_IMAGE_SPAN)
        try:
            raw = base64.b64decode(image["kept"], validate=True) if isinstance(image["kept"], str) else None
        except ValueError:
            raw = None
        if raw is None or len(raw) != -(-span // 8):
            raise ProtocolError(f"INFER_REQUEST options: image kept is a base64 bit map of the span's {span} bits")
        bits = np.unpackbits(np.frombuffer(raw, np.uint8))
        if bits[span:].any():
            raise ProtocolError("INFER_REQUEST options: image kept has bits past the span")
        return cls(at, n, digest, image["ref"], span, tuple(int(i) for i in np.flatnonzero(bits)))


@dataclasses.dataclass(frozen=True)
class InferOptions:
    """What a device may ask of one generation; None: the server's default. The server
    caps each within its own limits (server_agent/sampling.py)."""

    max_new_tokens: int | None = None
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    seed: int | None = None  # None: from the request id, so a retried request samples the same
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    stream: int = 0  # send TOKENS every this many tokens (0: only the final ANSWER)
    image: ImageRef | None = None

    @property
    def is_default(self) -> bool:
        return self == InferOptions()

    def to_json(self) -> dict:
        out = {k: v for k, v in (("max_new_tokens", self.max_new_tokens), ("temperature", self.temperature),
                                 ("top_p", self.top_p), ("seed", self.seed)) if v is not None}
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stream:
            out["stream"] = self.stream
        if self.image is not None:
            out["image"] = self.image.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict) -> "InferOptions":
        """Checks every field's type and range: ProtocolError names the one that is wrong."""
        known = {"max_new_tokens", "temperature", "top_p", "seed", "stop", "stream", "image"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ProtocolError(f"INFER_REQUEST options: unknown field(s) {unknown}")
        mnt = _opt_int(d, "max_new_tokens", 1, 2 ** 31 - 1)
        seed = _opt_int(d, "seed", 0, 2 ** 63 - 1)
        stream = _opt_int(d, "stream", 0, MAX_STREAM_EVERY) or 0
        temperature = _opt_float(d, "temperature", 0.0, 100.0)
        top_p = _opt_float(d, "top_p", 0.0, 1.0)
        if top_p == 0.0:
            raise ProtocolError("INFER_REQUEST options: top_p must be above 0")
        stop = d.get("stop", [])
        if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(
                isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stop):
            raise ProtocolError(f"INFER_REQUEST options: stop is a list of at most {MAX_STOP_STRINGS} non-empty "
                                f"strings of at most {MAX_STOP_CHARS} characters")
        image = d.get("image")
        if image is not None:
            image = ImageRef.from_json(image)
        return cls(mnt, temperature, top_p, seed, tuple(stop), stream, image)


def _opt_int(d: dict, key: str, lo: int, hi: int) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"INFER_REQUEST options: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _opt_float(d: dict, key: str, lo: float, hi: float) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"INFER_REQUEST options: {key} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def image_digest(codes: np.ndarray) -> str:
    """The hex SHA-256 of an image's codes (T, D) as sent: what names them when a later
    question sends the image by reference. Over the values, so packing or entropy
    coding does not change it."""
    import hashlib

    arr = np.ascontiguousarray(codes)
    arr = arr.astype(np.uint8) if arr.dtype.kind in "iub" else arr.astype(np.float16)
    h = hashlib.sha256(f"{arr.dtype.str}{list(arr.shape)}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def infer_request_frame(codes: Part, options: InferOptions, prompt_ids: np.ndarray | None = None,
                        **fields) -> Frame:
    """INFER_REQUEST: the codes alone (version 1) when every option is the server's
    default and the text goes as codes; else TENSORS [codes, JSON options] or, with the
    prompt's token ids (cut 0: the codes are the image positions' alone),
    TENSORS [codes, INT32 ids, JSON options] (version 2)."""
    if prompt_ids is not None:
        ids = array_part(np.asarray(prompt_ids, np.int32).reshape(-1))
        return tensors_frame(FrameKind.INFER_REQUEST, [codes, ids, json_part(options.to_json())], **fields)
    if options.is_default:
        return frame_of(FrameKind.INFER_REQUEST, codes, **fields)
    return tensors_frame(FrameKind.INFER_REQUEST, [codes, json_part(options.to_json())], **fields)


@dataclasses.dataclass
class InferRequest:
    codes: Part  # (1, T, D); with prompt ids, (1, N image tokens, D)
    options: InferOptions
    prompt_ids: np.ndarray | None = None  # (T,) int32: the whole prompt, image positions included


def parse_infer_request(frame: Frame) -> InferRequest:
    """An INFER_REQUEST of any form."""
    if frame.codec != Codec.TENSORS:
        return InferRequest(frame.body, InferOptions())
    parts = frame.parts()
    if len(parts) not in (2, 3) or parts[-1].codec != Codec.JSON or parts[0].codec in (Codec.JSON, Codec.TENSORS):
        raise ProtocolError("an INFER_REQUEST with options has 2 parts (codes, JSON options) or 3 (codes, INT32 "
                            "prompt ids, JSON options)")
    ids = None
    if len(parts) == 3:
        if parts[1].codec != Codec.INT32 or len(parts[1].shape) != 1:
            raise ProtocolError("INFER_REQUEST prompt ids: a 1-d INT32 part")
        ids = parts[1].array()
        if (ids < 0).any():
            raise ProtocolError("INFER_REQUEST prompt ids: a negative id")
    return InferRequest(parts[0], InferOptions.from_json(parts[-1].json()), ids)


def tokens_frame(first: int, ids: list[int], **fields) -> Frame:
    """TOKENS: tokens `first`, `first` + 1, ... of an answer being generated (streaming)."""
    return json_frame(FrameKind.TOKENS, {"i": int(first), "ids": [int(t) for t in ids]}, **fields)


def frame_version(f: Frame) -> int:
    """The lowest version that has this frame's features."""
    if f.kind == FrameKind.TOKENS or (f.kind == FrameKind.INFER_REQUEST and f.codec == Codec.TENSORS):
        return 2
    return 1


def _parse_parts(payload: bytes) -> list[Part]:
    buf = memoryview(payload)
    off = 0

    def take(size: int, what: str) -> memoryview:
        nonlocal off
        if off + size > len(buf):
            raise ProtocolError(f"TENSORS payload truncated in {what}")
        out = buf[off: off + size]
        off += size
        return out

    count = take(1, "part count")[0]
    if not 1 <= count <= MAX_PARTS:
        raise ProtocolError(f"a TENSORS frame has 1 to {MAX_PARTS} parts, got {count}")
    parts = []
    for i in range(count):
        codec, ndim, levels = _PART.unpack(take(_PART.size, f"part {i} header"))
        try:
            codec = Codec(codec)
        except ValueError:
            raise ProtocolError(f"part {i}: unknown codec {codec}") from None
        if codec == Codec.TENSORS or ndim > MAX_NDIM:
            raise ProtocolError(f"part {i}: a part is one tensor (no nesting), at most {MAX_NDIM}-d")
        shape = struct.unpack(f"<{ndim}I", take(4 * ndim, f"part {i} dims"))
        (n,) = struct.unpack("<I", take(4, f"part {i} length"))
        _check_payload_size(codec, shape, levels, n)
        parts.append(Part(codec, bytes(take(n, f"part {i} payload")), tuple(shape), levels))
    if off != len(buf):
        raise ProtocolError(f"{len(buf) - off} stray bytes after the last part")
    return parts


# --------------------------------------------------------------------------- encode


def encode_frame(f: Frame) -> bytes:
    _check_fields(f)
    dev = f.device_id.encode("utf-8")
    reply = f.reply_topic.encode("utf-8")
    head = _FIXED.pack(MAGIC, frame_version(f), int(f.kind), int(f.codec), len(f.shape), f.levels, 0,
                       f.request_id, f.fingerprint, f.step)
    parts = [head, struct.pack(f"<{len(f.shape)}I", *f.shape), struct.pack("<B", len(dev)), dev,
             struct.pack("<H", len(reply)), reply, struct.pack("<I", len(f.payload)), f.payload]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def frame_ids(data: bytes) -> tuple[bytes, int]:
    """(request id, step) read from an encoded frame's fixed header, without decoding it."""
    if len(data) < _FIXED.size or data[:4] != MAGIC:
        raise ProtocolError("not an edgeqtl frame")
    fields = _FIXED.unpack_from(data, 0)
    return bytes(fields[7]), fields[9]


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
    try:
        CODECS[codec].check_size(tuple(shape), levels, n)
    except CodecError as e:
        raise ProtocolError(f"{codec.name}: {e}") from None


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
    if version > VERSION:
        raise ProtocolError(f"frame version {version} comes from a newer edgeqtl; this one speaks versions 1 to "
                            f"{VERSION}: upgrade edgeqtl on this side (pip install -U edgeqtl)")
    if version < 1:
        raise ProtocolError(f"frame version {version} does not exist (versions start at 1)")
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
    parts = _parse_parts(payload) if codec == Codec.TENSORS else None  # every part's sizes, checked now
    frame = Frame(kind=kind, request_id=bytes(rid), fingerprint=bytes(fp), codec=codec, payload=payload,
                  shape=tuple(shape), levels=levels, device_id=dev, reply_topic=reply, step=step, _parts=parts)
    if frame_version(frame) > version:
        raise ProtocolError(f"a version {version} frame cannot be a {kind.name} with {codec.name} (that is version "
                            f"{frame_version(frame)})")
    return frame


def _text(b: memoryview, what: str) -> str:
    try:
        return bytes(b).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None


__all__ = ["Frame", "FrameKind", "Codec", "Part", "ProtocolError", "encode_frame", "decode_frame", "frame_of",
           "codes_frame", "array_frame", "json_frame", "tensors_frame", "array_part", "codes_part", "gradient_part",
           "json_part", "error_frame", "raise_if_error", "new_request_id", "header_nbytes", "IGNORE_LABEL",
           "TrainRequest", "train_request_frame", "parse_train_request", "TrunkRequest", "trunk_request_frame",
           "parse_trunk_request", "output_positions", "hidden_part_of", "ImageRef", "InferOptions", "image_digest",
           "infer_request_frame", "parse_infer_request", "InferRequest", "tokens_frame", "frame_version", "VERSION", "VERSIONS"]
