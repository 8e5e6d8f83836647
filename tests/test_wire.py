"""Frame format and code packing: round trips, and every defect is a ProtocolError."""
from __future__ import annotations

import dataclasses

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


# --------------------------------------------------------------------------- entropy-coded codes


def _skewed_codes(levels=4, dims=32, tokens=40, seed=0):
    """Codes whose per-dimension histograms differ, as a trained quantizer's do."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(levels, 0.5), size=dims)
    codes = np.stack([[rng.choice(levels, p=p[d]) for d in range(dims)] for _ in range(tokens)]).astype(np.uint8)
    return codes[None], p


@pytest.mark.parametrize("levels", [2, 3, 4, 16])
def test_entropy_coded_frames_round_trip_and_beat_packing(levels):
    from edgeqtl.codec import EntropyModel

    codes, _ = _skewed_codes(levels)
    model = EntropyModel.from_codes(_skewed_codes(levels, tokens=400, seed=0)[0], levels)
    frame = codes_frame(FrameKind.INFER_REQUEST, codes, levels, entropy=model, request_id=new_request_id(),
                        fingerprint=FP)
    assert frame.codec == Codec.CODES_RANS
    assert len(frame.payload) < packed_nbytes(codes.size, levels)
    back = decode_frame(encode_frame(frame))
    assert np.array_equal(back.array(model), codes)
    with pytest.raises(ProtocolError, match="no entropy model"):
        back.array()


def test_entropy_coding_falls_back_to_packing_when_it_does_not_pay():
    from edgeqtl.codec import EntropyModel

    levels = 4
    model = EntropyModel(np.ones((8, levels), np.int64))  # uniform: nothing to gain over 2-bit packing
    codes = np.random.default_rng(1).integers(0, levels, size=(1, 5, 8)).astype(np.uint8)
    frame = codes_frame(FrameKind.INFER_REQUEST, codes, levels, entropy=model, request_id=new_request_id(),
                        fingerprint=FP)
    assert frame.codec == Codec.CODES and np.array_equal(frame.array(), codes)


def test_entropy_model_mismatch_and_bad_payloads_are_clear_errors():
    from edgeqtl.codec import EntropyModel, decode_codes_entropy, encode_codes_entropy

    codes, _ = _skewed_codes()
    model = EntropyModel.from_codes(codes, 4)
    other = EntropyModel(model.counts + 1)
    data = encode_codes_entropy(codes, 4, model)
    with pytest.raises(CodecError, match="export the bundle and the server half together"):
        decode_codes_entropy(data, 4, codes.shape, other)
    with pytest.raises(CodecError, match="left over|16-bit words|CRC"):
        decode_codes_entropy(data + b"\0\0\0\x01", 4, codes.shape, model)
    with pytest.raises(CodecError, match="16-bit words"):
        decode_codes_entropy(data[:-1], 4, codes.shape, model)
    with pytest.raises(CodecError, match="not shape"):
        decode_codes_entropy(data, 4, (1, 40, 16), model)
    # the frame decoder bounds the payload before touching it
    frame = codes_frame(FrameKind.INFER_REQUEST, codes, 4, entropy=model, request_id=new_request_id(), fingerprint=FP)
    frame.shape = (1, 1, 4)
    with pytest.raises(ProtocolError, match="under the"):
        encode_frame(frame)
    with pytest.raises(CodecError, match="counts >= 1"):
        EntropyModel(np.zeros((4, 4), np.int64))


# --------------------------------------------------------------------------- multi-part frames (split training)


def _train_frame():
    from edgeqtl.wire import array_part, codes_part, gradient_part, json_part, tensors_frame

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, size=(2, 6, 8)).astype(np.uint8)
    labels = rng.integers(-100, 40, size=(2, 6)).astype(np.int32)
    grad = rng.normal(size=(2, 6, 8)).astype(np.float32)
    parts = [codes_part(codes, 4), array_part(labels), gradient_part(grad, "int8"), gradient_part(grad, "int4", rng),
             json_part({"loss": 1.5})]
    return tensors_frame(FrameKind.TRAIN_REQUEST, parts, request_id=new_request_id(), fingerprint=FP, step=7), \
        codes, labels, grad


def test_tensors_frame_round_trip():
    frame, codes, labels, grad = _train_frame()
    back = decode_frame(encode_frame(frame))
    p = back.parts()
    assert back.step == 7 and [x.codec for x in p] == [Codec.CODES, Codec.INT32, Codec.GRAD_INT8, Codec.GRAD_INT4,
                                                       Codec.JSON]
    assert np.array_equal(p[0].array(), codes) and np.array_equal(p[1].array(), labels)
    assert np.abs(p[2].array() - grad).max() <= np.abs(grad).max() / 127 + 1e-6
    assert p[3].array().shape == grad.shape and p[4].json() == {"loss": 1.5}


def test_tensors_frame_every_flip_and_truncation_is_rejected():
    data = encode_frame(_train_frame()[0])
    for i in range(0, len(data), 7):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(ProtocolError):
            decode_frame(bytes(bad))
    for n in range(0, len(data), 11):
        with pytest.raises(ProtocolError):
            decode_frame(data[:n])


def test_tensors_frame_with_a_lying_part_is_rejected_even_with_a_good_crc():
    import struct
    import zlib

    frame = _train_frame()[0]
    payload = bytearray(frame.payload)
    payload[1] = 99  # part 0's codec byte: no such codec
    body = encode_frame(dataclasses.replace(frame, payload=bytes(payload)))[:-4]
    with pytest.raises(ProtocolError, match="unknown codec"):
        decode_frame(body + struct.pack("<I", zlib.crc32(body)))
    payload = bytearray(frame.payload)
    payload[0] = 2  # says 2 parts, carries 5
    body = encode_frame(dataclasses.replace(frame, payload=bytes(payload)))[:-4]
    with pytest.raises(ProtocolError, match="stray bytes"):
        decode_frame(body + struct.pack("<I", zlib.crc32(body)))


def test_train_request_carries_position_steps_only_when_there_are_any():
    from edgeqtl.wire import IGNORE_LABEL, array_part, codes_part, parse_train_request, tensors_frame, train_request_frame

    codes = np.zeros((1, 6, 8), np.uint8)
    labels = np.array([[IGNORE_LABEL] * 5 + [3]])
    plain = train_request_frame(codes_part(codes, 4), labels, np.array([[0, 1, 1, 1, 1, 1]]), 0, request_id=bytes(16),
                                fingerprint=FP, step=1)
    steps = np.array([[0, 1, 3, 2, 5, 1]])  # two image tokens kept at gaps of 3 and 2, then 4 dropped
    placed = train_request_frame(codes_part(codes, 4), labels, steps, 0, request_id=bytes(16), fingerprint=FP, step=1)
    assert len(plain.parts()) == 5 and len(placed.parts()) == 6
    assert np.array_equal(parse_train_request(decode_frame(encode_frame(placed))).attention_mask, steps)
    parts = placed.parts()
    for bad in (np.array([[1, 1, 3, 2, 5, 1]]), np.array([[0, 1, 3, 0, 5, 1]])):  # not where the mask is set
        lie = tensors_frame(FrameKind.TRAIN_REQUEST, [*parts[:4], array_part(bad.astype(np.int32)), parts[5]],
                            request_id=bytes(16), fingerprint=FP, step=1)
        with pytest.raises(ProtocolError, match="position steps"):
            parse_train_request(decode_frame(encode_frame(lie)))


def test_train_request_carries_sparse_labels_and_rejects_lies():
    from edgeqtl.wire import (IGNORE_LABEL, array_part, codes_part, json_part, parse_train_request, tensors_frame,
                              train_request_frame)

    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, size=(8, 40, 8)).astype(np.uint8)
    mask = (rng.random((8, 40)) < 0.8).astype(np.int64)
    labels = np.where(rng.random((8, 40)) < 0.05, rng.integers(0, 500, size=(8, 40)), IGNORE_LABEL)
    frame = train_request_frame(codes_part(codes, 4), labels, mask, 40, request_id=new_request_id(),
                                fingerprint=FP, step=41, device_id="pi-1")
    req = parse_train_request(decode_frame(encode_frame(frame)))
    assert np.array_equal(req.codes.array(), codes) and np.array_equal(req.labels, labels)
    assert np.array_equal(req.attention_mask, mask) and req.ckpt_step == 40
    dense = 8 * 40 * 8  # what int32 labels and mask would have cost
    assert len(frame.payload) - len(frame.parts()[0].payload) < dense // 4

    parts = frame.parts()
    ids = parts[3].array()
    for bad, match in [
        (parts[:4], "5 parts"),
        ([parts[0], parts[1], parts[2], array_part(ids[:-1].copy()) if len(ids) else array_part(np.ones(1, np.int32)),
          parts[4]], "answer ids"),
        ([parts[0], parts[1], codes_part(np.ones((8, 39), np.uint8), 2), parts[3], parts[4]], "do not fit"),
        ([parts[0], array_part(mask.astype(np.int32)), parts[2], parts[3], parts[4]], "1-bit CODES"),
        ([parts[0], parts[1], parts[2], parts[3], json_part({"ckpt_step": -1})], "ckpt_step"),
    ]:
        lie = tensors_frame(FrameKind.TRAIN_REQUEST, bad, request_id=new_request_id(), fingerprint=FP, step=41)
        with pytest.raises(ProtocolError, match=match):
            parse_train_request(decode_frame(encode_frame(lie)))
