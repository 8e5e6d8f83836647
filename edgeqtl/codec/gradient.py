"""Gradient codecs: split training sends back the gradient with respect to the
dequantised codes, a float array (..., D). Three codecs; int8 and int4 work per row
(the last axis):
  fp16  raw float16, every row (the 16-bit baseline; the wire's FLOAT16 codec);
  int8  stochastic rounding of g / s, s = max|g_row| / 127, to an integer in [-127, 127]
        (round to nearest was measured 3 points worse in split training: it zeroes the
        small components of a row with an outlier, every step the same way);
  int4  stochastic rounding of g / s, s = max|g_row| / 7, to an integer in [-7, 7]:
        floor(x) + Bernoulli(x - floor(x)), so E[Q(g)] = g exactly (unbiased, as SFLAM's
        quantizer), with variance p(1 - p) s^2 <= s^2 / 4 per element. Stored as q + 8
        in 4-bit symbols (pack_codes with 16 levels).
int8/int4 payload: a bitmap of the rows that are not all zero (1 bit a row, little-endian
bit order), then a float32 scale per such row, then their values. Rows of exact zeros
are the padding positions of a batch (masked out of attention and loss), so they cost
a bit each instead of a scale and a row of zeros.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CodecError
from .packing import pack_codes, packed_nbytes, unpack_codes
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
