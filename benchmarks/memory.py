"""Peak resident memory of this process, for the benchmarks' worker processes."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """VmHWM from /proc: the high-water mark of this process's own address space. Linux
    carries ru_maxrss over fork and exec, so a worker started by a parent that had
    imported torch would report the parent's peak; VmHWM starts afresh at exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on Linux, bytes on macOS
