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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's /proc")
def test_dropping_a_block_of_pages_leaves_the_rest_of_the_mapping_resident(tmp_path: Path):
    """A params answer drops each block of the initial parameters behind it (encode_sync's
    after_block): only that block's pages leave, the values stay the same."""
    size = 64 << 20
    mapped = map_initial_params(tmp_path, np.arange(size // 4, dtype=np.float32))
    drop_mapped_pages(mapped)
    total = float(mapped.sum(dtype=np.float64))  # all pages in
    paged_in = _rss_file_bytes()
    half = mapped.size // 2
    drop_mapped_pages(mapped, 0, half)
    after_half = _rss_file_bytes()
    assert size // 4 < paged_in - after_half < size * 3 // 4, (paged_in, after_half)
    drop_mapped_pages(mapped, half, mapped.size)
    assert after_half - _rss_file_bytes() > size // 4
    drop_mapped_pages(mapped, 5, 3)  # an empty range is nothing to do
    drop_mapped_pages(mapped, 7, 9)  # inside one page: widened to it
    assert float(mapped.sum(dtype=np.float64)) == total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's /proc")
def test_a_params_answer_leaves_no_more_than_a_block_of_the_initial_parameters_resident(tmp_path: Path):
    """What PeerProtocol.serve_params does with the daemon's hook (peer.py sets ``initial_read`` to
    ``partial(drop_mapped_pages, initial)``): encode_sync reads the mapping once and drops each
    block behind it, so an answer no longer costs 4 bytes per parameter of resident file pages."""
    from p2pfm.core.codecs import CodecSpec
    from p2pfm.core.gossip import encode_sync

    n = (64 << 20) // 4
    mapped = map_initial_params(tmp_path, np.zeros(n, np.float32))
    drop_mapped_pages(mapped)
    params = np.full(n, 0.5, np.float32)
    config = type("Config", (), {"sync_codec": CodecSpec("int8")})()
    before = _rss_file_bytes()
    peak = [0]

    def drop_and_watch(start: int, end: int) -> None:
        drop_mapped_pages(mapped, start, end)
        peak[0] = max(peak[0], _rss_file_bytes() - before)

    wire = encode_sync(params, mapped, config, after_block=drop_and_watch)  # type: ignore[arg-type]
    assert wire["numel"] == n
    assert peak[0] < 16 << 20, peak  # a 4 MiB block (plus read-ahead), never the 64 MiB mapping


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssFile is Linux's /proc")
def test_a_downloaded_states_copy_on_write_mapping_drops_its_pages_and_keeps_its_values(tmp_path: Path):
    """A joiner adopts views of its downloaded file's private mapping (``PartialState.open_state``),
    copies them, and drops the mapping's pages (``RoundDriver.catch_up``): values stay readable."""
    import mmap as mmap_module

    size = 32 << 20
    path = tmp_path / "partial.state"
    path.write_bytes(np.arange(size // 4, dtype=np.float32).tobytes())
    with open(path, "rb") as source:
        mapping = mmap_module.mmap(source.fileno(), size, access=mmap_module.ACCESS_COPY)
    params = np.frombuffer(mapping, np.float32)[1024:]  # a view, as unpack_arrays gives
    assert mapping_of(params) is mapping
    before = _rss_file_bytes()
    total = float(params.sum(dtype=np.float64))
    assert _rss_file_bytes() - before > size // 2
    drop_mapped_pages(params)
    assert _rss_file_bytes() - before < size // 4
    path.unlink()  # discard(): the mapping keeps the inode
    assert float(params.sum(dtype=np.float64)) == total
