"""Frame format and code packing: round trips, and every defect is a ProtocolError."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeqtl.codec import CodecError, pack_codes, packed_nbytes, symbols_per_byte, unpack_codes
from edgeqtl.wire import (Codec, Frame, FrameKind, ProtocolError, array_frame, codes_frame, decode_frame,
                          encode_frame, header_nbytes, json_frame, new_request_id)

FP = bytes(range(16))


@settings(max_examples=200, deadline=None)
@given(levels=st.sampled_from([2, 3, 4, 5, 6, 7, 16, 17, 200, 256]),
       shape=st.lists(st.integers(0, 9), min_size=1, max_size=3), seed=st.integers(0, 2 ** 32 - 1))
def test_pack_unpack_round_trip(levels, shape, seed):
    codes = np.random.default_rng(seed).integers(0, levels, size=shape).astype(np.uint8)
    packed = pack_codes(codes, levels)
    assert len(packed) == packed_nbytes(codes.size, levels)
    out = unpack_codes(packed, levels, tuple(shape))
    assert out.dtype == np.uint8 and np.array_equal(out, codes)


@pytest.mark.parametrize("levels,k", [(2, 8), (3, 5), (4, 4), (16, 2), (256, 1), (5, 3), (15, 2)])
def test_symbols_per_byte(levels, k):
    assert symbols_per_byte(levels) == k


def test_two_bit_packing_layout_is_little_endian_within_a_byte():
    assert pack_codes(np.array([1, 2, 3, 0], np.uint8), 4) == bytes([1 | 2 << 2 | 3 << 4])
    assert pack_codes(np.array([2, 1, 0, 0, 1], np.uint8), 3) == bytes([2 + 1 * 3 + 1 * 81])


def test_out_of_range_codes_and_bytes_are_refused():
    with pytest.raises(CodecError):
        pack_codes(np.array([4], np.uint8), 4)
    with pytest.raises(CodecError):
        unpack_codes(bytes([250]), 3, (5,))  # 250 > 3**5 - 1
    with pytest.raises(CodecError):
        unpack_codes(bytes(3), 4, (4,))  # wrong byte count


def _frames():
    rid = new_request_id()
    codes = np.random.default_rng(0).integers(0, 4, size=(1, 7, 12)).astype(np.uint8)
    return [
        codes_frame(FrameKind.INFER_REQUEST, codes, 4, request_id=rid, fingerprint=FP, device_id="pi-7",
                    reply_topic="edgeqtl/v1/reply/pi-7"),
        array_frame(FrameKind.TRAIN_REQUEST, np.arange(6, dtype=np.float16).reshape(2, 3), request_id=rid,
                    fingerprint=FP, step=41),
        json_frame(FrameKind.ANSWER, {"text": "red", "tokens": 1}, request_id=rid, fingerprint=FP),
    ]


@pytest.mark.parametrize("frame", _frames(), ids=lambda f: f.kind.name)
def test_frame_round_trip(frame):
    data = encode_frame(frame)
    assert len(data) == header_nbytes(frame) + len(frame.payload)
    back = decode_frame(data)
    assert back == frame
    if frame.codec == Codec.JSON:
        assert back.json() == frame.json()
    else:
        assert np.array_equal(back.array(), frame.array())


def test_every_flipped_byte_and_every_truncation_is_rejected():
    data = encode_frame(_frames()[0])
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        with pytest.raises(ProtocolError):
            decode_frame(bytes(bad))
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode_frame(data[:cut])
    with pytest.raises(ProtocolError):
        decode_frame(data + b"\x00")


def _reseal(body: bytes) -> bytes:
    import zlib

    return body + zlib.crc32(body).to_bytes(4, "little")


def test_valid_crc_with_inconsistent_sizes_is_rejected_before_allocating():
    f = _frames()[0]
    data = bytearray(encode_frame(f))[:-4]
    # claim a 4 GiB payload: must fail on the size check, not by trying to read it
    plen_at = len(data) - len(f.payload) - 4
    data[plen_at:plen_at + 4] = (2 ** 32 - 1).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="ceiling|needs"):
        decode_frame(_reseal(bytes(data)))


def test_wrong_version_and_magic_say_so():
    data = bytearray(encode_frame(_frames()[2]))[:-4]
    v = bytearray(data)
    v[4] = 9
    with pytest.raises(ProtocolError, match="version 9"):
        decode_frame(_reseal(bytes(v)))
    m = bytearray(data)
    m[:4] = b"HTTP"
    with pytest.raises(ProtocolError, match="magic"):
        decode_frame(_reseal(bytes(m)))


def test_frame_fields_are_checked_on_encode():
    with pytest.raises(ProtocolError):
        encode_frame(Frame(FrameKind.ANSWER, b"short", FP, Codec.JSON, b"{}"))
    with pytest.raises(ProtocolError):
        encode_frame(Frame(FrameKind.INFER_REQUEST, FP, FP, Codec.CODES, b"\x00", shape=(5,), levels=4))
