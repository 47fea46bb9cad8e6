"""Keeping freed activation buffers for reuse while a compile runs (glibc on Linux).

glibc's malloc serves every block above its mmap threshold (at most 32 MiB, adapted at run time)
with a fresh mmap and unmaps it on free. A compile frees and reallocates activations of 50 to
150 MB per node and batch, so each new buffer is paid for again in page faults that zero it:
the npu-int8 compile of EfficientNet-Lite0 took 1.6 times as long that way
(`benchmarks/speed_allocator.md`). PyTorch's CPU tuning guide recommends jemalloc or
tcmalloc for the same reason; a library cannot swap the allocator under its caller, but it can
set glibc's thresholds for the duration of its own work.

`reuse_freed_memory()` raises the mmap and trim thresholds so that freed blocks stay in the heap
and serve the next allocation, and on exit sets them to what glibc's own adaptation reaches on
such a workload (32 MiB mmap, 64 MiB trim) and hands the heap's free memory back to the system
(`malloc_trim`). Peak memory grows by the freed blocks held between allocations (3.5 to 4.6 GiB
on that compile). Nothing changes where glibc is not the allocator, or where the user set the
thresholds themselves (`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`, or
`QCOMPILER_KEEP_MALLOC=1` to leave malloc alone). Results do not depend on it: only where
buffers come from changes.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from typing import Iterator

# mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_HOLD_MMAP = 1 << 30              # blocks below 1 GiB come from the heap while a compile runs
_HOLD_TRIM = (1 << 31) - 1        # and freed memory is not handed back in between
_AFTER_MMAP = 32 << 20            # glibc's adaptive ceiling (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
_AFTER_TRIM = 2 * _AFTER_MMAP     # what glibc's adaptation pairs with it

_lock = threading.Lock()
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc and the user left malloc's thresholds alone; else None."""
    if not sys.platform.startswith("linux") or os.environ.get("QCOMPILER_KEEP_MALLOC") == "1":
        return None
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has no such symbol
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Hold freed heap blocks for reuse inside the block (see the module docstring); yields
    whether this use changed the thresholds: only the outermost of nested uses does."""
    global _depth
    with _lock:
        _depth += 1
        outermost = _depth == 1
    libc = _glibc() if outermost else None
    changed = bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, _HOLD_MMAP)
                   and libc.mallopt(_M_TRIM_THRESHOLD, _HOLD_TRIM))
    try:
        yield changed
    finally:
        with _lock:
            _depth -= 1
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
            libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
            libc.malloc_trim(0)
