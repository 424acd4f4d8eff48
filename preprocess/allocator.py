"""Keep freed memory for reuse in long binning runs (glibc only; a no-op elsewhere).

Binning allocates the same few tens of megabytes per block, block after block (the spike
slices, their bin indices, zarr's shard buffers). glibc's defaults give arrays above its
mmap threshold (at most 32 MiB, adapted at run time) back to the kernel when freed and
trim the top of the heap past 2x that threshold, so every block faulted and zeroed the
same memory again: on a 12-hour, 400-unit recording that was 1.4 of 3 seconds of system
time, 15-20% of the run. With both thresholds fixed at ``KEEP_BYTES`` the memory is
reused instead; resident memory stays bounded by the run's own peak use (freed memory is
reused, not added), which the binning benchmark reports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

KEEP_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
# glibc reads these when a process starts: spawned worker processes inherit them
_ENV = {"MALLOC_TRIM_THRESHOLD_": str(KEEP_BYTES), "MALLOC_MMAP_THRESHOLD_": str(KEEP_BYTES)}


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process and the worker processes it
    starts from now on. Returns whether this process's allocator was changed: not without
    glibc, and not when the user set either variable (theirs are left alone)."""
    if any(name in os.environ for name in _ENV):
        return False
    os.environ.update(_ENV)
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: macOS, Windows, musl
        return False
    # both: fixing one turns off glibc's adaptation of the other, which is worse than the
    # defaults (every large array mapped afresh, or the heap trimmed after every block)
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
