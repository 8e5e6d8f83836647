"""Entropy coding of codes.

The learned quantizer does not use its L levels evenly, and each code dimension has its
own histogram (a trained 2-bit model: 1.63 bits of entropy per code on average). An
`EntropyModel` holds those histograms, counted at export on training samples and
shipped in both the bundle and the server half; codes are then coded with interleaved
rANS in numpy (codec/rans.py: the same coder on a Raspberry Pi and on the server, no
compiled package; one static categorical model per dimension, no state across frames,
so a lost or reordered frame costs nothing). Payload: the model's 4-byte digest (a
device and a server with different models are told so instead of decoding garbage),
then the rANS payload (lane count, CRC-32 of the codes, lane states, 16-bit words).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import numpy as np

from . import rans
from .errors import CodecError


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

    @functools.cached_property
    def table(self) -> rans.RansTable:
        """The coder's integer frequency table, built once."""
        return rans.RansTable(self.counts)

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


def encode_codes_entropy(codes: np.ndarray, levels: int, model: EntropyModel) -> bytes:
    """Codes (..., code_dim) in [0, levels) -> digest + rANS payload (edgeqtl.codec.rans)."""
    codes = np.asarray(codes)
    _check_model(model, codes.shape, levels)
    return model.digest + rans.encode(codes, model.table)


def decode_codes_entropy(data: bytes | memoryview, levels: int, shape: tuple[int, ...],
                         model: EntropyModel) -> np.ndarray:
    data = bytes(data)
    if len(data) < 4:
        raise CodecError(f"entropy-coded payload of {len(data)} bytes has no model digest")
    if data[:4] != model.digest:
        raise CodecError(f"codes were entropy-coded with model {data[:4].hex()}, this side has "
                         f"{model.digest.hex()}: export the bundle and the server half together")
    _check_model(model, shape, levels)
    return rans.decode(data[4:], shape, model.table)


def _check_model(model: EntropyModel, shape: tuple[int, ...], levels: int) -> None:
    if levels != model.levels or not shape or shape[-1] != model.code_dim:
        raise CodecError(f"entropy model is for {model.code_dim} dims x {model.levels} levels, "
                         f"not shape {list(shape)} at {levels} levels")
