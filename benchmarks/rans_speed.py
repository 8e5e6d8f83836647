"""Speed and size of edgeqtl.rans against constriction's AnsCoder.

    OMP_NUM_THREADS=1 python benchmarks/rans_speed.py [--repeats 7] [--sweep]

Three frames of 4-level codes, drawn from a skewed model like a trained quantizer's
(per-dimension probabilities from a Dirichlet, ~1.6 bits of entropy per code; counts
as an export would write them, add-one smoothed): a real-size frame (729 x 1024), a
one-token frame (1 x 1024) and a tiny-model frame (20 x 128). Per frame and coder:
median encode and decode time, codes per second through both, payload bytes, bits per
code, and the overhead over the ideal size sum(-log2 p) under the model's own
probabilities. constriction (`stack.AnsCoder`, `Categorical(perfect=False)`, called as
edgeqtl.codec's entropy coder calls it) is measured when it is installed, with the
ratio ours / its. --sweep adds the lane-count trade-off on the real-size frame (what
the lane rule in edgeqtl/rans.py was picked from).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgeqtl.codec import rans

FRAMES = [("729 x 1024", 729, 1024), ("1 x 1024", 1, 1024), ("20 x 128", 20, 128)]
LEVELS = 4
ALPHA = 1.2            # Dirichlet concentration: ~1.6 bits of entropy per code at 4 levels
EXPORT_SAMPLES = 186_624  # codes per dimension an export counts (256 questions x 729 tokens)


def model(code_dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(counts, probabilities): counts as an export writes them, probabilities they imply."""
    p_true = rng.dirichlet(np.full(LEVELS, ALPHA), size=code_dim)
    counts = 1 + np.round(p_true * EXPORT_SAMPLES).astype(np.int64)
    return counts, counts / counts.sum(1, keepdims=True)


def draw(p: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    cdf = np.cumsum(p, axis=1)
    return (rng.random((rows, p.shape[0]))[:, :, None] > cdf[None, :, :-1]).sum(2).astype(np.uint8)


def median_ms(fn, repeats: int):
    """(median wall ms, median CPU ms of this thread, last result): on a shared machine the
    CPU time is closer to what the call costs on a core of its own."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu), out


def ours(codes, counts, repeats, lanes=None):
    table = rans.RansTable(counts)
    enc, enc_cpu, data = median_ms(lambda: rans.encode(codes, table, lanes=lanes), repeats)
    dec, dec_cpu, out = median_ms(lambda: rans.decode(data, codes.shape, table), repeats)
    assert np.array_equal(out, codes)
    return enc, dec, enc_cpu + dec_cpu, len(data)


def constriction_coder(codes, p, repeats):
    import constriction

    stream = constriction.stream
    flat = codes.reshape(-1).astype(np.int32)

    def encode():
        coder = stream.stack.AnsCoder()
        coder.encode_reverse(flat, stream.model.Categorical(perfect=False), np.tile(p, (codes.shape[0], 1)))
        return coder.get_compressed().astype("<u4").tobytes()

    def decode():
        coder = stream.stack.AnsCoder(np.frombuffer(data, dtype="<u4").astype(np.uint32))
        return coder.decode(stream.model.Categorical(perfect=False), np.tile(p, (codes.shape[0], 1)))

    enc, enc_cpu, data = median_ms(encode, repeats)
    dec, dec_cpu, out = median_ms(decode, repeats)
    assert np.array_equal(out, flat)
    return enc, dec, enc_cpu + dec_cpu, len(data)


def row(frame, coder, n, ideal_bytes, enc, dec, cpu, nbytes):
    mbs = n / ((enc + dec) / 1e3) / 1e6
    return (f"{frame:<11} {coder:<13} {enc:8.2f} {dec:8.2f} {cpu:8.2f} {mbs:7.2f} {nbytes:8d} {8 * nbytes / n:9.3f} "
            f"{100 * (nbytes / ideal_bytes - 1):+8.2f}%")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sweep", action="store_true", help="also the lane-count trade-off on the real-size frame")
    args = ap.parse_args()
    try:
        import constriction  # noqa: F401
        have_constriction = True
    except ImportError:
        have_constriction = False

    print(f"{LEVELS} levels, median of {args.repeats} runs. enc/dec ms: wall clock; cpu ms: this thread's CPU time "
          f"for both;\nMB/s: million codes per second through encode + decode (wall); overhead: over sum(-log2 p) "
          f"under the model")
    print(f"{'frame':<11} {'coder':<13} {'enc ms':>8} {'dec ms':>8} {'cpu ms':>8} {'MB/s':>7} {'bytes':>8} "
          f"{'bits/code':>9} {'overhead':>9}")
    rng = np.random.default_rng(0)
    ratios = []
    real = None
    for name, rows, code_dim in FRAMES:
        counts, p = model(code_dim, rng)
        codes = draw(p, rows, rng)
        if real is None:
            real = (codes, counts, p)
        n = codes.size
        ideal = -np.log2(p[np.arange(code_dim), codes]).sum() / 8
        label = f"rans K={rans.lane_count(n)}"
        mine = ours(codes, counts, args.repeats)
        print(row(name, label, n, ideal, *mine))
        if have_constriction:
            theirs = constriction_coder(codes, p, args.repeats)
            print(row(name, "constriction", n, ideal, *theirs))
            ratios.append((name, *(m / t for m, t in zip(mine, theirs))))
    if ratios:
        print("\nours / constriction:  frame       encode  decode     cpu   bytes")
        for name, e, d, c, b in ratios:
            print(f"                      {name:<11} {e:6.2f}  {d:6.2f}  {c:6.2f}  {b:6.4f}")
    else:
        print("\n(constriction is not installed: no comparison)")

    if args.sweep:
        codes, counts, p = real
        n = codes.size
        ideal = -np.log2(p[np.arange(codes.shape[1]), codes]).sum() / 8
        print(f"\nlane sweep, {FRAMES[0][0]} frame:  lanes  steps   enc ms   dec ms   cpu ms   bytes  overhead")
        for lanes in (183, 256, 365, 512, 729, 1024, 1458, 2048, 4096):
            enc, dec, cpu, nbytes = ours(codes, counts, max(3, args.repeats // 2), lanes)
            print(f"{'':33}{lanes:6d} {-(-n // lanes):6d} {enc:8.2f} {dec:8.2f} {cpu:8.2f} {nbytes:7d} "
                  f"{100 * (nbytes / ideal - 1):+8.2f}%")


if __name__ == "__main__":
    main()
