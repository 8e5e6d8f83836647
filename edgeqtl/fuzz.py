"""Malformed frames at a running server, interleaved with valid questions: the server must
answer every valid one correctly, never crash or hang, and keep its memory bounded.

    mutants(valid_frames, rng)   an endless stream of (kind of defect, bytes)
    fuzz_server(...)             publishes them over MQTT as a device would, asks the valid
                                 questions between them, and counts what came back

The defects: flipped bits, truncations, random bytes, and, with a good CRC (so they pass
the first check and test the rest): lying lengths and counts, wrong kinds, codecs and
versions, huge dims, wrong fingerprints, TENSORS parts that lie, garbage options, chunk
headers that lie. Torch-free: the driver runs wherever a device would.
"""
from __future__ import annotations

import collections
import dataclasses
import struct
import time
import zlib
from typing import Callable, Iterator

import numpy as np

from .transport import BrokerConfig, MqttEndpoint, RequestClient, reply_topic, request_topic
from .wire import Frame, FrameKind, decode_frame, encode_frame, json_part, parse_infer_request, tensors_frame

_HEADER = 48  # the fixed part of a frame header (edgeqtl.wire)


def _seal(body: bytes | bytearray) -> bytes:
    """A body with a correct CRC32 after it: passes the first check, so the rest are tested."""
    body = bytes(body)
    return body + zlib.crc32(body).to_bytes(4, "little")


def _flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def _truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[:int(rng.integers(0, len(data)))]


def _random_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    return rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()


def _garbage_with_crc(data: bytes, rng: np.random.Generator) -> bytes:
    return _seal(b"EQTL" + rng.integers(0, 256, int(rng.integers(0, 2048)), dtype=np.uint8).tobytes())


def _set_byte(offset: int, values: Callable[[np.random.Generator], int]):
    def mutate(data: bytes, rng: np.random.Generator) -> bytes:
        b = bytearray(data[:-4])
        b[offset] = values(rng) & 0xFF
        return _seal(b)
    return mutate


def _lying_payload_length(data: bytes, rng: np.random.Generator) -> bytes:
    f = decode_frame(data)
    at = len(data) - 4 - len(f.payload) - 4
    b = bytearray(data[:-4])
    lie = int(rng.choice([0, 1, len(f.payload) - 1, len(f.payload) + 1, 2 ** 31, 2 ** 32 - 1]))
    b[at:at + 4] = struct.pack("<I", lie % 2 ** 32)
    return _seal(b)


def _huge_dims(data: bytes, rng: np.random.Generator) -> bytes:
    f = decode_frame(data)
    if not f.shape:
        return _lying_payload_length(data, rng)
    b = bytearray(data[:-4])
    i = int(rng.integers(0, len(f.shape)))
    b[_HEADER + 4 * i:_HEADER + 4 * i + 4] = struct.pack("<I", int(rng.choice([0, 2 ** 16, 2 ** 31, 2 ** 32 - 1])))
    return _seal(b)


def _wrong_fingerprint(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data[:-4])
    b[28:44] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    return _seal(b)


def _lying_parts(data: bytes, rng: np.random.Generator) -> bytes:
    """A TENSORS request whose parts lie (counts, codecs, sizes), with every CRC right."""
    f = decode_frame(data)
    body = parse_infer_request(f).codes
    opts = rng.choice([b'{"max_new_tokens": -1}', b'{"temperature": "hot"}', b"[1, 2]", b"\xff\xfe",
                       b'{"image": {"at": 0, "tokens": 99999, "digest": "' + b"0" * 64 + b'", "ref": true}}',
                       b'{"stop": [""]}', b'{"unknown": 1}', b'{"stream": 1000}'])
    parts = [body, dataclasses.replace(json_part({}), payload=bytes(opts))]
    frame = tensors_frame(FrameKind.INFER_REQUEST, parts, request_id=f.request_id, fingerprint=f.fingerprint)
    out = bytearray(encode_frame(frame)[:-4])
    if rng.random() < 0.5:  # and sometimes a part count or part length that lies
        pos = len(out) - len(frame.payload) + int(rng.integers(0, min(16, len(frame.payload))))
        out[pos] = int(rng.integers(0, 256))
    return _seal(out)


