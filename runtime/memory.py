"""Peak resident memory of this process (what `--verbose` and the benchmarks report)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size of this process.

    Linux: VmHWM from /proc/self/status. (getrusage's ru_maxrss survives fork + exec, so a child would report
    at least its parent's peak.)
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB
    except ImportError:  # Windows
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). Buffers under glibc's
    mmap threshold (32 MB: most of a model's weights, and OpenVINO's own while it compiles or imports) live on the
    heap, and freeing them does not lower the resident set until then. Measured: parking 2.2 GB of 6.5 MB tensors
    left the RSS at 2.2 GB, trimmed 1.2 GB (export/park.py); OpenVINO's int8 sd15-arch UNet and fp32 text encoder
    left 0.3 GB on the heap after compiling (its probe:
    benchmarks/results/cpu-sd15-512-fast/2026-12-02-memory-probe)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
