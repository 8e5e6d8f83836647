"""Interleaved rANS entropy coding of integer codes, in numpy alone (torch-free).

Both halves of the split model use this coder for the codes a frame carries: the
device (a Raspberry Pi has no wheel of the `constriction` package) and the server.
A `RansTable` is built once per entropy model from its counts (code_dim x levels):
one static categorical distribution per code dimension. `encode` and `decode` are
the whole interface; decoding a payload that is not a valid encoding raises
`RansError` (a ValueError) with a one-line message, never anything else.

Frequencies
-----------
Each dimension's counts become integer frequencies summing to 2**PRECISION
(PRECISION = 14), every one >= 1: proportional shares rounded down, the slots left
over going to the largest remainders (ties to the lower symbol); a symbol whose
share rounds to 0 is pinned at 1 and the others are shared out again. int64
arithmetic only, so an ARM device and an x86 server get the same table.
start[d][s] is the sum of freq[d][:s]. 14 bits: with 32-bit states and 16-bit words
the coding loss was < 0.01% at 12-14 bits, 0.05% at 15 and 0.18% at 16, and even at
256 levels the symbols pinned at 1 take at most 256 / 2**14 = 1.6% of the mass. The
decoder finds a slot's symbol by counting the starts <= slot, not in a 2**14-entry
table per dimension (16 MB for 1024 dims, and slow: its lookups miss the cache).

Coding
------
n codes c[0..n) in row-major order; code k belongs to dimension d = k % code_dim.
K lanes, each a rANS coder with a 32-bit state x in [2**16, 2**32) that moves one
16-bit word at a time. Lane j codes codes j, j+K, j+2K, ...; a step codes one code of
every lane, so numpy runs the K lanes as whole-array operations.

  raw tail  m = the most base-`levels` digits that fit in 16 bits (levels**m <= 2**16:
            16 for L=2, 10 for 3, 8 for 4, 4 for 16, 2 for 256). The last min(n, m*K)
            codes, the tail, are not rANS-coded: tail code i (code h + i, where h is
            the count of codes before the tail) is digit i // K of lane (h + i) % K,
            and a lane starts from x = 2**16 + sum(digit * levels**position). The
            16 bits a fixed start state would waste carry codes instead.
  decoding  steps t = 0, 1, ...; in each, lanes j = 0..K-1 with k = t*K + j < h:
              slot = x mod 2**14
              s = the symbol with start[d][s] <= slot < start[d][s] + freq[d][s]
              x = freq[d][s] * (x >> 14) + slot - start[d][s]
              if x < 2**16: x = (x << 16) | the next word
            Then every word must have been read, and each lane's x - 2**16 must be a
            number of as many base-levels digits as the lane holds: its tail codes.
  encoding  the same backwards: codes k = h-1 down to 0, s = c[k], f = freq[d][s],
            into lane k % K:
              if x >= f << 18: emit x mod 2**16, x >>= 16
              x = ((x // f) << 14) + x mod f + start[d][s]
            Words are sent grouped by step, steps in increasing order, each group in
            lane order: the order in which the decoder asks for them.

Payload (little-endian throughout)
----------------------------------
  offset   bytes  field
  0        2      u16 K, the lane count: 0 when n = 0, else max(1, ceil(n / 4096)) <= K
                  <= min(n, 65535) (any such K decodes; the encoder's rule is below)
  2        4      u32 CRC-32 (zlib / IEEE 802.3) of the n codes as one byte each
  6        4K     u32 per lane, its state after encoding (where decoding starts)
  6 + 4K   2W     u16 words, W = (length - 6 - 4K) / 2
With n = 0 the payload is the 6-byte header alone (K = 0, CRC 0). A decoder rejects a
lane count out of range, a length that does not fit it, a lane state below 2**16,
words that run out or are left over, final states that are not digits, and a CRC that
does not match (this catches the rare corruption the others miss, and codes decoded
with another table).

Lane rule
---------
K = n // 1024 (at least 1 and ceil(n / 4096), at most min(n, 65535)): every lane codes
about 1024 codes, so any frame above 1024 codes takes about 1024 steps. A lane costs ~1.5
bytes over the ideal size at 4 levels (its 32-bit final state holds ~24 bits of
information, and the raw tail wins back ~13 of the 16 a fixed start state would waste),
i.e. 1.5 * 8 / (1024 * H) of the payload: 0.7% at H = 1.6 bits per code, which leaves
a margin under 1% for a trained 2-bit model (1.63 bits). Time goes with the step count
(some 25 numpy calls a step, encoder and decoder together): fewer codes per lane buy
speed with bytes. Measured on the 729 x 1024 frame at 1.63 bits per code
(benchmarks/rans_speed.py --sweep, a 2-core x86 VM that another job kept busy, hence
the ranges over runs), size over the ideal and encode + decode time:
  K = 256   +0.27%  115-160 ms     K = 1024  +0.98%  45-60 ms
  K = 512   +0.51%   70-100 ms     K = 1458  +1.38%  32-50 ms
  K = 729   +0.71%   55-105 ms     K = 4096  +3.88%  21-31 ms
(constriction's AnsCoder on the same frame: 52-58 ms, +0.00%.)
The ceiling of 4096 codes a lane bounds the steps, and so the time, a hostile payload
can ask of a decoder.

With fewer than VECTOR_LANES (32) lanes, i.e. frames under ~32k codes, the same
recurrence runs in plain Python, one code at a time: numpy calls on a handful of lanes
cost far more than the arithmetic (1 x 1024 codes: ~2 ms round trip in Python, ~40 ms
through numpy on 1 lane). Both produce the same bytes.
"""
from __future__ import annotations