def _lying_chunk(data: bytes, rng: np.random.Generator) -> bytes:
    """A chunk header (edgeqtl.chunking) that announces the impossible, with its CRC right."""
    index, count = int(rng.integers(0, 70000)) % 65536, int(rng.choice([0, 1, 2, 65535]))
    total = int(rng.choice([0, 10, 2 ** 31, 2 ** 32 - 1]))
    head = b"EQTC" + struct.pack("<BBHHH16sII", 1, 0, index, count, 0, bytes(16), 0, total) + struct.pack("<I", 0)
    return _seal(head + data[:int(rng.integers(0, 256))])


DEFECTS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "bit flips": _flip_bits,
    "truncation": _truncate,
    "random bytes": _random_bytes,
    "garbage with a good CRC": _garbage_with_crc,
    "wrong version": _set_byte(4, lambda r: int(r.choice([0, 3, 200]))),
    "wrong kind": _set_byte(5, lambda r: int(r.integers(0, 256))),
    "wrong codec": _set_byte(6, lambda r: int(r.integers(0, 256))),
    "wrong ndim": _set_byte(7, lambda r: int(r.integers(5, 256))),
    "wrong levels": _set_byte(8, lambda r: int(r.integers(0, 256))),
    "reserved flags": _set_byte(10, lambda r: int(r.integers(1, 256))),
    "lying payload length": _lying_payload_length,
    "huge dims": _huge_dims,
    "wrong fingerprint": _wrong_fingerprint,
    "lying TENSORS parts and options": _lying_parts,
    "lying chunk": _lying_chunk,
}


def mutants(valid: list[bytes], rng: np.random.Generator) -> Iterator[tuple[str, bytes]]:
    """Endless (defect, bytes): each defect in turn, applied to a random valid frame."""
    names = list(DEFECTS)
    i = 0
    while True:
        name = names[i % len(names)]
        i += 1
        yield name, DEFECTS[name](valid[int(rng.integers(0, len(valid)))], rng)


@dataclasses.dataclass
class FuzzReport:
    malformed: int = 0
    by_defect: dict = dataclasses.field(default_factory=collections.Counter)
    replies_to_malformed: int = 0  # ERROR frames (and answers to mutants that happened to stay valid)
    valid_asked: int = 0
    valid_correct: int = 0
    valid_wrong: int = 0
    valid_failed: int = 0  # no answer, or an error, for a valid question
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)


def fuzz_server(cfg: BrokerConfig, valid: list[Frame], expected: list[dict], ask: Callable[[RequestClient, int], dict],
                count: int, every: int = 50, seed: int = 0, timeout: float = 20.0,
                alive: Callable[[], bool] = lambda: True) -> FuzzReport:
    """Publish `count` mutants of `valid` as device "fuzz" (as fast as the broker takes
    them), and after every `every` of them ask valid question k % len(expected) as device
    "fuzz-check" through `ask(transport, k)`, which returns the answer's JSON; it must
    equal expected[k]. `alive()` says whether the server is still up."""
    rng = np.random.default_rng(seed)
    data = [encode_frame(dataclasses.replace(f, device_id="fuzz")) for f in valid]
    report = FuzzReport()

    def on_reply(batch):
        report.replies_to_malformed += len(batch)

    t0 = time.perf_counter()
    with MqttEndpoint(cfg, "edgeqtl-fuzz", on_reply, [reply_topic("fuzz")]) as attacker, \
            RequestClient(cfg, "fuzz-check") as checker:
        gen = mutants(data, rng)
        for n in range(count):
            name, blob = next(gen)
            attacker.publish(request_topic("fuzz"), blob, reply_topic("fuzz"), bytes(16))
            report.malformed += 1
            report.by_defect[name] += 1
            if (n + 1) % every == 0 or n + 1 == count:
                k = report.valid_asked % len(expected)
                report.valid_asked += 1
                try:
                    got = ask(checker, k)
                except Exception as e:  # noqa: BLE001 - counted and named: the run goes on
                    report.valid_failed += 1
                    report.failures.append(f"question {k}: {type(e).__name__}: {e}")
                    if not alive():
                        report.failures.append("the server is no longer running")
                        break
                    continue
                if got == expected[k]:
                    report.valid_correct += 1
                else:
                    report.valid_wrong += 1
                    report.failures.append(f"question {k}: got {got}, expected {expected[k]}")
    report.seconds = time.perf_counter() - t0
    report.by_defect = dict(report.by_defect)
    return report


__all__ = ["DEFECTS", "mutants", "fuzz_server", "FuzzReport"]
