"""The swarm summary: losses, bytes per run of each peer, and consensus from final checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from p2pfm.daemon.checkpoint import CHECKPOINT_NAME, save_checkpoint
from p2pfm.swarm import PeerProcess, consensus_distance, final_params, summarize

NUMEL = 1000

SUMMARY_KEYS = {
    "peers",
    "rounds",
    "params",
    "initial_eval_loss",
    "final_eval_loss",
    "final_eval_loss_per_peer",
    "bytes_sent_total",
    "bits_per_param_per_round",
    "update_bits_per_param_per_round",
    "sync_bits_per_param_per_round",
    "consensus_distance",
    "messages_rejected",
    "messages_ignored",
    "data_split",
    "wall_seconds",
    # energy (p2pfm.energy): totals, per peer, and the datacentre baseline
    "energy_wh",
    "marginal_wh",
    "carbon_g",
    "marginal_carbon_g",
    "tokens",
    "j_per_token",
    "marginal_j_per_token",
    "energy_source",
    "energy_per_peer",
    "datacenter_energy_wh",
    "datacenter_carbon_g",
    "datacenter_embodied_g",
    "datacenter_mfu",
    "edge_to_datacenter_carbon",
}


def start(initial_eval_loss: float) -> dict:
    return {"event": "start", "round": 0, "params": NUMEL, "initial_eval_loss": initial_eval_loss}


def round_record(
    number: int, *, sent: int, update: int, sync: int, eval_loss: float, rejected=None, energy=(0.0, 0)
) -> dict:
    """Counters are cumulative since the process started, as the daemon writes them."""
    wh, tokens = energy
    return {
        "step": number * 10,
        "energy_wh": wh,
        "marginal_wh": wh / 2,
        "carbon_g": wh / 1000 * 475.0,
        "marginal_carbon_g": wh / 2000 * 475.0,
        "tokens": tokens,
        "energy_source": "modelled:profile",
        "event": "round",
        "round": number,
        "eval_loss": eval_loss,
        "bytes_sent": sent,
        "update_bytes_sent": update,
        "sync_bytes_sent": sync,
        "messages_rejected": rejected or {},
        "wall_time": float(number),
    }


def make_peer(root, index: int, records: list[dict], params: np.ndarray | None = None) -> PeerProcess:
    """A peer's work dir as a finished run leaves it; the process is never started."""
    work_dir = root / f"peer-{index}"
    work_dir.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (work_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if params is not None:
        save_checkpoint(work_dir, {"params": params.astype(np.float32)}, {"round": 2})
    return PeerProcess(index=index, work_dir=work_dir, args=[], env={})


@pytest.fixture
def two_peers(tmp_path) -> list[PeerProcess]:
    """Peer 0 runs once; peer 1 is restarted after round 1, so its counters restart from zero."""
    peer0 = make_peer(
        tmp_path,
        0,
        [
            start(5.5),
            round_record(
                1,
                sent=100,
                update=80,
                sync=0,
                eval_loss=5.0,
                rejected={"bad_signature": 1},
                energy=(1.0, 1000),
            ),
            round_record(
                2,
                sent=250,
                update=200,
                sync=20,
                eval_loss=4.5,
                rejected={"bad_signature": 2},
                energy=(2.0, 2000),
            ),
        ],
        params=np.ones(NUMEL),
    )
    peer1 = make_peer(
        tmp_path,
        1,
        [
            start(5.7),
            round_record(
                1, sent=100, update=90, sync=0, eval_loss=5.1, rejected={"replay": 1}, energy=(0.5, 1000)
            ),
            start(4.8),  # restart: resumes from the checkpoint, counters from zero
            {
                **round_record(
                    2, sent=40, update=30, sync=10, eval_loss=4.7, rejected={"replay": 3}, energy=(0.25, 1000)
                ),
                "messages_ignored": {"stale_round": 4},
            },
            {"event": "drain", "round": 2, "applied": 1, "eval_loss": 4.6},
        ],
        params=np.full(NUMEL, 3.0),
    )
    return [peer0, peer1]


def test_consensus_distance_of_identical_vectors_is_zero():
    """Peers with the same parameters are at distance 0."""
    v = np.arange(10, dtype=np.float32)
    assert consensus_distance([v, v.copy(), v.copy()]) == 0.0


def test_consensus_distance_known_example():
    """[0, 0] and [2, 0]: mean [1, 0], each at distance 1, over |mean| = 1 -> 1.0."""
    assert consensus_distance([np.array([0.0, 0.0]), np.array([2.0, 0.0])]) == pytest.approx(1.0)
    # [1, 1, 1, 1] and [3, 3, 3, 3]: distances 2 each, |mean| = 4 -> 0.5
    assert consensus_distance([np.ones(4), np.full(4, 3.0)]) == pytest.approx(0.5)


def test_consensus_distance_is_scale_invariant():
    """Scaling every vector leaves the relative distance unchanged."""
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(50) for _ in range(4)]
    assert consensus_distance(vectors) == pytest.approx(consensus_distance([10 * v for v in vectors]))


