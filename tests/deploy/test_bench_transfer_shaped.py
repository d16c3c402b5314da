"""``measure_shaped_download``: donor and joiner in two network namespaces over shaped links.
Structure only: no timing is asserted (performance is measured, never tested)."""

from __future__ import annotations

import os

import pytest

from p2pfm.bench.transfer_shaped import measure_shaped_download
from p2pfm.netlab.netns import NAME_ROOT, available

pytestmark = pytest.mark.deploy


def test_shaped_download_reports_stream_and_lane_beside_a_tcp_copy(root_required, tmp_path):
    """A 20 MB state crosses a 200 Mbit/s link three ways; every figure is there and positive, the
    big files are gone and no namespace is left."""
    import subprocess

    reason = available()
    if reason:
        pytest.skip(reason)
    result = measure_shaped_download(20_000_000, rate_mbit=200, repeats=1, work_dir=tmp_path)
    assert result["total_bytes"] > 20_000_000 and result["chunks"] == 5 and result["repeats"] == 1
    assert result["link"]["rate_mbit"] == 200 and result["link"]["shaper"] in ("netem", "tbf+nfqueue")
    for key in (
        "tcp_copy_MBps", "libp2p_stream_MBps", "libp2p_download_MBps", "lane_MBps", "lane_download_MBps",
        "stream_vs_tcp", "download_vs_tcp", "lane_vs_tcp", "lane_download_vs_tcp",
    ):  # fmt: skip
        assert result[key] > 0, key
    assert result["stream_vs_tcp"] == pytest.approx(
        result["tcp_copy_s"] / result["libp2p_stream_s"], rel=1e-2
    )
    assert all(len(runs) == 1 for runs in result["runs_s"].values())
    assert (tmp_path / "result.json").exists() and (tmp_path / "joiner.log").exists()
    assert not (tmp_path / "donor").exists() and not (tmp_path / "joiner").exists()  # 2x the state on disk
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{NAME_ROOT}{os.getpid()}-" not in namespaces  # ours (other labs may be running)
