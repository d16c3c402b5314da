"""p2pfm.daemon.heap: glibc's allocator settings, where glibc is (no-ops elsewhere)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from p2pfm.daemon import heap


def test_heap_calls_are_safe_and_answer_booleans():
    assert isinstance(heap.release_free_heap(), bool)


CHURN = r"""
import sys, threading
from pathlib import Path
from p2pfm.daemon import heap
if sys.argv[1] == "fixed":
    assert heap.fix_mmap_threshold()
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
keep = []
def churn():
    big = bytearray(16 << 20); del big  # glibc raises its mmap threshold to 16 MiB on this free
    held = []
    for _ in range(64):  # 4 MiB buffers (state chunks) with small survivors between them
        b = bytearray(4 << 20); b[::4096] = b"x" * len(b[::4096]); held.append(b)
        keep.append(bytearray(2048))
    del held
before = rss()
t = threading.Thread(target=churn); t.start(); t.join()
if sys.argv[1] == "trim":
    heap.release_free_heap()
print(rss() - before)
"""


@pytest.mark.skipif(heap._LIBC is None, reason="needs glibc")
def test_freed_large_buffers_go_back_to_the_system_with_the_fixed_threshold_or_a_trim():
    """In fresh processes: 64 freed 4 MiB buffers stay resident under glibc's defaults (the peer's
    problem), not with the fixed threshold, and ``release_free_heap`` returns them."""
    grown = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "fixed", "trim")
    }
    assert grown["default"] > 128 << 20, grown  # the retention this module exists for
    assert grown["fixed"] < 32 << 20, grown
    assert grown["trim"] < 32 << 20, grown
