"""Load with faults (edgeqtl/loadtest.py): 32 devices for 60 s against 2 server agents on
one shared subscription over mosquitto; server 0 is SIGKILLed at 15 s and started again,
and the broker restarts at 40 s. Prints sent, answered, lost, wrong, late duplicates,
answers/s, p50/p99 latency.

    python benchmarks/load.py                      # ~2 min on 2 cores
    python benchmarks/load.py --devices 8 --seconds 15 --kill-at 4 --broker-restart-at 9
    for n in 1 2 3 4; do python benchmarks/load.py --servers $n --no-faults --seconds 20; done   # answers/s
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--kill-at", type=float, default=15)
    ap.add_argument("--broker-restart-at", type=float, default=40)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--no-faults", action="store_true", help="Throughput alone: no kill, no broker restart.")
    args = ap.parse_args()

    from edgeqtl.broker import MosquittoBroker
    from edgeqtl.loadtest import Fault, LoadTest, server_process_starter, tiny_setup

    work = Path(tempfile.mkdtemp(prefix="edgeqtl-load-"))
    server_half, frames, expected = tiny_setup(work)
    with MosquittoBroker() as broker:
        start = server_process_starter(server_half, broker.port, work)
        test = LoadTest(broker, start, frames, lambda k, reply: reply.json().get("text") == expected[k],
                        servers=args.servers)
        faults = [] if args.no_faults else [Fault(args.kill_at, "kill_server", 0, restart_after_s=2.0),
                                            Fault(args.broker_restart_at, "restart_broker")]
        report = test.run(args.devices, args.seconds, faults)
    print(json.dumps(report.summary(), indent=2))


if __name__ == "__main__":
    main()
