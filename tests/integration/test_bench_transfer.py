"""``measure_download`` runs the daemon's own state download over two real ``p2pd`` daemons."""

from __future__ import annotations

import pytest

from p2pfm.bench.transfer import measure_download

pytestmark = pytest.mark.integration


def test_measure_download_reports_the_libp2p_download_beside_a_tcp_copy(tmp_path):
    result = measure_download(3_000_000, chunk_bytes=1 << 20, work_dir=tmp_path, repeats=1)
    assert result["total_bytes"] > 3_000_000 and result["chunks"] == 3
    for key in ("libp2p_stream_MBps", "libp2p_download_MBps", "tcp_copy_MBps", "libp2p_raw_MBps"):
        assert result[key] > 0, key
    assert result["stream_vs_tcp"] == pytest.approx(
        result["tcp_copy_s"] / result["libp2p_stream_s"], rel=1e-2
    )
    assert not list((tmp_path / "joiner" / "transfer").glob("partial.state"))  # discarded after each run
