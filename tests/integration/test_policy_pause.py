"""Energy policy on real peers: one of two is paused by its (injected) readings and resumes intact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2pfm.core.tensorfile import digest
from p2pfm.swarm import final_params
from tests.integration.conftest import round_of, round_records, wait_for

pytestmark = pytest.mark.integration

HEARTBEAT_S = 4.0  # the daemon's default net.heartbeat_s


def events(peer, name: str) -> list[dict]:
    return [r for r in peer.metrics() if r.get("event") == name]


def write_readings(path: Path, values: dict) -> None:
    """Atomically, so the peer never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    tmp.replace(path)


def test_paused_peer_leaves_rounds_keeps_state_and_catches_up(make_swarm, tmp_path):
    readings = tmp_path / "readings.json"
    write_readings(readings, {"other_load": 0.0})
    config = tmp_path / "policy.toml"
    config.write_text(
        "[policy]\n"
        'rules = ["idle-only"]\n'
        f"readings = {json.dumps(str(readings))}\n"
        "min_run_s = 0.0\nmin_pause_s = 0.0\ncheck_every_s = 0.2\n"
    )
    swarm = make_swarm(["--rounds", "0", "--inner-steps", "8", "--min-peers", "2"])
    steady = swarm.add_peer(shard=0, num_shards=2)
    owner = swarm.add_peer(shard=1, num_shards=2, extra=["--config", str(config)])
    swarm.start_peer(steady)
    swarm.start_peer(owner)
    peers = swarm.peers
    wait_for(lambda: min(round_of(p) for p in peers) >= 3, 180, "both peers at round 3", peers)

    # The device gets busy: the owner pauses between rounds, checkpoint written, state kept.
    write_readings(readings, {"other_load": 0.9})
    wait_for(lambda: owner.status().get("state") == "paused", 60, "the owner to pause", peers)
    status = owner.status()
    assert status["paused"]["reason"] == "other load 0.90 > 0.50"
    (pause,) = events(owner, "pause")
    paused_round = pause["round"]
    assert status["round"] == paused_round
    checkpoint = final_params(owner.work_dir)
    assert checkpoint is not None and np.isfinite(checkpoint).all()
    checkpoint_hash = digest(checkpoint.tobytes())

    # Its announcement says paused: the other peer sees it so, and trains on without it.
    wait_for(
        lambda: owner.status()["peer_id"] in steady.status().get("paused_peers", []), 60, "paused seen", peers
    )
    assert owner.status()["peer_id"] not in steady.status()["live_peers"]
    seen_paused_at = round_of(steady)
    wait_for(lambda: round_of(steady) >= seen_paused_at + 6, 120, "the other to train 6 rounds alone", peers)
    # Announcements are refreshed every heartbeat (4 s): let the other's announced round move on too,
    # judged by its own round records' clock, so that the resuming peer sees a swarm that moved on.
    wait_for(
        lambda: round_records(steady)[-1]["time"] >= pause["time"] + 2.5 * HEARTBEAT_S,
        120,
        "the other's announcements to move on",
        peers,
    )
    alone = [r for r in round_records(steady) if r["round"] > seen_paused_at]
    assert alone and all(r["live_peers"] == 0 for r in alone)  # not counted, not waited for
    assert owner.status()["state"] == "paused" and round_of(owner) == paused_round
    assert digest(final_params(owner.work_dir).tobytes()) == checkpoint_hash  # untouched while paused

    # Idle again: it resumes, its kept state intact, and catches up from the swarm that moved on.
    write_readings(readings, {"other_load": 0.0})
    wait_for(lambda: events(owner, "resume"), 60, "the owner to resume", peers)
    (resume,) = events(owner, "resume")
    assert resume["state_hash"] == pause["state_hash"]
    assert resume["paused_round"] == paused_round and resume["paused_s"] > 0
    assert resume["behind"] >= 5 and resume["caught_up"] and resume["round"] >= paused_round + 5
    downloads = [r for r in events(owner, "state_download") if r["reason"] == "resume"]
    assert len(downloads) == 1 and downloads[0]["round"] == resume["round"]
    after = resume["round"]
    wait_for(lambda: round_of(owner) >= after + 3, 120, "the owner to train 3 rounds after resuming", peers)

    swarm.stop_all(timeout=60)
    rounds = [r["round"] for r in round_records(owner)]
    assert rounds == sorted(set(rounds))  # round counters only grow
    assert not [r for r in rounds if paused_round < r <= after]  # no round was run while paused
    for peer in peers:
        params = final_params(peer.work_dir)
        assert params is not None and np.isfinite(params).all()
        losses = [r["eval_loss"] for r in round_records(peer)[-3:]]
        assert all(loss is not None and np.isfinite(loss) for loss in losses)
    assert abs(round_of(owner) - round_of(steady)) <= 8
