"""Packing integer codes into bytes, vectorised with numpy (torch-free).

Codes with L levels pack `k` symbols per byte, where k is the largest integer with
L**k <= 256 (base-L packing). For L = 2, 4, 16, 256 this is plain bit packing (8, 4,
2, 1 symbols per byte: 1, 2, 4, 8 bits per symbol); L = 3 packs 5 symbols per byte
(1.6 bits per symbol, against log2(3) = 1.58). Symbol j of a group sits at weight
L**j (for powers of two: bits [j*b, (j+1)*b) of the byte, least significant first).
The symbol count is not stored here: the frame header carries the shape.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import numpy as np


class CodecError(ValueError):
    """Codes or packed bytes that do not fit the levels or shape given."""


def symbols_per_byte(levels: int) -> int:
    if not 2 <= levels <= 256:
        raise CodecError(f"levels must be in [2, 256], got {levels}")
    k = 1
    while levels ** (k + 1) <= 256:
        k += 1
    return k


def packed_nbytes(n_symbols: int, levels: int) -> int:
    return -(-n_symbols // symbols_per_byte(levels))


def bits_per_symbol(levels: int) -> float:
    """Bits on the wire per symbol after packing (not the entropy)."""
    return 8.0 / symbols_per_byte(levels)


def _is_pow2(levels: int) -> bool:
    return levels & (levels - 1) == 0


# 2 bits, the default, on 32-bit words: 4 codes (one per byte, little-endian) fold into
# one byte with three shift-or-mask steps, instead of four strided passes over columns.
def _pack_2bit(flat: np.ndarray) -> bytes:
    w = flat.view("<u4")
    w = (w | (w >> np.uint32(6))) & np.uint32(0x000F000F)
    w = w | (w >> np.uint32(12))
    return w.astype(np.uint8).tobytes()


def _unpack_2bit(packed: np.ndarray) -> np.ndarray:
    w = packed.astype("<u4")
    w = (w | (w << np.uint32(12))) & np.uint32(0x000F000F)
    w = (w | (w << np.uint32(6))) & np.uint32(0x03030303)
    return w.view(np.uint8)


def pack_codes(codes: np.ndarray, levels: int) -> bytes:
    """Integer codes in [0, levels), any shape -> packed bytes."""
    k = symbols_per_byte(levels)
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.dtype != np.uint8:
        if flat.size and (flat.min() < 0 or flat.max() > 255):
            raise CodecError("codes must be integers in [0, 255]")
        flat = flat.astype(np.uint8)
    if flat.size and int(flat.max()) >= levels:
        raise CodecError(f"code {int(flat.max())} out of range for {levels} levels")
    if k == 1:
        return flat.tobytes()
    pad = (-flat.size) % k
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, np.uint8)])
    if levels == 4:
        return _pack_2bit(flat)
    groups = flat.reshape(-1, k)
    out = groups[:, 0].copy()
    if _is_pow2(levels):
        b = levels.bit_length() - 1
        for j in range(1, k):
            out |= groups[:, j] << np.uint8(j * b)
    else:
        for j in range(1, k):
            out += groups[:, j] * np.uint8(levels ** j)  # sum stays <= levels**k - 1 <= 255
    return out.tobytes()


def unpack_codes(data: bytes | memoryview, levels: int, shape: tuple[int, ...]) -> np.ndarray:
    """Packed bytes -> uint8 codes of `shape`; the byte count must match exactly."""
    k = symbols_per_byte(levels)
    n = math.prod(shape)
    expected = -(-n // k)
    if len(data) != expected:
        raise CodecError(f"{len(data)} packed bytes for {n} symbols at {levels} levels; expected {expected}")
    packed = np.frombuffer(data, dtype=np.uint8)
    if k == 1:
        out = packed.copy()
    elif levels == 4:
        out = _unpack_2bit(packed)[:n]
    else:
        out = np.empty((packed.size, k), dtype=np.uint8)
        if _is_pow2(levels):
            b = levels.bit_length() - 1
            mask = np.uint8(levels - 1)
            for j in range(k):
                np.bitwise_and(packed >> np.uint8(j * b), mask, out=out[:, j])
        else:
            rest = packed.copy()
            for j in range(k):
                np.remainder(rest, np.uint8(levels), out=out[:, j])
                rest //= np.uint8(levels)
            if rest.any():
                raise CodecError(f"packed byte out of range for {levels} levels")
        out = out.reshape(-1)[:n]
    if int(out.max(initial=0)) >= levels:
        raise CodecError(f"unpacked code out of range for {levels} levels")
    return out.reshape(shape)


# --------------------------------------------------------------------------- gradients
#
# Split training sends back the gradient with respect to the dequantised codes, a float
# array (..., D). Three codecs; int8 and int4 work per row (the last axis):
#   fp16  raw float16, every row (the 16-bit baseline);
#   int8  stochastic rounding of g / s, s = max|g_row| / 127, to an integer in [-127, 127]
#         (round to nearest was measured 3 points worse in split training: it zeroes the
#         small components of a row with an outlier, every step the same way);
#   int4  stochastic rounding of g / s, s = max|g_row| / 7, to an integer in [-7, 7]:
#         floor(x) + Bernoulli(x - floor(x)), so E[Q(g)] = g exactly (unbiased, as SFLAM's
#         quantizer), with variance p(1 - p) s^2 <= s^2 / 4 per element. Stored as q + 8
#         in 4-bit symbols (pack_codes with 16 levels).
# int8/int4 payload: a bitmap of the rows that are not all zero (1 bit a row, little-endian
# bit order), then a float32 scale per such row, then their values. Rows of exact zeros
# are the padding positions of a batch (masked out of attention and loss), so they cost
# a bit each instead of a scale and a row of zeros.

GRADIENT_CODECS = ("fp16", "int8", "int4")
_GRAD_QMAX = {"int8": 127, "int4": 7}


def _grad_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    if not shape or shape[-1] == 0:
        raise CodecError(f"a gradient has a non-empty last axis, got shape {list(shape)}")
    n = math.prod(shape)
    return n // shape[-1], shape[-1]


def _grad_body_nbytes(rows: int, width: int, codec: str) -> int:
    return 4 * rows + (rows * width if codec == "int8" else packed_nbytes(rows * width, 16))


def gradient_nbytes(shape: tuple[int, ...], codec: str, nonzero_rows: int | None = None) -> int:
    """Payload bytes for `shape`; for int8/int4, with `nonzero_rows` rows not all zero
    (default: all of them, the largest size)."""
    rows, width = _grad_rows(shape)
    if codec == "fp16":
        return 2 * rows * width
    if codec not in _GRAD_QMAX:
        raise CodecError(f"gradient codec must be one of {GRADIENT_CODECS}, got {codec!r}")
    return -(-rows // 8) + _grad_body_nbytes(rows if nonzero_rows is None else nonzero_rows, width, codec)


def encode_gradient(g: np.ndarray, codec: str, rng: np.random.Generator | None = None) -> bytes:
    """float array (..., D) -> payload bytes. `rng` drives int4's stochastic rounding."""
    g = np.asarray(g, dtype=np.float32)
    if g.ndim == 0 or not np.isfinite(g).all():
        raise CodecError("a gradient is a finite float array with at least one axis")
    if codec == "fp16":
        return g.astype("<f2").tobytes()
    if codec not in _GRAD_QMAX:
        raise CodecError(f"gradient codec must be one of {GRADIENT_CODECS}, got {codec!r}")
    qmax = _GRAD_QMAX[codec]
    rows = g.reshape(-1, g.shape[-1])
    peak = np.abs(rows).max(axis=1)
    keep = peak > 0
    bitmap = np.packbits(keep, bitorder="little").tobytes()
    rows, scale = rows[keep], (peak[keep] / qmax).astype(np.float32)
    x = rows / scale[:, None]
    rng = rng if rng is not None else np.random.default_rng()
    lo = np.floor(x)
    q = np.clip(lo + (rng.random(x.shape, dtype=np.float32) < (x - lo)), -qmax, qmax)  # unbiased rounding
    if codec == "int8":
        return bitmap + scale.astype("<f4").tobytes() + q.astype(np.int8).tobytes()
    return bitmap + scale.astype("<f4").tobytes() + pack_codes((q.astype(np.int16) + 8).astype(np.uint8), 16)


