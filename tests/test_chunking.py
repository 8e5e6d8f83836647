"""Chunked frames: split, reassembled and checked; missing, duplicated and corrupt
chunks; bounded memory per sender."""
from __future__ import annotations

import os

import pytest

from edgeqtl.chunking import OVERHEAD, ChunkError, Reassembler, is_chunk, parse_chunk, split_frame

RID = bytes(range(16))


def _frame(n=10_000, seed=0):
    return os.urandom(n) if seed is None else bytes((i * 31 + seed) % 251 for i in range(n))


def test_split_and_reassemble_in_any_order_with_duplicates():
    data = _frame()
    chunks = split_frame(data, RID, 7, 1024)
    assert len(chunks) >= 10 and all(len(c) <= 1024 and is_chunk(c) for c in chunks)
    r = Reassembler()
    order = list(reversed(chunks)) + [chunks[3]]
    out = [r.add("t/dev", c) for c in order[:-2]]
    assert out == [None] * (len(order) - 2)
    assert r.add("t/dev", order[-2]) == data  # the last missing chunk completes it
    assert r.add("t/dev", order[-1]) is None  # a late duplicate: nothing (its partial expires unused)
    assert parse_chunk(chunks[0]).step == 7


def test_a_missing_chunk_times_out_and_frees_its_memory():
    now = [0.0]
    r = Reassembler(timeout=5, clock=lambda: now[0])
    chunks = split_frame(_frame(), RID, 0, 2048)
    for c in chunks[:-1]:
        assert r.add("t/a", c) is None
    assert r.pending_frames == 1
    now[0] = 10.0
    r.add("t/b", split_frame(_frame(5000, 3), bytes(16), 0, 2048)[0])  # any traffic expires the old one
    assert r.pending_frames == 1 and r.dropped >= 1  # only t/b's partial is left


def test_corrupt_and_foreign_chunks_are_refused_and_the_frame_still_completes():
    data = _frame()
    chunks = split_frame(data, RID, 1, 2048)
    r = Reassembler()
    bad = bytearray(chunks[0])
    bad[50] ^= 0x10
    with pytest.raises(ChunkError, match="CRC32"):
        r.add("t", bytes(bad))
    other = split_frame(_frame(12_000, 9), RID, 1, 2048)[1]  # same ids, another frame's length
    r.add("t", chunks[1])
    with pytest.raises(ChunkError, match="does not fit"):
        r.add("t", other)
    for c in chunks[2:]:
        r.add("t", c)
    assert r.add("t", chunks[0]) == data


def test_memory_per_sender_and_frame_size_are_bounded():
    r = Reassembler(max_pending_bytes=5000, max_frame=50_000)
    chunks = split_frame(_frame(20_000), RID, 0, 2048)
    with pytest.raises(ChunkError, match="pending"):
        for c in chunks:
            r.add("t/greedy", c)
    assert r.add("t/other", split_frame(_frame(3000), bytes(16), 0, 2048)[0]) is None  # others unaffected
    with pytest.raises(ChunkError, match="exceeds"):
        r.add("t/x", split_frame(_frame(60_000), RID, 2, 8192)[0])


def test_truncated_and_malformed_chunks():
    c = split_frame(_frame(), RID, 0, 2048)[0]
    for bad in (c[:10], c[:-1], b"EQTC" + bytes(60)):
        with pytest.raises(ChunkError):
            parse_chunk(bad)
    with pytest.raises(ChunkError, match="no room"):
        split_frame(_frame(), RID, 0, OVERHEAD)
