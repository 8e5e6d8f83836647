"""Payload codecs, torch-free: one table from the wire's codec id to how a payload of
that codec is encoded, decoded and size-checked.

    CODES       base-L packed integer codes              (packing.py)
    CODES_RANS  integer codes, rANS with an EntropyModel (entropy.py)
    FLOAT16/32, INT32   raw little-endian numbers
    GRAD_INT8/GRAD_INT4 gradients, per-row scales        (gradient.py)
    JSON, TENSORS       not arrays: the frame format (edgeqtl.wire) reads them

The table checks itself at import: every codec id has an entry, so a codec added to
the wire without its functions fails at once, not on the first frame that uses it.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable

import numpy as np

from .entropy import EntropyModel, decode_codes_entropy, encode_codes_entropy
from .errors import CodecError
from .gradient import decode_gradient, encode_gradient, gradient_nbytes
from .packing import bits_per_symbol, pack_codes, packed_nbytes, symbols_per_byte, unpack_codes


class Codec(enum.IntEnum):
    """Codec ids as they travel in frame headers (docs/PROTOCOL.md)."""

    CODES = 1  # base-L packed integer codes, `levels` set
    FLOAT16 = 2  # raw little-endian float16 (also the fp16 gradient codec)
    FLOAT32 = 3  # raw little-endian float32
    INT32 = 4  # raw little-endian int32 (token ids)
    JSON = 5  # UTF-8 JSON text, no shape
    CODES_RANS = 6  # integer codes entropy-coded with the bundle's EntropyModel, `levels` set
    GRAD_INT8 = 7  # float gradient, int8 per row with a float32 scale per row
    GRAD_INT4 = 8  # float gradient, 4-bit stochastic rounding per row, unbiased
    TENSORS = 9  # several parts (each its own codec, shape, levels) in one frame; no shape


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    """How one codec's payload is made, read back, and checked before it is read.
    encode(array, levels=, entropy=, rng=) -> bytes; decode(payload, shape, levels=,
    entropy=) -> array; check_size(shape, levels, nbytes) raises CodecError. A codec
    whose payload is not an array (JSON, TENSORS) has no encode/decode."""

    check_size: Callable[[tuple, int, int], None]
    encode: Callable[..., bytes] | None = None
    decode: Callable[..., np.ndarray] | None = None
    gradient: str | None = None  # the name split training selects it by (--grad-codec)


def _exact(expected: Callable[[tuple, int], int]) -> Callable[[tuple, int, int], None]:
    def check(shape: tuple, levels: int, n: int) -> None:
        want = expected(shape, levels)
        if n != want:
            raise CodecError(f"payload is {n} bytes but shape {list(shape)} needs {want}")
    return check


def _check_levels(levels: int) -> None:
    if not 2 <= levels <= 256:
        raise CodecError(f"codes need levels in [2, 256], got {levels}")


def _check_codes(shape: tuple, levels: int, n: int) -> None:
    _check_levels(levels)
    _exact(lambda s, lv: packed_nbytes(math.prod(s), lv))(shape, levels, n)


def _check_codes_rans(shape: tuple, levels: int, n: int) -> None:
    _check_levels(levels)
    packed = packed_nbytes(math.prod(shape), levels)
    if n < 4 + 6 or n % 2 or n >= packed:  # the sender uses it only when it beats plain packing
        raise CodecError(f"entropy-coded payload of {n} bytes for shape {list(shape)}: must be a 4-byte digest, "
                         f"a 6-byte rANS header and 16-bit words, and under the {packed} bytes of packing")


def _check_gradient(name: str) -> Callable[[tuple, int, int], None]:
    def check(shape: tuple, levels: int, n: int) -> None:
        if not shape or not shape[-1]:
            raise CodecError("a gradient has a non-empty last axis")
        # between the row bitmap alone (all rows zero) and every row kept; decoding checks the exact size
        least, most = gradient_nbytes(shape, name, 0), gradient_nbytes(shape, name)
        if not least <= n <= most:
            raise CodecError(f"gradient payload of {n} bytes for shape {list(shape)}: must be {least} to {most}")
    return check


def _check_no_shape(shape: tuple, levels: int, n: int) -> None:
    if shape:
        raise CodecError("this payload has no shape")


def _raw(dtype: str) -> CodecSpec:
    size = np.dtype(dtype).itemsize
    return CodecSpec(
        check_size=_exact(lambda s, lv: math.prod(s) * size),
        encode=lambda a, **_: np.ascontiguousarray(a, dtype=dtype).tobytes(),
        decode=lambda p, shape, **_: np.frombuffer(p, dtype=dtype).reshape(shape))


def _needs_entropy(entropy: EntropyModel | None) -> EntropyModel:
    if entropy is None:
        raise CodecError("entropy-coded codes, but no entropy model here: the bundle has one and this side was "
                         "exported without it")
    return entropy


CODECS: dict[Codec, CodecSpec] = {
    Codec.CODES: CodecSpec(_check_codes, lambda a, levels, **_: pack_codes(a, levels),
                           lambda p, shape, levels, **_: unpack_codes(p, levels, shape)),
    Codec.CODES_RANS: CodecSpec(
        _check_codes_rans,
        lambda a, levels, entropy, **_: encode_codes_entropy(a, levels, _needs_entropy(entropy)),
        lambda p, shape, levels, entropy, **_: decode_codes_entropy(p, levels, shape, _needs_entropy(entropy))),
    Codec.FLOAT16: dataclasses.replace(_raw("<f2"), gradient="fp16"),
    Codec.FLOAT32: _raw("<f4"),
    Codec.INT32: _raw("<i4"),
    Codec.GRAD_INT8: CodecSpec(_check_gradient("int8"), lambda a, rng=None, **_: encode_gradient(a, "int8", rng),
                               lambda p, shape, **_: decode_gradient(p, "int8", shape), gradient="int8"),
    Codec.GRAD_INT4: CodecSpec(_check_gradient("int4"), lambda a, rng=None, **_: encode_gradient(a, "int4", rng),
                               lambda p, shape, **_: decode_gradient(p, "int4", shape), gradient="int4"),
    Codec.JSON: CodecSpec(_check_no_shape),
    Codec.TENSORS: CodecSpec(_check_no_shape),
}

GRADIENT_CODECS = {spec.gradient: codec for codec, spec in CODECS.items() if spec.gradient}  # "int8" -> GRAD_INT8


def _check_table() -> None:
    missing = [c.name for c in Codec if c not in CODECS]
    if missing:
        raise ImportError(f"edgeqtl.codec: no entry for codec(s) {missing} in CODECS")


_check_table()

__all__ = ["Codec", "CodecSpec", "CODECS", "GRADIENT_CODECS", "CodecError", "EntropyModel", "pack_codes",
           "unpack_codes", "packed_nbytes", "symbols_per_byte", "bits_per_symbol", "encode_gradient",
           "decode_gradient", "gradient_nbytes", "encode_codes_entropy", "decode_codes_entropy"]
