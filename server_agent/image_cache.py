"""The image codes a server keeps so that a device's next question about the same image
can name it by digest instead of sending its image tokens again.

What is kept is what was received (the image positions' codes, a few hundred KB at real
size), not the KV cache: it saves the uplink, not the server's prefill, and it is exact
at any cut, since the digest is over the very codes the device would send. Bounded by
time (an entry lives `ttl_s` after its last use), by entries per device, and by bytes in
all; the least recently used goes first. A miss is never a guess: the device is told
`image_not_cached` and sends the image again.
"""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

DEFAULT_TTL_S = 300.0
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_PER_DEVICE = 4


class ImageCache:
    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_bytes: int = DEFAULT_MAX_BYTES,
                 per_device: int = DEFAULT_PER_DEVICE, clock=time.monotonic):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.per_device = per_device
        self.clock = clock
        self._items: collections.OrderedDict[tuple[str, str], tuple[np.ndarray, float]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, device_id: str, digest: str, codes: np.ndarray) -> bool:
        """Keep `codes` (T, D) for `device_id` under `digest`; False when it cannot fit."""
        if self.ttl_s <= 0 or codes.nbytes > self.max_bytes:
            return False
        key = (device_id, digest)
        with self._lock:
            self._drop(key)
            self._items[key] = (np.array(codes, copy=True), self.clock() + self.ttl_s)
            self._bytes += codes.nbytes
            mine = [k for k in self._items if k[0] == device_id]
            for k in mine[:max(0, len(mine) - self.per_device)]:
                self._drop(k)
            self._expire()
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))
        return True

    def get(self, device_id: str, digest: str) -> np.ndarray | None:
        """The codes, or None (never kept, expired, or pushed out). A hit renews the entry."""
        key = (device_id, digest)
        with self._lock:
            self._expire()
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items[key] = (item[0], self.clock() + self.ttl_s)
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def _drop(self, key) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[0].nbytes

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, (_, deadline) in self._items.items() if deadline < now]:
            self._drop(key)

    def __len__(self) -> int:
        return len(self._items)