import bisect
import functools
import math
import operator
import struct
import zlib

import numpy as np

from .errors import CodecError

PRECISION = 14                  # frequencies of one dimension sum to 2**PRECISION
TOTAL = 1 << PRECISION
SLOT_MASK = TOTAL - 1
STATE_LOW = 1 << 16             # lane states live in [STATE_LOW, 2**32)
WORD_BITS = 16                  # renormalisation moves one 16-bit word at a time
EMIT_SHIFT = 32 - PRECISION     # emit a word when x >= freq << EMIT_SHIFT
RAW_BITS = 16                   # raw digits carried by each lane's start state
MAX_LANES = 0xFFFF              # the lane count is a u16
MAX_STEPS = 4096                # no lane codes more than this many codes: bounds decode time
MAX_CODES = MAX_LANES * MAX_STEPS  # codes in one payload
CODES_PER_LANE = 1024           # the lane rule
VECTOR_LANES = 32               # from this many lanes up, numpy; below, plain Python

_HEADER = struct.Struct("<HI")  # lane count, CRC-32 of the codes


class RansError(CodecError):
    """Codes that do not fit the table, or a payload that is not a valid encoding."""


def quantise_counts(counts: np.ndarray) -> np.ndarray:
    """Counts (code_dim, levels), each in [1, 2**40] -> int64 frequencies, each >= 1,
    summing to TOTAL per row (the rule in the module docstring)."""
    c = np.asarray(counts, dtype=np.int64)
    levels = c.shape[1]
    pinned = np.zeros(c.shape, dtype=bool)
    while True:
        free = np.where(pinned, 0, c)
        budget = TOTAL - pinned.sum(1)
        share, rest = np.divmod(free * budget[:, None], free.sum(1)[:, None])  # < 2**54: no overflow
        short = budget - share.sum(1)                     # slots the rounding down left over
        rest[pinned] = -1                                 # pinned symbols get none of them
        order = np.argsort(-rest, axis=1, kind="stable")  # largest remainder first, ties by symbol
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(levels), c.shape), axis=1)
        freq = np.where(pinned, 1, share + (rank < short[:, None]))
        if (freq > 0).all():
            return freq
        pinned |= freq == 0


def raw_digits(levels: int) -> int:
    """How many codes of `levels` levels fit in RAW_BITS bits as base-`levels` digits."""
    m = 0
    while levels ** (m + 1) <= 1 << RAW_BITS:
        m += 1
    return m