def decode_gradient(data: bytes | memoryview, codec: str, shape: tuple[int, ...]) -> np.ndarray:
    """Payload bytes -> float32 gradient of `shape`; sizes are checked first."""
    rows, width = _grad_rows(shape)
    data = bytes(data)
    if codec == "fp16":
        if len(data) != 2 * rows * width:
            raise CodecError(f"{len(data)} bytes for an fp16 gradient of shape {list(shape)}; "
                             f"expected {2 * rows * width}")
        return np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(shape)
    nb = -(-rows // 8)
    if codec not in _GRAD_QMAX or len(data) < nb:
        raise CodecError(f"{len(data)} bytes cannot hold a {codec} gradient of shape {list(shape)}")
    keep = np.unpackbits(np.frombuffer(data[:nb], np.uint8), count=rows, bitorder="little").astype(bool)
    if np.unpackbits(np.frombuffer(data[:nb], np.uint8), bitorder="little")[rows:].any():
        raise CodecError("gradient row bitmap has bits set past the last row")
    kept = int(keep.sum())
    expected = nb + _grad_body_nbytes(kept, width, codec)
    if len(data) != expected:
        raise CodecError(f"{len(data)} bytes for a {codec} gradient of shape {list(shape)} with {kept} non-zero "
                         f"rows; expected {expected}")
    scale = np.frombuffer(data[nb: nb + 4 * kept], dtype="<f4")
    if not np.isfinite(scale).all() or (scale < 0).any():
        raise CodecError("gradient scales must be finite and non-negative")
    body = data[nb + 4 * kept:]
    if codec == "int8":
        q = np.frombuffer(body, dtype=np.int8).astype(np.float32)
    else:
        q = unpack_codes(body, 16, (kept * width,)).astype(np.float32) - 8
        if (q < -7).any():
            raise CodecError("int4 gradient symbol out of range")
    out = np.zeros((rows, width), np.float32)
    out[keep] = q.reshape(kept, width) * scale[:, None]
    return out.reshape(shape)


# --------------------------------------------------------------------------- entropy coding
#
# The learned quantizer does not use its L levels evenly, and each code dimension has its
# own histogram (a trained 2-bit model: 1.63 bits of entropy per code on average). An
# `EntropyModel` holds those histograms, counted at export on generated training samples
# and shipped in both the bundle and the server half; codes are then coded with rANS
# (constriction's stack coder, one categorical model per dimension, static: no state
# across frames, so a lost or reordered frame costs nothing). Payload: the model's 4-byte
# digest (a device and a server with different models are told so instead of decoding
# garbage), then the coder's 32-bit words, little-endian.


@dataclasses.dataclass(frozen=True, eq=False)
class EntropyModel:
    counts: np.ndarray  # (code_dim, levels) int64, every count >= 1

    def __post_init__(self):
        c = np.asarray(self.counts)
        if c.ndim != 2 or c.shape[1] < 2 or c.shape[1] > 256 or not np.issubdtype(c.dtype, np.integer) \
                or (c < 1).any() or (c > 2 ** 40).any():
            raise CodecError("an entropy model is a (code_dim, levels) table of counts >= 1")
        object.__setattr__(self, "counts", c.astype(np.int64))

    @classmethod
    def from_codes(cls, codes: np.ndarray, levels: int) -> "EntropyModel":
        """Histograms per dimension of codes (..., code_dim), with add-one smoothing so
        that every code stays codable."""
        flat = np.asarray(codes).reshape(-1, codes.shape[-1]).astype(np.int64)
        counts = np.ones((flat.shape[1], levels), np.int64)
        for d in range(flat.shape[1]):
            counts[d] += np.bincount(flat[:, d], minlength=levels)[:levels]
        return cls(counts)

    @property
    def code_dim(self) -> int:
        return self.counts.shape[0]

    @property
    def levels(self) -> int:
        return self.counts.shape[1]

    @functools.cached_property
    def digest(self) -> bytes:
        return hashlib.sha256(self.counts.astype("<i8").tobytes() + bytes([self.levels])).digest()[:4]

    @functools.cached_property
    def probabilities(self) -> np.ndarray:
        return self.counts / self.counts.sum(1, keepdims=True)

    def bits_per_code(self) -> float:
        """The model's own entropy, averaged over dimensions."""
        p = self.probabilities
        return float(-(p * np.log2(p)).sum(1).mean())

    def to_list(self) -> list[list[int]]:
        return self.counts.tolist()

    @classmethod
    def from_list(cls, rows) -> "EntropyModel":
        try:
            return cls(np.asarray(rows, dtype=np.int64))
        except (TypeError, ValueError, OverflowError) as e:
            raise CodecError(f"entropy model table is malformed: {e}") from None


def _constriction():
    try:
        import constriction
    except ImportError:
        raise CodecError("entropy-coded codes need the constriction package (pip install constriction)") from None
    return constriction.stream


def _tiled(model: EntropyModel, shape: tuple[int, ...], levels: int) -> np.ndarray:
    if levels != model.levels or not shape or shape[-1] != model.code_dim:
        raise CodecError(f"entropy model is for {model.code_dim} dims x {model.levels} levels, "
                         f"not shape {list(shape)} at {levels} levels")
    return np.tile(model.probabilities, (math.prod(shape) // model.code_dim, 1))


def encode_codes_entropy(codes: np.ndarray, levels: int, model: EntropyModel) -> bytes:
    """Codes (..., code_dim) in [0, levels) -> digest + rANS words."""
    stream = _constriction()
    codes = np.asarray(codes)
    probs = _tiled(model, codes.shape, levels)
    flat = codes.reshape(-1).astype(np.int32)
    if flat.size and (flat.min() < 0 or flat.max() >= levels):
        raise CodecError(f"codes out of range for {levels} levels")
    coder = stream.stack.AnsCoder()
    coder.encode_reverse(flat, stream.model.Categorical(perfect=False), probs)
    return model.digest + coder.get_compressed().astype("<u4").tobytes()


def decode_codes_entropy(data: bytes | memoryview, levels: int, shape: tuple[int, ...],
                         model: EntropyModel) -> np.ndarray:
    stream = _constriction()
    data = bytes(data)
    if len(data) < 4 or (len(data) - 4) % 4:
        raise CodecError(f"entropy-coded payload of {len(data)} bytes is not a digest plus 32-bit words")
    if data[:4] != model.digest:
        raise CodecError(f"codes were entropy-coded with model {data[:4].hex()}, this side has "
                         f"{model.digest.hex()}: export the bundle and the server half together")
    probs = _tiled(model, shape, levels)
    words = np.frombuffer(data[4:], dtype="<u4").astype(np.uint32)
    coder = stream.stack.AnsCoder(words)
    out = coder.decode(stream.model.Categorical(perfect=False), probs)
    if not coder.is_empty():
        raise CodecError("entropy-coded payload has data left over after the last code: corrupt")
    return out.astype(np.uint8).reshape(shape)
