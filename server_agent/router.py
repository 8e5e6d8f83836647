"""Several server halves behind one agent, keyed by bundle fingerprint: a lab moving its
fleet from one export to the next serves both until the last device has moved.

Each request goes to the engine whose fingerprint its frame carries; one it does not hold
is answered `fingerprint_mismatch`, naming the ones it does. The halves are loaded within
a memory bound (the sum of their weights), checked before each load, so a server that
cannot hold another half says so at start instead of running out of memory later.
"""
from __future__ import annotations

import logging
from pathlib import Path

from edgeqtl.errors import CodedError, EdgeqtlError
from edgeqtl.wire import Frame, error_frame

from .engine import GenerationEngine

log = logging.getLogger("edgeqtl.server")


class RouterError(EdgeqtlError, ValueError):
    """Server halves that cannot be served together."""


def half_nbytes(server_half: str | Path) -> int:
    """The bytes a server half's weights take on disk (about what they take in memory at fp32)."""
    return sum(p.stat().st_size for p in Path(server_half).glob("*.safetensors"))


def check_memory_bound(server_halves: list[Path], max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    sizes = [half_nbytes(p) for p in server_halves]
    if sum(sizes) > max_bytes:
        listed = ", ".join(f"{p} {n / 2 ** 30:.2f} GiB" for p, n in zip(server_halves, sizes))
        raise RouterError(f"the server halves need {sum(sizes) / 2 ** 30:.2f} GiB ({listed}), over the "
                          f"{max_bytes / 2 ** 30:.2f} GiB bound (--max-memory-gb); serve fewer on this agent, or "
                          "raise the bound")


class EngineRouter:
    def __init__(self, engines: list[GenerationEngine]):
        if not engines:
            raise RouterError("an agent serves at least one server half")
        self.engines: dict[bytes, GenerationEngine] = {}
        for e in engines:
            fp = e.bundle.fingerprint_bytes
            if fp in self.engines:
                raise RouterError(f"two server halves with one fingerprint {fp.hex()}: the same export given twice")
            self.engines[fp] = e

    def describe(self) -> str:
        return ", ".join(f"{fp.hex()} (cut {e.split.cut}, {e.split.quantizer}"
                         f"{f' {e.split.levels} levels' if e.split.quantizer == 'fsq' else ''})"
                         for fp, e in self.engines.items())

    @property
    def sessions(self) -> dict:
        return {k: v for e in self.engines.values() for k, v in e.sessions.items()}

    def set_agent(self, server_id: str, emit) -> None:
        for e in self.engines.values():
            e.server_id, e.emit = server_id, emit

    def handle_batch(self, frames: list[Frame]) -> list[Frame]:
        if len(self.engines) == 1:  # one half: its own check names the mismatch
            return next(iter(self.engines.values())).handle_batch(frames)
        replies: list[Frame | None] = [None] * len(frames)
        groups: dict[bytes, list[int]] = {}
        for i, f in enumerate(frames):
            if f.fingerprint in self.engines:
                groups.setdefault(f.fingerprint, []).append(i)
            else:
                replies[i] = error_frame(CodedError(
                    "fingerprint_mismatch", f"bundle fingerprint {f.fingerprint.hex()} is not one this server holds "
                                            f"({self.describe()}); deploy a bundle it serves, or start a server agent "
                                            "with this bundle's server half"), **f.reply_fields())
        for fp, idx in groups.items():
            for i, reply in zip(idx, self.engines[fp].handle_batch([frames[i] for i in idx])):
                replies[i] = reply
        return replies