def lane_count(n_codes: int) -> int:
    """The lane count the encoder picks for a frame of `n_codes` codes."""
    if n_codes <= 0:
        return 0
    return min(max(n_codes // CODES_PER_LANE, _min_lanes(n_codes)), n_codes, MAX_LANES)


def _min_lanes(n_codes: int) -> int:
    return max(1, -(-n_codes // MAX_STEPS))


class RansTable:
    """Quantised frequencies of one entropy model and the coder's lookup tables."""

    def __init__(self, counts: np.ndarray):
        c = np.asarray(counts)
        if c.ndim != 2 or c.shape[0] < 1 or not 2 <= c.shape[1] <= 256 or not np.issubdtype(c.dtype, np.integer) \
                or (c < 1).any() or (c > 2 ** 40).any():
            raise RansError("a rANS table needs a (code_dim, levels) table of integer counts in [1, 2**40], "
                            "with 2 <= levels <= 256")
        self.freq = quantise_counts(c)                          # (code_dim, levels) int64
        self.start = np.cumsum(self.freq, axis=1) - self.freq
        self.code_dim, self.levels = self.freq.shape
        self.raw_digits = raw_digits(self.levels)
        self._digit_weight = self.levels ** np.arange(self.raw_digits, dtype=np.int64)

        # Encoder, gathered once per frame: index dim * levels + symbol.
        f = self.freq.reshape(-1)
        self._dim_offset = np.arange(self.code_dim, dtype=np.intp) * self.levels
        self._enc_freq = f.astype(np.uint32)
        self._enc_start = self.start.reshape(-1).astype(np.uint32)
        self._cost = PRECISION - np.log2(self.freq)                  # bits per code, for ideal_bits
        for a in (self.freq, self.start, self._digit_weight, self._dim_offset, self._enc_freq, self._enc_start,
                  self._cost):
            a.setflags(write=False)

    @functools.cached_property
    def _rows(self) -> tuple[list[list[int]], list[list[int]]]:
        """freq and start as Python lists, for the plain-Python coder."""
        return self.freq.tolist(), self.start.tolist()

    def _lane_tables(self, lanes: int):
        """Decoder tables tiled along the dims, so that the lanes of a step read one
        contiguous slice: lane j of step t has dim (o + j) % code_dim, o = t*K % code_dim,
        which is column o + j of the tiled tables."""
        tiles = -(-(self.code_dim + lanes) // self.code_dim)
        bounds = np.tile(self.start[:, 1:].T, (1, tiles)).astype(np.int16)  # (levels-1, cols): start of s >= 1
        freq = np.tile(self.freq, (tiles, 1)).reshape(-1)                     # index col * levels + symbol
        start = np.tile(self.start, (tiles, 1)).reshape(-1)
        col_offset = np.arange(tiles * self.code_dim, dtype=np.intp) * self.levels
        return bounds, freq, start, col_offset

    def ideal_bits(self, codes: np.ndarray) -> float:
        """sum(-log2 p) of `codes` under the quantised frequencies: what an ideal coder spends."""
        flat = _check_codes(codes, self).reshape(-1, self.code_dim)
        return float(self._cost[np.arange(self.code_dim), flat].sum())


def _check_codes(codes, table: RansTable) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim == 0 or codes.shape[-1] != table.code_dim:
        raise RansError(f"codes of shape {list(codes.shape)} do not fit a table of {table.code_dim} dims")
    if not np.issubdtype(codes.dtype, np.integer):
        raise RansError(f"codes must be integers, got {codes.dtype}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= table.levels):
        raise RansError(f"codes out of range for {table.levels} levels")
    return np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)


def _check_shape(shape, table: RansTable) -> tuple[int, ...]:
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise RansError(f"shape {shape!r} is not a tuple of integers") from None
    if not shape or shape[-1] != table.code_dim or min(shape) < 0:
        raise RansError(f"shape {list(shape)} does not fit a table of {table.code_dim} dims")
    if math.prod(s for s in shape if s) > MAX_CODES:  # (also keeps np.zeros of a 0-size shape possible)
        raise RansError(f"shape {list(shape)} holds more codes than a payload can ({MAX_CODES})")
    return shape


# --------------------------------------------------------------------------- raw tail
#
# The (digit, lane) grid of the tail: column b is lane (head + b) % K, and holds
# ceil((tail_len - b) / K) digits, at least 1 (tail_len >= K since n >= K).

def _pack_tail(tail: np.ndarray, head: int, lanes: int, table: RansTable) -> np.ndarray:
    rows = -(-tail.size // lanes)
    grid = np.zeros(rows * lanes, dtype=np.int64)
    grid[:tail.size] = tail
    value = (grid.reshape(rows, lanes) * table._digit_weight[:rows, None]).sum(0)
    return (np.roll(value, head % lanes) + STATE_LOW).astype(np.uint32)


def _unpack_tail(states: np.ndarray, tail_len: int, head: int, lanes: int, table: RansTable) -> np.ndarray:
    rows = -(-tail_len // lanes)
    digits_held = (tail_len - np.arange(lanes) + lanes - 1) // lanes
    value = np.roll(states.astype(np.int64) - STATE_LOW, -(head % lanes))
    if (value >= table._digit_weight[digits_held - 1] * table.levels).any():
        raise RansError("a lane's final state is not its raw codes: corrupt payload")
    digits = value // table._digit_weight[:rows, None] % table.levels
    return digits.reshape(-1)[:tail_len].astype(np.uint8)


# --------------------------------------------------------------------------- plain Python, few lanes

def _encode_python(codes: list[int], x: list[int], table: RansTable) -> list[int]:
    freq, start = table._rows
    lanes, dims = len(x), table.code_dim
    out = []
    for k in range(len(codes) - 1, -1, -1):       # backwards, so lanes in reverse within a step
        d, s, j = k % dims, codes[k], k % lanes
        f, state = freq[d][s], x[j]
        if state >> EMIT_SHIFT >= f:
            out.append(state & 0xFFFF)
            state >>= WORD_BITS
        q, r = divmod(state, f)
        x[j] = (q << PRECISION) + r + start[d][s]
    out.reverse()                                  # steps ascending, lanes ascending
    return out


def _decode_python(head: int, x: list[int], table: RansTable, words: list[int]) -> tuple[bytes, int]:
    freq, start = table._rows
    lanes, dims = len(x), table.code_dim
    out = bytearray(head)
    pos = 0
    for k in range(head):
        d, j = k % dims, k % lanes
        state = x[j]
        slot = state & SLOT_MASK
        row = start[d]
        s = bisect.bisect_right(row, slot) - 1
        state = freq[d][s] * (state >> PRECISION) + slot - row[s]
        if state < STATE_LOW:
            if pos == len(words):
                raise RansError("payload truncated: the words ran out before the last code")
            state = (state << WORD_BITS) | words[pos]
            pos += 1
        x[j] = state
        out[k] = s
    return bytes(out), pos


# --------------------------------------------------------------------------- numpy, many lanes

def _encode_steps(x, freq, start, limit, grow, sent, emitted):
    """Encode steps len(freq)-1 .. 0 into the lane states x, in place. sent[t] gets each
    lane's state before step t, emitted[t] 1 where its low 16 bits went out as a word."""
    quotient = np.empty_like(x)
    shift = np.empty(x.shape, dtype=np.uint8)
    for t in range(len(freq) - 1, -1, -1):
        emit = emitted[t]
        np.greater(x, limit[t], out=emit)
        sent[t] = x
        np.left_shift(emit, 4, out=shift)          # 16 where a word goes out, else 0
        np.right_shift(x, shift, out=x)
        np.floor_divide(x, freq[t], out=quotient)
        quotient *= grow[t]
        x += quotient
        x += start[t]


def _encode_numpy(flat: np.ndarray, head: int, x: np.ndarray, table: RansTable) -> np.ndarray:
    """Codes flat[:head] -> words; x (uint32 lane states) goes from start to final states."""
    lanes = len(x)
    index = (flat.reshape(-1, table.code_dim) + table._dim_offset).reshape(-1)[:head]  # dim * levels + code
    freq, start = table._enc_freq.take(index), table._enc_start.take(index)
    limit = freq << np.uint32(EMIT_SHIFT)                    # emit a word when x > limit
    limit -= np.uint32(1)
    grow = np.uint32(TOTAL) - freq                           # x // f * TOTAL + x % f = x + x // f * grow
    columns = (freq, start, limit, grow)
    full, part = divmod(head, lanes)
    sent = np.zeros((full + (part > 0), lanes), dtype=np.uint32)
    emitted = np.zeros(sent.shape, dtype=np.uint8)
    if part:  # the last step has lanes [0, part) only, and encoding starts there
        _encode_steps(x[:part], *[c[full * lanes:].reshape(1, part) for c in columns],
                      sent[full:, :part], emitted[full:, :part])
    _encode_steps(x, *[c[:full * lanes].reshape(full, lanes) for c in columns], sent[:full], emitted[:full])
    return (sent[emitted.view(bool)] & 0xFFFF).astype("<u2")  # row-major: the order the decoder reads


def _decode_steps(x, steps, stride, tables, code_dim, symbols, words, pos):
    """Decode `steps` (an iterable of step numbers) into the lane states x, in place, for
    lanes [0, len(x)) of `stride` lanes; symbols[i] gets the codes of the i-th step.
    Returns the position in `words` after the words read."""
    bounds, freq, start, col_offset = tables
    lanes = len(x)
    slot = np.empty(lanes, dtype=np.int16)
    above = np.empty((bounds.shape[0], lanes), dtype=bool)
    index = np.empty(lanes, dtype=np.intp)
    for i, t in enumerate(steps):
        o = t * stride % code_dim
        np.bitwise_and(x, SLOT_MASK, out=slot)
        np.less_equal(bounds[:, o:o + lanes], slot, out=above)
        s = symbols[i]
        np.add.reduce(above, axis=0, dtype=np.uint8, out=s)    # s = how many of starts[1:] are <= slot
        np.add(s, col_offset[o:o + lanes], out=index)
        x >>= PRECISION
        x *= freq[index]
        x += slot
        x -= start[index]
        need, = np.nonzero(x < STATE_LOW)          # lanes that read a word: H/16 of them
        k = len(need)
        if k:
            if pos + k > len(words):
                raise RansError("payload truncated: the words ran out before the last code")
            x[need] = (x[need] << WORD_BITS) | words[pos:pos + k]
            pos += k
    return pos


def _decode_numpy(head: int, x: np.ndarray, table: RansTable, words: np.ndarray) -> tuple[np.ndarray, int]:
    """Head codes from the words; x (int64 lane states) goes from final to start states."""
    lanes = len(x)
    tables = table._lane_tables(lanes)
    full, part = divmod(head, lanes)
    symbols = np.empty((full + (part > 0), lanes), dtype=np.uint8)
    pos = _decode_steps(x, range(full), lanes, tables, table.code_dim, symbols, words, 0)
    if part:
        pos = _decode_steps(x[:part], [full], lanes, tables, table.code_dim, symbols[full:, :part], words, pos)
    return symbols.reshape(-1)[:head], pos


# --------------------------------------------------------------------------- the interface

def encode(codes: np.ndarray, table: RansTable, *, lanes: int | None = None) -> bytes:
    """Codes (..., code_dim) in [0, levels) -> payload. `lanes` overrides the lane rule."""
    flat = _check_codes(codes, table)
    n = flat.size
    if n > MAX_CODES:
        raise RansError(f"{n} codes are more than a payload can hold ({MAX_CODES})")
    if lanes is None:
        lanes = lane_count(n)
    elif not (n == 0 == lanes or _min_lanes(n) <= lanes <= min(n, MAX_LANES)):
        raise RansError(f"{lanes} lanes cannot code {n} codes")
    crc = zlib.crc32(flat)
    if n == 0:
        return _HEADER.pack(0, crc)
    tail_len = min(n, table.raw_digits * lanes)
    head = n - tail_len
    x = _pack_tail(flat[head:], head, lanes, table)

    if lanes < VECTOR_LANES:
        states = x.tolist()
        words = np.array(_encode_python(flat[:head].tolist(), states, table), dtype="<u2")
        x = np.array(states, dtype=np.uint32)
    else:
        words = _encode_numpy(flat, head, x, table)
    return _HEADER.pack(lanes, crc) + x.astype("<u4").tobytes() + words.tobytes()


def decode(data: bytes | bytearray | memoryview, shape: tuple[int, ...], table: RansTable) -> np.ndarray:
    """Payload -> uint8 codes of `shape`; RansError for anything but a valid encoding."""
    shape = _check_shape(shape, table)
    try:
        buf = memoryview(data).cast("B")
    except (TypeError, ValueError):
        raise RansError("a payload is a contiguous bytes-like object") from None
    n = math.prod(shape)
    if len(buf) < _HEADER.size:
        raise RansError(f"payload of {len(buf)} bytes is shorter than its {_HEADER.size}-byte header")
    lanes, crc = _HEADER.unpack_from(buf)
    if n == 0:
        if lanes or len(buf) != _HEADER.size or crc != zlib.crc32(b""):
            raise RansError("a payload for zero codes is the bare header")
        return np.zeros(shape, dtype=np.uint8)
    if not _min_lanes(n) <= lanes <= n:
        raise RansError(f"lane count {lanes} is not valid for {n} codes")
    body = len(buf) - _HEADER.size - 4 * lanes
    if body < 0 or body % 2:
        raise RansError(f"payload of {len(buf)} bytes is not a header, {lanes} lane states and 16-bit words")
    x = np.frombuffer(buf, dtype="<u4", count=lanes, offset=_HEADER.size)
    if (x < STATE_LOW).any():
        raise RansError("a lane state is below 2**16: corrupt payload")
    words = np.frombuffer(buf, dtype="<u2", offset=_HEADER.size + 4 * lanes)
    tail_len = min(n, table.raw_digits * lanes)
    head = n - tail_len

    out = np.empty(n, dtype=np.uint8)
    if lanes < VECTOR_LANES:
        states = x.tolist()
        decoded, pos = _decode_python(head, states, table, words.tolist())
        out[:head] = np.frombuffer(decoded, dtype=np.uint8)
        x = np.array(states, dtype=np.int64)
    else:
        x = x.astype(np.int64)
        out[:head], pos = _decode_numpy(head, x, table, words.astype(np.int64))
    if pos != len(words):
        raise RansError(f"{len(words) - pos} words left over after the last code: corrupt payload")
    out[head:] = _unpack_tail(x, tail_len, head, lanes, table)
    if zlib.crc32(out) != crc:
        raise RansError("decoded codes fail the payload's CRC-32: corrupt payload, or another table")
    return out.reshape(shape)
