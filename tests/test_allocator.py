"""qcompiler.allocator: inside a compile, freed large buffers serve the next allocation instead of
being unmapped and faulted in again; outside, glibc's usual behaviour is back; the user's own
malloc settings win."""
from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from qcompiler import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux only")

BIG = 64 << 20   # above glibc's largest adaptive mmap threshold (32 MiB)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mmapped_bytes() -> int:
    """Bytes glibc holds in blocks it mapped one by one (mallinfo2's hblkhd)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)


def _mapped_by_one_allocation() -> int:
    before = _mmapped_bytes()
    t = torch.empty(BIG, dtype=torch.uint8)
    during = _mmapped_bytes()
    del t
    return during - before


def test_large_buffers_come_from_the_heap_inside_and_are_mapped_again_after(monkeypatch):
    monkeypatch.delenv("QCOMPILER_KEEP_MALLOC", raising=False)
    with allocator.reuse_freed_memory() as changed:
        assert changed
        assert _mapped_by_one_allocation() < BIG
    assert _mapped_by_one_allocation() >= BIG


def test_only_the_outermost_use_changes_the_settings(monkeypatch):
    monkeypatch.delenv("QCOMPILER_KEEP_MALLOC", raising=False)
    with allocator.reuse_freed_memory() as outer:
        with allocator.reuse_freed_memory() as inner:
            assert outer and not inner
        # Leaving the inner block must not restore the thresholds under the outer one.
        assert _mapped_by_one_allocation() < BIG
    assert _mapped_by_one_allocation() >= BIG


@pytest.mark.parametrize("variable,value", [("QCOMPILER_KEEP_MALLOC", "1"), ("MALLOC_MMAP_THRESHOLD_", "131072")])
def test_the_users_malloc_settings_are_left_alone(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with allocator.reuse_freed_memory() as changed:
        assert not changed
        assert _mapped_by_one_allocation() >= BIG
