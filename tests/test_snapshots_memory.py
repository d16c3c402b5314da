"""The initial parameters as a file mapping: reported apart from the heap, and out of the
resident set again after a read (``drop_mapped_pages``), with the same values."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from p2pfm.daemon.memory import buffer_breakdown
from p2pfm.daemon.snapshots import drop_mapped_pages, map_initial_params, mapping_of


def _rss_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_initial_params_map_a_file_read_only_with_the_same_values(tmp_path: Path):
    initial = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    mapped = map_initial_params(tmp_path, initial)
    assert np.array_equal(mapped, initial)
    assert mapping_of(mapped) is not None and mapping_of(mapped[10:20]) is not None
    assert not mapped.flags.writeable
    with pytest.raises(ValueError):
        mapped[0] = 1.0
    assert mapping_of(initial) is None and mapping_of(None) is None


def test_the_memory_report_counts_the_mapping_apart_from_the_heap(tmp_path: Path):
    mapped = map_initial_params(tmp_path, np.ones(256, np.float32))
    report = buffer_breakdown(
        torch.nn.Linear(2, 2), None, {"initial_params": mapped, "gossip_anchor": np.ones(256, np.float32)}
    )
    assert report["memory_mapped"] == {"initial_params": 1024}
    assert report["host_buffers"] == {"gossip_anchor": 1024}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's /proc")
def test_dropping_the_pages_takes_a_read_mapping_out_of_the_resident_set(tmp_path: Path):
    size = 64 << 20  # 64 MiB of float32
    mapped = map_initial_params(tmp_path, np.arange(size // 4, dtype=np.float32))
    before = _rss_file_bytes()
    total = float(mapped.sum(dtype=np.float64))  # pages every byte in
    paged_in = _rss_file_bytes()
    assert paged_in - before > size // 2, (before, paged_in)
    drop_mapped_pages(mapped)
    dropped = _rss_file_bytes()
    assert paged_in - dropped > size // 2, (paged_in, dropped)
    assert float(mapped.sum(dtype=np.float64)) == total  # read again, from the page cache
