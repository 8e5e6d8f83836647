"""Wire and transport figures.

    python benchmarks/transport.py

1. pack + unpack throughput of integer codes (GB/s of codes, one byte per code in
   memory) for L = 2, 3, 4, 16;
2. median round trip of a 16 KiB payload through mosquitto on loopback, request to
   reply, with TCP_NODELAY and without it, side by side;
3. frame header overhead in bytes.
Needs mosquitto installed (apt-get install mosquitto).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import threading
import time

import numpy as np

from edgeqtl.codec import pack_codes, packed_nbytes, unpack_codes
from edgeqtl.wire import FrameKind, Codec, Frame, codes_frame, encode_frame, header_nbytes, new_request_id


def bench_codec(n_codes: int, repeats: int) -> list[tuple]:
    rows = []
    for levels in (2, 3, 4, 16):
        codes = np.random.default_rng(0).integers(0, levels, size=n_codes).astype(np.uint8)
        packed = pack_codes(codes, levels)
        t_pack, t_unpack = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            packed = pack_codes(codes, levels)
            t1 = time.perf_counter()
            out = unpack_codes(packed, levels, codes.shape)
            t2 = time.perf_counter()
            t_pack.append(t1 - t0)
            t_unpack.append(t2 - t1)
        assert np.array_equal(out, codes)
        p, u = statistics.median(t_pack), statistics.median(t_unpack)
        rows.append((levels, 8 * len(packed) / n_codes, n_codes / p / 1e9, n_codes / u / 1e9, n_codes / (p + u) / 1e9))
    return rows


def bench_round_trip(nodelay: bool, port: int, payload: int, n: int) -> float:
    from edgeqtl.transport import BrokerConfig, MqttEndpoint

    cfg = BrokerConfig(port=port, nodelay=nodelay)
    got = threading.Event()
    server = MqttEndpoint(cfg, f"echo-{nodelay}", None, ["bench/req"])
    server.handler = lambda batch: [server.publish("bench/reply", m.payload) for m in batch]
    client = MqttEndpoint(cfg, f"client-{nodelay}", lambda batch: got.set(), ["bench/reply"])
    data = b"\x5a" * payload
    times = []
    with server, client:
        time.sleep(0.2)
        for i in range(n + 10):
            got.clear()
            t0 = time.perf_counter()
            client.publish("bench/req", data)
            if not got.wait(5):
                raise RuntimeError("no echo within 5 s")
            if i >= 10:  # warm-up
                times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=16 * 1024 * 1024, help="codes per pack/unpack call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--round-trips", type=int, default=200)
    ap.add_argument("--payload", type=int, default=16 * 1024)
    args = ap.parse_args(argv)

    print(f"pack + unpack, {args.codes / 2 ** 20:.0f} Mi codes per call, median of {args.repeats}")
    print(f"{'levels':>6}{'bits/code':>10}{'pack GB/s':>11}{'unpack GB/s':>13}{'both GB/s':>11}")
    for lv, bits, p, u, both in bench_codec(args.codes, args.repeats):
        print(f"{lv:>6}{bits:>10.2f}{p:>11.2f}{u:>13.2f}{both:>11.2f}")

    from edgeqtl.broker import MosquittoBroker

    with MosquittoBroker() as broker:
        on = bench_round_trip(True, broker.port, args.payload, args.round_trips)
        off = bench_round_trip(False, broker.port, args.payload, args.round_trips)
    print(f"\nround trip of {args.payload / 1024:.0f} KiB through mosquitto on loopback, QoS 1, median of "
          f"{args.round_trips}")
    print(f"  TCP_NODELAY on : {on:7.2f} ms")
    print(f"  TCP_NODELAY off: {off:7.2f} ms  ({off / on:.1f}x slower)")

    f = codes_frame(FrameKind.INFER_REQUEST, np.zeros((1, 20, 128), np.uint8), 4, request_id=new_request_id(),
                    fingerprint=bytes(16), device_id="pi-0001", reply_topic="edgeqtl/v1/reply/pi-0001")
    bare = Frame(FrameKind.ANSWER, bytes(16), bytes(16), Codec.JSON, b"{}")
    mqtt5 = dataclasses.replace(f, reply_topic="")  # MQTT 5 carries the reply topic as a property
    print(f"\nheader overhead: {header_nbytes(mqtt5)} B for a 3-d codes request from device 'pi-0001' over MQTT 5, "
          f"{header_nbytes(f)} B over MQTT 3.1.1 (the reply topic in the header), {header_nbytes(bare)} B minimum;")
    print(f"  a 20-token 2-bit request of 128 dims: payload {packed_nbytes(20 * 128, 4)} B, frame "
          f"{len(encode_frame(f))} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
