"""Gradient codecs for split training: sizes, error bounds, and int4's unbiasedness."""
from __future__ import annotations

import numpy as np
import pytest

from edgeqtl.codec import CodecError, GRADIENT_CODECS, decode_gradient, encode_gradient, gradient_nbytes


def _grad(shape=(2, 7, 32), seed=0):
    g = np.random.default_rng(seed).standard_t(df=3, size=shape).astype(np.float32)  # heavy tails, like gradients
    g[0, 0] = 0.0  # an all-zero row must survive (scale 0)
    return g


@pytest.mark.parametrize("codec", GRADIENT_CODECS)
def test_round_trip_sizes_and_error_bounds(codec):
    g = _grad()
    data = encode_gradient(g, codec, np.random.default_rng(1))
    nonzero = int((np.abs(g).reshape(-1, g.shape[-1]).max(1) > 0).sum())
    assert len(data) == gradient_nbytes(g.shape, codec, nonzero)
    out = decode_gradient(data, codec, g.shape)
    assert out.dtype == np.float32 and out.shape == g.shape
    assert np.all(out[0, 0] == 0)
    step = np.abs(g).max(-1, keepdims=True) / {"fp16": np.inf, "int8": 127, "int4": 7}[codec]
    bound = {"fp16": 1e-3 * np.abs(g), "int8": step + 1e-6, "int4": step + 1e-6}[codec]
    assert np.all(np.abs(out - g) <= bound)


def test_downlink_savings_against_fp16():
    shape = (1, 40, 128)  # a prompt's gradient at the tiny preset's code_dim
    fp16 = gradient_nbytes(shape, "fp16")
    # every row non-zero: the float32 scale of each 128-value row costs 3.1 points
    assert 1 - gradient_nbytes(shape, "int8") / fp16 == pytest.approx(1 - (5 + 40 * 132) / (40 * 256))  # 5 B: the 40-row bitmap
    assert 1 - gradient_nbytes(shape, "int4") / fp16 == pytest.approx(1 - (5 + 40 * 68) / (40 * 256))
    # padding rows (exact zeros) cost a bit each
    g = np.zeros(shape, np.float32)
    g[0, 10:] = 1.0
    assert len(encode_gradient(g, "int8")) == gradient_nbytes(shape, "int8", 30) == 5 + 30 * 132


def test_int4_stochastic_rounding_is_unbiased_with_bounded_variance():
    """E[Q(g)] = g; per element Var = p(1 - p) s^2 <= s^2 / 4 with s = max|g_row| / 7.
    With n draws the mean's standard error is at most s / (2 sqrt(n)); we allow 5 of them."""
    g = _grad((4, 64), seed=3)
    rng = np.random.default_rng(7)
    n = 4000
    draws = np.stack([decode_gradient(encode_gradient(g, "int4", rng), "int4", g.shape) for _ in range(n)])
    s = np.abs(g).max(-1, keepdims=True) / 7
    assert np.all(np.abs(draws.mean(0) - g) <= 5 * s / (2 * np.sqrt(n)) + 1e-7)
    assert np.all(draws.var(0) <= s ** 2 / 4 * 1.1 + 1e-9)
    assert np.abs(draws.mean(0) - g).max() < (s / 2).min()


def test_bad_payloads_are_clear_errors():
    g = _grad()
    data = encode_gradient(g, "int4")
    with pytest.raises(CodecError, match="expected"):
        decode_gradient(data[:-1], "int4", g.shape)
    bad = bytearray(data)
    bad[0] ^= 0x02  # the bitmap now claims another row set: the size no longer fits
    with pytest.raises(CodecError, match="expected"):
        decode_gradient(bytes(bad), "int4", g.shape)
    bad = bytearray(encode_gradient(g, "int8"))
    nb = -(-14 // 8)  # the bitmap of 14 rows
    bad[nb:nb + 4] = np.float32(np.nan).tobytes()
    with pytest.raises(CodecError, match="finite"):
        decode_gradient(bytes(bad), "int8", g.shape)
    with pytest.raises(CodecError, match="finite"):
        encode_gradient(np.array([[np.inf, 1.0]], np.float32), "int8")
    with pytest.raises(CodecError, match="one of"):
        encode_gradient(g, "int2")