def test_consensus_distance_of_one_or_no_peer():
    """One peer is trivially in consensus; no peers gives None."""
    assert consensus_distance([np.ones(3)]) == 0.0
    assert consensus_distance([]) is None


def test_consensus_distance_with_zero_mean_stays_finite():
    """Opposite vectors (mean 0) do not divide by zero."""
    assert math.isfinite(consensus_distance([np.ones(3), -np.ones(3)]))


def test_summary_has_expected_keys_and_numbers(two_peers):
    """summarize() gives losses, bytes summed per run, bits per param and consensus."""
    summary = summarize(two_peers, wall_seconds=12.5)
    assert set(summary) == SUMMARY_KEYS
    assert summary["peers"] == 2
    assert summary["rounds"] == 2
    assert summary["params"] == NUMEL
    assert summary["wall_seconds"] == 12.5
    # the first start record of each peer: (5.5 + 5.7) / 2
    assert summary["initial_eval_loss"] == pytest.approx(5.6)
    # last evaluated record, drains included
    assert summary["final_eval_loss_per_peer"] == {"0": 4.5, "1": 4.6}
    assert summary["final_eval_loss"] == pytest.approx(4.55)
    # consensus over final checkpoints [1...] and [3...]
    assert summary["consensus_distance"] == pytest.approx(0.5)


def test_summary_sums_counters_over_the_runs_of_a_restarted_peer(two_peers):
    """A restarted peer's counters restart at zero: the last record of each run is summed."""
    summary = summarize(two_peers, wall_seconds=1.0)
    # peer 0: 250; peer 1: 100 (first run) + 40 (second run)
    assert summary["bytes_sent_total"] == 250 + 100 + 40
    update, sync, peer_rounds = 200 + 90 + 30, 20 + 0 + 10, 4
    assert summary["update_bits_per_param_per_round"] == pytest.approx(8 * update / NUMEL / peer_rounds)
    assert summary["sync_bits_per_param_per_round"] == pytest.approx(8 * sync / NUMEL / peer_rounds)
    assert summary["bits_per_param_per_round"] == pytest.approx(8 * (update + sync) / NUMEL / peer_rounds)
    assert summary["messages_rejected"] == {"bad_signature": 2, "replay": 1 + 3}
    assert summary["messages_ignored"] == {"stale_round": 4}


def test_summary_of_alive_at_end_only_counts_survivors_for_losses_and_consensus(two_peers):
    """Peers not alive at the end are left out of final losses and consensus, not out of bytes."""
    summary = summarize(two_peers, wall_seconds=1.0, alive_at_end=[0])
    assert summary["final_eval_loss_per_peer"] == {"0": 4.5}
    assert summary["final_eval_loss"] == pytest.approx(4.5)
    assert summary["consensus_distance"] == 0.0  # one checkpoint left
    assert summary["bytes_sent_total"] == 390


