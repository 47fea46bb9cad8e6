"""How many threads torch gets while qcompile runs: never more than the cores left free.

torch's intra-op threads spin while they wait for each other. With another CPU-bound process on
the machine, two threads on two cores made an EfficientNet-Lite0 compile 1.8-2x slower than one
thread (`benchmarks/speed.md`, "Threads"). So `qcompile(threads=None)` counts the cores this
process may use (its CPU affinity), subtracts the cores other processes kept busy over a short
sample of /proc/stat, and never goes above torch's own setting (`torch.get_num_threads()`, which a
user may have lowered). `threads=N` fixes the count. On small models the same compile at 1 and 2
threads gives the same tensors (tested); on EfficientNet-Lite0 the plan is the same, but float
sums ordered by the thread count can move the optimised rounding in its last bits (a budgeted
npu-int4 compile on 16 crops differed from the AdaRound of `blocks.12` on; npu-int8 did not),
so give `threads=N` where artifacts must match bit for bit across machines and loads.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Iterator

import torch

from .errors import QCompileError

SAMPLE_SECONDS = 0.1
# A decision is reused for this long: back-to-back compiles (a sweep, a test suite) sample once.
_REUSE_SECONDS = 10.0
_last: tuple[float, int] | None = None


def process_cores() -> int:
    """The cores this process may run on (its CPU affinity; all cores where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_ticks(cpus: set[int] | None) -> tuple[int, int] | None:
    """(busy, total) clock ticks of the given CPUs since boot, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def _own_ticks() -> int:
    """This process's user + system clock ticks (its own threads must not count as other load)."""
    times = os.times()
    return round((times.user + times.system) * os.sysconf("SC_CLK_TCK"))


def busy_cores(sample: float = SAMPLE_SECONDS) -> float | None:
    """How many of this process's cores other processes kept busy over `sample` seconds."""
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    before, own_before = _cpu_ticks(cpus), _own_ticks()
    if before is None:
        return None
    time.sleep(sample)
    after, own_after = _cpu_ticks(cpus), _own_ticks()
    if after is None or after[1] <= before[1]:
        return None
    others = max(0, (after[0] - before[0]) - (own_after - own_before))
    return others / (after[1] - before[1]) * process_cores()


def default_threads() -> int:
    """Cores left free by other processes (at least 1), capped by torch's current setting."""
    global _last
    now = time.monotonic()
    if _last is not None and now - _last[0] < _REUSE_SECONDS:
        return _last[1]
    cap = min(torch.get_num_threads(), process_cores())
    busy = busy_cores()
    free = cap if busy is None else process_cores() - math.floor(busy + 0.5)
    chosen = max(1, min(cap, free))
    _last = (time.monotonic(), chosen)
    return chosen


def check_threads(threads: int | None) -> None:
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise QCompileError(f"threads must be a positive integer or None (choose from the free cores), "
                            f"got {threads!r}")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with `threads` torch threads (None: `default_threads()`), then restore."""
    check_threads(threads)
    chosen = default_threads() if threads is None else threads
    previous = torch.get_num_threads()
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(previous)
