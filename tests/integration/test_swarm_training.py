"""Real swarms on loopback: training converges, churn is survived, joiners catch up."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from p2pfm.swarm import consensus_distance, final_params, summarize
from tests.integration.conftest import round_of, round_records, wait_all_exit, wait_for

pytestmark = pytest.mark.integration


def rounds_of_run(peer, run: int) -> list[dict]:
    """Round records of the peer's ``run``-th start (0-based); empty until that run has started."""
    records = peer.metrics()
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    if len(starts) <= run:
        return []
    end = starts[run + 1] if len(starts) > run + 1 else len(records)
    return [r for r in records[starts[run] : end] if r.get("event") == "round"]


def stop_gracefully(peers) -> None:
    """SIGTERM every peer (graceful leave: final checkpoint), then check they all exited cleanly."""
    for peer in peers:
        peer.terminate()
    for peer in peers:
        assert peer.stop(timeout=60) == 0, f"peer {peer.index} did not leave cleanly"


def test_three_peers_loss_falls_and_consensus_is_small(make_swarm):
    """3 peers, no churn: eval loss falls far below ln 256 and the peers agree on their parameters."""
    swarm = make_swarm(["--rounds", "20", "--inner-steps", "8", "--min-peers", "3"])
    for index in range(3):
        swarm.start_peer(swarm.add_peer(shard=index, num_shards=3), wait=index == 0)
    wait_all_exit(swarm.peers, timeout=240)
    summary = summarize(swarm.peers, wall_seconds=0.0)
    print(summary)
    assert summary["initial_eval_loss"] > 5.0
    assert summary["final_eval_loss"] < 3.6, summary
    assert summary["consensus_distance"] < 0.05, summary
    assert summary["messages_rejected"] == {} or set(summary["messages_rejected"]) <= {"stale_round"}
    # Every peer heard from the others: gossip really flowed over libp2p.
    for peer in swarm.peers:
        assert sum(r["received_updates"] for r in round_records(peer)) > 0
        assert round_records(peer)[-1]["update_bytes_sent"] > 0


def test_killed_peer_does_not_stall_others_and_rejoins(make_swarm):
    """SIGKILL one peer mid-run: the others keep their pace; restarted, it resumes and ends near them."""
    # Peers run until stopped: a fast machine must not finish the run before the victim is back.
    swarm = make_swarm(["--rounds", "0", "--inner-steps", "8", "--announce-ttl", "6", "--min-peers", "3"])
    for index in range(3):
        swarm.start_peer(swarm.add_peer(shard=index, num_shards=3), wait=index == 0)
    victim, survivors = swarm.peers[2], swarm.peers[:2]
    wait_for(lambda: round_of(victim) >= 8, 180, "the victim to reach round 8", swarm.peers)
    victim.kill()
    killed_at = time.time()
    rounds_at_kill = [round_of(p) for p in survivors]
    # Survivors keep going: several rounds pass while the victim is dead (pushes to it time out
    # off the compute path, and its DHT record expires after the TTL).
    wait_for(
        lambda: all(round_of(p) >= r + 8 for p, r in zip(survivors, rounds_at_kill, strict=True)),
        120,
        "survivors to advance 8 rounds after the kill",
        swarm.peers,
    )
    stalled = time.time() - killed_at
    checkpoint_round = int(final_params(victim.work_dir) is not None)
    assert checkpoint_round == 1, "the victim left a readable checkpoint"
    swarm.restart_peer(victim)
    wait_for(
        lambda: len(rounds_of_run(victim, 1)) >= 8, 240, "the restarted victim to train 8 rounds", swarm.peers
    )
    stop_gracefully(swarm.peers)
    records = victim.metrics()
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resumed"] is True, starts
    survivor_final = np.mean([round_records(p)[-1]["eval_loss"] for p in survivors])
    victim_final = round_records(victim)[-1]["eval_loss"]
    print(
        f"survivors advanced 8 rounds in {stalled:.1f} s; final losses {survivor_final:.3f} vs {victim_final:.3f}"
    )
    assert abs(victim_final - survivor_final) < 0.25


