"""Codes of a bundle's client graph for fixed inputs, written to a .npz (no pickle), or
two such files compared: scripts/arm64_check.sh runs the first half on x86 and inside
the arm64 userland, then compares. Torch-free, as the device is.

    python scripts/arm64_codes.py dump BUNDLE VARIANT N OUT.npz
    python scripts/arm64_codes.py compare A.npz B.npz
    python scripts/arm64_codes.py answers A.jsonl B.jsonl   # `device run` outputs: SAME or DIFF ...
"""
from __future__ import annotations

import json
import sys

import numpy as np


def dump(bundle: str, variant: str, n: int, out: str) -> None:
    from edgeqtl import shapes
    from edgeqtl.device_agent.client import DeviceClient

    client = DeviceClient(bundle, variant=variant, threads=2)
    arrays = {}
    for i, s in enumerate(shapes.heldout(max(1, n // 5 + 1))[:n]):
        wire, _, _ = client.encode(s.image, s.question)
        arrays[f"q{i}"] = wire
    np.savez(out, **arrays)


def compare(a: str, b: str) -> None:
    with np.load(a, allow_pickle=False) as fa, np.load(b, allow_pickle=False) as fb:
        same = total = 0
        near = 0
        for k in fa.files:
            x, y = fa[k], fb[k]
            same += int((x == y).sum())
            near += int((np.abs(x.astype(np.int64) - y.astype(np.int64)) <= 1).sum())
            total += x.size
    print(json.dumps({"agreement": same / total, "within_one_level": near / total, "codes": total}))


def answers(a: str, b: str) -> None:
    rows_a = [json.loads(line) for line in open(a) if line.strip()]
    rows_b = [json.loads(line) for line in open(b) if line.strip()]
    errors = [r for r in rows_a + rows_b if "error" in r]
    same = sum(x.get("answer") == y.get("answer") for x, y in zip(rows_a, rows_b))
    ok = not errors and len(rows_a) == len(rows_b) and same == len(rows_b)
    print(("SAME" if ok else "DIFF") + f" {same}/{len(rows_b)} answers equal"
          + (f", {len(errors)} errors, first: {errors[0]['error']}" if errors else ""))


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "answers":
        answers(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
