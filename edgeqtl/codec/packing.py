"""Packing integer codes into bytes, vectorised with numpy (torch-free).

Codes with L levels pack `k` symbols per byte, where k is the largest integer with
L**k <= 256 (base-L packing). For L = 2, 4, 16, 256 this is plain bit packing (8, 4,
2, 1 symbols per byte: 1, 2, 4, 8 bits per symbol); L = 3 packs 5 symbols per byte
(1.6 bits per symbol, against log2(3) = 1.58). Symbol j of a group sits at weight
L**j (for powers of two: bits [j*b, (j+1)*b) of the byte, least significant first).
The symbol count is not stored here: the frame header carries the shape.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import CodecError


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