def test_late_joiner_downloads_state_and_catches_up(make_swarm):
    """A 4th peer joining mid-run downloads a live peer's state and trains at the swarm's level at once."""
    swarm = make_swarm(["--rounds", "0", "--inner-steps", "8", "--min-peers", "3"])  # until stopped
    for index in range(3):
        swarm.start_peer(swarm.add_peer(shard=index, num_shards=4), wait=index == 0)
    wait_for(lambda: min(round_of(p) for p in swarm.peers) >= 12, 180, "round 12", swarm.peers)
    joiner = swarm.add_peer(shard=3, num_shards=4)
    swarm.start_peer(joiner)
    wait_for(lambda: len(round_records(joiner)) >= 10, 240, "the joiner to train 10 rounds", swarm.peers)
    stop_gracefully(swarm.peers)
    records = joiner.metrics()
    downloads = [r for r in records if r.get("event") == "state_download"]
    assert downloads and downloads[0]["reason"] == "join" and downloads[0]["round"] >= 10, records[:3]
    assert downloads[0]["via"] == "lane", downloads  # the chunks took the direct, sealed lane
    start = next(r for r in records if r.get("event") == "start")
    first_round = round_records(joiner)[0]
    # Within its first round the joiner is far below the untrained loss it started from.
    assert first_round["eval_loss"] < start["initial_eval_loss"] - 1.0
    others = np.mean([round_records(p)[-1]["eval_loss"] for p in swarm.peers[:3]])
    assert abs(round_records(joiner)[-1]["eval_loss"] - others) < 0.25
    vectors = [final_params(p.work_dir) for p in swarm.peers]
    assert consensus_distance(vectors) < 0.15  # stopped mid-run: a round's updates may be in flight


def test_forged_tampered_replayed_messages_are_rejected_and_training_continues(make_swarm):
    """Messages crafted by another process are refused with the right reason and counted; the peer trains on."""
    import json
    import subprocess
    import sys

    # Open: the prober is a stranger here, and the envelope rules are what this test is about
    # (an admitted swarm ignores a stranger's messages before their payload is looked at).
    swarm = make_swarm(["--rounds", "1000", "--inner-steps", "30"], run_id="probe-run", admitted=False)
    peer = swarm.add_peer(shard=0, num_shards=1)
    swarm.start_peer(peer)
    wait_for(lambda: round_of(peer) >= 1, 120, "first round", [peer])
    numel = next(r for r in peer.metrics() if r.get("event") == "start")["params"]
    maddr = peer.status()["maddrs"][0]
    expected = {
        "valid": ["ok"],
        "replayed": ["ok", "replay"],
        "forged": ["bad_signature"],
        "tampered": ["bad_signature"],
        "wrong-run": ["wrong_run"],
        "garbage": ["malformed"],
        "oversize": ["oversize"],
    }
    # One prober process (its own libp2p host) sends every case in turn.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pfm.daemon.probe",
            "--peer",
            maddr,
            "--run-id",
            "probe-run",
            "--numel",
            str(numel),
            "--case",
            *expected,
            "--round-from",
            str(peer.work_dir / "status.json"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            answer = json.loads(line)
            outcomes.setdefault(answer["case"], []).append("ok" if answer["ok"] else answer["reason"])
    assert outcomes == expected
    # The state and params streams serve only state requests: any other signed message gets a typed
    # refusal with its reason (before, the state stream sent its whole snapshot for any valid kind).
    for stream in ("state", "params"):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "p2pfm.daemon.probe",
                "--peer",
                maddr,
                "--run-id",
                "probe-run",
                "--numel",
                str(numel),
                "--case",
                "announce",
                "garbage",
                "--stream",
                stream,
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        assert [(a["case"], a["ok"], a.get("reason")) for a in answers] == [
            ("announce", False, "wrong_kind"),
            ("garbage", False, "malformed"),
        ], (stream, answers)
    round_after_attacks = round_of(peer)
    wait_for(lambda: round_of(peer) >= round_after_attacks + 2, 120, "training to continue", [peer])
    rejected = round_records(peer)[-1]["messages_rejected"]
    assert rejected.get("bad_signature") == 2 and rejected.get("replay") == 1
    assert rejected.get("wrong_run") == 1 and rejected.get("malformed") == 3 and rejected.get("oversize") == 1
    assert rejected.get("wrong_kind") == 2
    assert peer.alive
    peer.signal_group(signal.SIGTERM)
    peer.process.wait(60)
    assert peer.process.returncode == 0
