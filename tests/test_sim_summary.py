"""summary.json says when its "final" figures were measured, and comparisons stay like with like."""

import csv
import json
import math

from p2pfm.sim.run import run_scenario, simulate
from p2pfm.sim.scenario import scenario_from_dict
from p2pfm.sim.sweep import common_round, sweep_table

ROUNDS, ROUND_S = 16, 0.25  # the run ends at t = 4.0 s; full evaluations after rounds 1, 5, 9, 13 and 16


def trace_scenario(tmp_path, ends_at: float, starts_at: float = 0.0):
    """Six peers replaying three devices that are all online over [starts_at, ends_at)."""
    trace = tmp_path / f"t-{starts_at:g}-{ends_at:g}.csv"
    trace.write_text("device,start_s,end_s\n" + "".join(f"{d},{starts_at},{ends_at}\n" for d in "abc"))
    return scenario_from_dict(
        {
            "name": "last-instant",
            "peers": 6,
            "rounds": ROUNDS,
            "seed": 5,
            "eval_every": 4,
            "round_seconds": ROUND_S,
            "workload": {"mlp": {"samples_per_peer": 64, "eval_samples": 128, "hidden": 16}},
            "gossip": {"inner_steps": 3, "sync_every": 4, "max_round_lag": 4},
            "churn": {"model": "trace", "trace": str(trace)},
        }
    )


def test_everyone_leaving_at_the_last_instant_is_recorded_and_flagged(tmp_path):
    """All peers leave at t = end: a NaN row for round 16, final figures from round 13, said so."""
    gone = tmp_path / "gone"
    sim, summary = simulate(trace_scenario(tmp_path, ends_at=ROUNDS * ROUND_S), gone, plots=False)
    last = sim.metrics.rows[-1]
    assert (last["round"], last["time_s"], last["online"], last["ready"]) == (16, 4.0, 0, 0)
    assert math.isnan(last["mean_loss"]) and math.isnan(last["consensus_distance"])
    with (gone / "metrics.csv").open() as handle:
        assert list(csv.DictReader(handle))[-1]["mean_loss"] == "nan"

    assert summary["final_loss_round"] == summary["consensus_distance_round"] == 13
    assert summary["final_loss_time_s"] == summary["consensus_distance_time_s"] == 3.25
    assert summary["final_is_last_round"] is False
    assert summary["online_at_end"] == summary["ready_at_end"] == 0
    assert summary["final_loss_peers"] == 6
    assert "round 16 of 16" in summary["note"] and "from round 13 (t = 3.25 s" in summary["note"]
    measured = sim.metrics.rows[-2]
    assert summary["final_loss"] == float(f"{measured['mean_loss']:.6g}")
    on_disk = json.loads((gone / "summary.json").read_text())
    assert on_disk["final_is_last_round"] is False and on_disk["final_loss_round"] == 13


def test_a_swarm_online_at_the_end_reports_the_last_round_and_no_note(tmp_path):
    """The control: the same peers staying past the end give the last round, no caveat, same history."""
    gone, _ = simulate(trace_scenario(tmp_path, ends_at=ROUNDS * ROUND_S))
    stay, summary = simulate(trace_scenario(tmp_path, ends_at=100.0))
    assert summary["final_loss_round"] == ROUNDS and summary["final_loss_time_s"] == ROUNDS * ROUND_S
    assert summary["final_is_last_round"] is True and summary["note"] is None
    assert summary["online_at_end"] == 6
    # Leaving at the very end changes nothing before it: the measured rows are identical.
    assert gone.metrics.rows[:-1] == stay.metrics.rows[:-1]


def test_no_measured_loss_at_all_gives_null_figures_and_says_why(tmp_path):
    """Nobody online during the run: every row is NaN, final figures are null, the note says so."""
    summary = run_scenario(trace_scenario(tmp_path, starts_at=50.0, ends_at=100.0))
    assert summary["final_loss"] is None and summary["final_loss_round"] is None
    assert summary["consensus_distance"] is None and summary["final_is_last_round"] is False
    assert "no loss was measured" in summary["note"]


def test_sweep_compares_points_at_the_last_round_they_all_measured():
    """common_round is the last shared measured round; the table says which and flags older finals."""
    assert common_round([{1: {}, 5: {}, 9: {}}, {1: {}, 5: {}, 9: {}, 13: {}}]) == 9
    assert common_round([{1: {}}, {5: {}}]) is None
    assert common_round([]) is None
    point = {
        "churn_rate": 0.0,
        "final_loss": 0.7,
        "final_loss_round": 13,
        "loss_at_compare_round": 0.7,
        "loss_vs_no_churn": 0.0,
        "mean_online_fraction": 0.9,
        "catchup_median_rounds": None,
        "energy_wh": 1.0,
        "carbon_g": 1.0,
    }
    result = {"scenario": "s", "peers": 6, "rounds": 16, "seed": 1, "every_rounds": 4, "compare_round": 13}
    table = sweep_table(dict(result, points=[point]))
    assert "losses at round 13 of 16, the last round every rate measured" in table
    assert "rate 0: no peer online at the end; last measured loss 0.7000 at round 13" in table
    ended = dict(point, final_loss_round=16)
    table = sweep_table(dict(result, compare_round=16, points=[ended]))
    assert "losses at round 16, the last" in table and "no peer online" not in table
