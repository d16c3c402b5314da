"""``p2pfm bench scale``'s arithmetic: the round split and the protocol's share of compute."""

from __future__ import annotations

import pytest

from p2pfm.bench.scale import protocol_shares, round_split
from p2pfm.core.gossip import GossipConfig


def _round(n: int, compute: float, receive: float) -> dict:
    return {
        "event": "round", "round": n, "compute_seconds": compute, "receive_seconds": receive,
        "encode_seconds": 0.5, "merge_seconds": 0.25, "snapshot_seconds": 1.0, "eval_seconds": 0.0,
        "round_seconds": 10.0, "update_bytes_sent": 1000 * n, "bytes_received": 2000 * n,
    }  # fmt: skip


def test_round_split_skips_the_warm_up_round_and_takes_differences_of_cumulative_counters():
    split = round_split([_round(1, 8.0, 0.1), _round(2, 16.0, 0.3), _round(3, 24.0, 0.5)])
    assert split["compute"] == pytest.approx(8.0)
    assert split["receive"] == pytest.approx(0.2)
    assert split["other"] == pytest.approx(10.0 - 8.0 - 0.5 - 0.25 - 1.0)
    assert split["update_bytes_per_round"] == pytest.approx(1000)


def test_protocol_share_at_the_default_h_scales_the_measured_seconds_per_step():
    split = {"compute": 8.0, "encode": 0.5, "receive": 0.25, "merge": 0.25}
    shares = protocol_shares(split, inner_steps=4)  # 2 s per step
    assert shares["protocol_share_of_compute"] == pytest.approx(1.0 / 8.0)
    h = GossipConfig().inner_steps
    assert shares["default_inner_steps"] == h
    assert shares["protocol_share_at_default_h"] == pytest.approx(1.0 / (2.0 * h))
