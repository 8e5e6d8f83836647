"""Peak memory of this process, for the commands that can run long or large."""
from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """The process's own peak resident set (VmHWM on Linux: unlike ru_maxrss it does not
    carry a parent's peak over exec)."""
    peak = _proc_mb("/proc/self/status", "VmHWM:")
    return peak if peak is not None else _maxrss_mb(resource.RUSAGE_SELF)


def rss_mb() -> float | None:
    """The process's resident set now (VmRSS), or None where unknown."""
    return _proc_mb("/proc/self/status", "VmRSS:")


def release_freed_memory() -> None:
    """Collect garbage, then hand the heap's free pages back to the kernel (glibc's
    malloc_trim). Freed tensors below glibc's mmap threshold, which grows to 32 MB after
    the first large free, otherwise stay in the process: at real size, gigabytes."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def children_peak_rss_mb() -> float:
    """The largest peak resident set of any finished child process (and its children)."""
    return _maxrss_mb(resource.RUSAGE_CHILDREN)


def _maxrss_mb(who: int) -> float:
    rss = resource.getrusage(who).ru_maxrss  # bytes on macOS, KiB elsewhere
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def available_mb() -> float | None:
    """Memory the kernel can give this process now (MemAvailable), or None where unknown."""
    return _proc_mb("/proc/meminfo", "MemAvailable:")


def _proc_mb(path: str, key: str) -> float | None:
    """A "Key: N kB" line of a /proc file, in MB; None where there is no such file."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