def test_summary_reports_the_byte_split_of_each_peer(tmp_path):
    """The start events' byte counts become data_split; a restarted peer counts its latest start."""
    sizes = {"corpus_bytes": 1000, "holdout_bytes": 50}
    peer0 = make_peer(tmp_path, 0, [{**start(5.0), **sizes, "shard_bytes": 310}])
    peer1 = make_peer(
        tmp_path, 1, [{**start(5.0), **sizes, "shard_bytes": 1}, {**start(4.0), **sizes, "shard_bytes": 320}]
    )
    peer2 = make_peer(tmp_path, 2, [start(5.0)])  # a user's own model: no byte counts
    summary = summarize([peer0, peer1, peer2], wall_seconds=1.0)
    assert summary["data_split"] == {
        "corpus_bytes": 1000,
        "holdout_bytes": 50,
        "shard_bytes": {"0": 310, "1": 320},
    }


def test_summary_tolerates_peers_without_metrics_or_checkpoint(tmp_path, two_peers):
    """A peer that never got going (no files) adds nothing and breaks nothing."""
    silent = PeerProcess(index=2, work_dir=tmp_path / "peer-2", args=[], env={})
    summary = summarize([*two_peers, silent], wall_seconds=1.0)
    assert summary["peers"] == 3
    assert summary["bytes_sent_total"] == 390
    assert summary["consensus_distance"] == pytest.approx(0.5)


def test_summary_skips_torn_last_line_and_non_finite_losses(tmp_path):
    """A crash-torn metrics line is skipped; NaN losses do not poison the mean."""
    peer0 = make_peer(tmp_path, 0, [start(5.0), round_record(1, sent=10, update=10, sync=0, eval_loss=4.0)])
    peer1 = make_peer(
        tmp_path, 1, [start(5.0), round_record(1, sent=10, update=10, sync=0, eval_loss=float("nan"))]
    )
    with (peer0.work_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"event": "round", "round": 2, "bytes_se')
    summary = summarize([peer0, peer1], wall_seconds=1.0)
    assert summary["rounds"] == 1
    assert summary["final_eval_loss"] == pytest.approx(4.0)
    assert summary["bytes_sent_total"] == 20
    assert summary["consensus_distance"] is None  # no checkpoints at all


def test_final_params_reads_checkpoint_and_ignores_corrupt_one(tmp_path):
    """final_params returns the checkpoint's params, or None if missing or corrupt."""
    work_dir = tmp_path / "w"
    assert final_params(work_dir) is None
    save_checkpoint(work_dir, {"params": np.arange(3, dtype=np.float32)}, {})
    assert np.array_equal(final_params(work_dir), [0, 1, 2])
    (work_dir / CHECKPOINT_NAME).write_bytes(b"junk")
    assert final_params(work_dir) is None


def test_peer_process_is_not_alive_before_start(tmp_path):
    """A PeerProcess built without starting it has no process and reports no status."""
    peer = PeerProcess(index=0, work_dir=tmp_path, args=[], env={})
    assert not peer.alive
    assert peer.status() == {}
    assert peer.log_path == tmp_path / "peer.log"
    assert peer.stop() is None


def test_energy_sums_each_peers_runs_and_sets_the_datacentre_beside(two_peers):
    """Energy per peer is the last record of each run (process life), summed; totals, J/token, source."""
    summary = summarize(two_peers, wall_seconds=1.0)
    per_peer = summary["energy_per_peer"]
    assert per_peer["0"]["energy_wh"] == pytest.approx(2.0) and per_peer["0"]["tokens"] == 2000
    assert per_peer["1"]["energy_wh"] == pytest.approx(0.75) and per_peer["1"]["tokens"] == 2000  # 0.5 + 0.25
    assert summary["energy_wh"] == pytest.approx(2.75) and summary["tokens"] == 4000
    assert summary["marginal_wh"] == pytest.approx(1.375)
    assert summary["carbon_g"] == pytest.approx(2.75 / 1000 * 475.0)
    assert summary["j_per_token"] == pytest.approx(2.75 * 3600 / 4000)
    assert summary["energy_source"] == "modelled:profile"
    assert summary["datacenter_carbon_g"] > 0 and 0 < summary["datacenter_mfu"] < 0.45
    assert summary["edge_to_datacenter_carbon"] == pytest.approx(
        summary["carbon_g"] / summary["datacenter_carbon_g"]
    )
