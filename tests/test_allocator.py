"""qcompiler.allocator: inside a compile, freed large buffers serve the next allocation instead of
being unmapped and faulted in again; outside, glibc's usual behaviour is back; the user's own
malloc settings win.

Each check runs in a fresh interpreter: in a long-lived process (this test session) the heap
may already hold a free block large enough for the probe, which glibc serves without mapping
whatever the thresholds say.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux only")

PROBE = """
import ctypes, json, sys, torch
from qcompiler import allocator

BIG = 64 << 20   # above glibc's largest adaptive mmap threshold (32 MiB)

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped(size=BIG):
    # Whether glibc mapped an allocation of `size` bytes on its own (mallinfo2's hblkhd grows).
    before = libc.mallinfo2().hblkhd
    t = torch.empty(size, dtype=torch.uint8)
    during = libc.mallinfo2().hblkhd
    del t
    return (during - before) >= size

out = {"before": mapped()}
with allocator.reuse_freed_memory() as outer:
    out["outer_changed"] = outer
    with allocator.reuse_freed_memory() as inner:
        out["inner_changed"] = inner
        out["inner"] = mapped()
    out["after_inner"] = mapped()
# Larger than any block freed so far: the heap cannot serve it from a free chunk it still holds.
out["after"] = mapped(4 * BIG)
print(json.dumps(out))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("QCOMPILER_KEEP_MALLOC", "MALLOC_MMAP_THRESHOLD_")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**clean, **env},
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_large_buffers_come_from_the_heap_inside_and_are_mapped_before_and_after():
    seen = _probe()
    assert seen["before"] and seen["after"]                 # glibc maps a 64 MiB block on its own
    assert seen["outer_changed"] and not seen["inner_changed"]
    assert not seen["inner"] and not seen["after_inner"]    # leaving the inner use keeps the settings


@pytest.mark.parametrize("variable,value", [("QCOMPILER_KEEP_MALLOC", "1"), ("MALLOC_MMAP_THRESHOLD_", "33554432")])
def test_the_users_malloc_settings_are_left_alone(variable, value):
    seen = _probe(**{variable: value})
    assert not seen["outer_changed"]
    assert seen["before"] and seen["inner"] and seen["after"]
