"""Energy policies in the simulator: the core's gate drives simulated peers, deterministically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from p2pfm.config import ConfigError
from p2pfm.sim.energy import account
from p2pfm.sim.engine import Simulation
from p2pfm.sim.policy_compare import run_policies
from p2pfm.sim.run import run_scenario
from p2pfm.sim.scenario import load_scenario, scenario_from_dict
from tests.test_sim_engine import REPO

DAY = 8.0  # virtual seconds: 32 rounds of 0.25 s
GRID = [400.0] * 6 + [200.0] * 12 + [400.0] * 6  # clean from 06:00 to 17:59
PHONE = {
    "battery": True,
    "plugged_curve": [0.9] * 6 + [0.3] * 12 + [0.9] * 6,
    "busy_curve": [0.0] * 6 + [0.5] * 12 + [0.0] * 6,
}
BASE = {
    "name": "policy-tiny",
    "peers": 12,
    "rounds": 64,
    "seed": 3,
    "round_seconds": 0.25,
    "eval_every": 8,
    "target_loss": 2.0,
    "verify_signatures": False,
    "workload": {"mlp": {"samples_per_peer": 64, "eval_samples": 128, "hidden": 16}},
    "gossip": {"inner_steps": 3, "max_round_lag": 4},
    "devices": {"mix": {"phone": 0.5, "raspberry_pi_4": 0.5}},
    "churn": {"model": "diurnal", "day_length_s": DAY, "timezone_spread_h": 0},
    "policy": {
        "grid_curve": GRID,
        "compare": ["always", "plugged-in", "carbon-aware", "plugged-in,idle-only"],
        "gate": {"carbon_threshold": 300.0, "region": "DEU", "min_run_s": 0.0, "min_pause_s": 0.0},
        "devices": {"phone": PHONE},
    },
}


def scenario(rules: list[str] | None = None, **changes):
    values = json.loads(json.dumps(BASE))
    values.update(changes)
    if rules is not None:
        values["policy"]["gate"]["rules"] = rules
    return scenario_from_dict(values)


def test_policy_runs_replay_from_the_seed(tmp_path):
    """Same scenario, policy and seed: byte-identical results; pauses did happen."""
    sc = scenario(["plugged-in", "idle-only", "carbon-aware"])
    run_scenario(sc, tmp_path / "a", plots=False)
    run_scenario(sc, tmp_path / "b", plots=False)
    for name in ("summary.json", "metrics.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["policy"]["pauses"] > 0 and summary["policy"]["resumes"] > 0
    other = run_scenario(sc.with_changes(seed=4))
    assert other["policy"] != summary["policy"]


def test_a_policy_table_with_always_leaves_the_run_as_it_was():
    """The policy stream is a new child of the seed: `always` trains exactly as no [policy] table."""
    with_table = run_scenario(scenario(["always"]))
    without = run_scenario(scenario_from_dict({k: v for k, v in BASE.items() if k != "policy"}))
    assert with_table.pop("policy")["pauses"] == 0
    assert with_table == without


def test_carbon_aware_peers_train_only_on_a_clean_grid():
    """Every round computed under carbon-aware starts in the clean hours, and never on a paused peer."""
    sim = Simulation(scenario(["carbon-aware"]))
    computed_at: list[float] = []
    original = sim._on_compute_done

    def spy(peer, session):
        if sim.session[peer] == session and sim.local[peer] is not None:
            assert not sim.paused[peer]
            computed_at.append(sim.now)
        original(peer, session)

    sim._on_compute_done = spy
    sim.run()
    hours = [(t / DAY * 24) % 24 for t in computed_at]
    assert computed_at and all(6 <= h < 18 for h in hours)
    assert sim.metrics.pauses > 0 and sim.metrics.resumes > 0


def test_paused_peers_are_never_chosen_as_partners():
    sim = Simulation(scenario(["plugged-in", "idle-only"]))
    pick = sim._pick
    seen_paused = []

    def spy_pick(peer, pool, count):
        chosen = pick(peer, pool, count)
        seen_paused.extend(p for p in chosen if sim.paused[p])
        return chosen

    sim._pick = spy_pick
    sim.run()
    assert sim.metrics.pauses > 0 and seen_paused == []


def test_hourly_ledger_matches_the_energy_model():
    """The ledger's energy is energy.account's (same formula, charged round by round)."""
    for rules in (["always"], ["plugged-in", "carbon-aware"]):
        sim = Simulation(scenario(rules)).run()
        sc = sim.scenario
        report = account(
            sc.energy, sim.profiles, sim.device_of, sim.compute_s, sim.online_s, sim.bytes_sent,
            sim.bytes_received, useful_steps=0.0, flops_per_step=1.0,
        )  # fmt: skip
        assert sim.ledger.energy_j / 3600.0 == pytest.approx(report.energy_wh, rel=0.01)
        # Carbon at hourly intensity lies between the curve's extremes times the energy.
        kwh = sim.ledger.energy_j / 3.6e6
        assert 200.0 * kwh - 1e-12 <= sim.ledger.carbon_g <= 400.0 * kwh + 1e-12


def test_compare_writes_table_plot_and_saves_carbon(tmp_path):
    result = run_policies(scenario(), tmp_path)
    runs = {r["policy"]: r for r in result["runs"]}
    assert list(runs) == BASE["policy"]["compare"]
    assert runs["always"]["carbon_saved"] == 0.0
    assert runs["carbon-aware"]["carbon_g"] < runs["always"]["carbon_g"]
    # Clean hours are 200 g/kWh; rounds that straddle 18:00 (an hour is 1.3 rounds here) are charged 400.
    assert runs["carbon-aware"]["mean_grid_g_per_kwh"] < 250.0 < runs["always"]["mean_grid_g_per_kwh"]
    assert runs["plugged-in"]["peer_rounds"] < runs["always"]["peer_rounds"]
    for name in ("policies.json", "policies.md", "policies.png", "always/summary.json"):
        assert (tmp_path / name).exists()
    assert "| `carbon-aware` |" in (tmp_path / "policies.md").read_text()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: p.update(grid_curve=[300.0] * 23), "policy.grid_curve"),
        (lambda p: p.update(compare=["always", "sunny"]), "policy.compare"),
        (lambda p: p["devices"]["phone"].update(plugged_curve=[1.5] * 24), "policy.devices.plugged_curve"),
        (lambda p: p["gate"].update(rules=["nope"]), "policy.rules"),
    ],
)
def test_policy_table_is_strict(change, field):
    values = json.loads(json.dumps(BASE))
    change(values["policy"])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        scenario_from_dict(values)


def test_shipped_policy_scenario_loads():
    sc = load_scenario(REPO / "sim" / "scenarios" / "mlp100-policies.toml")
    assert sc.policy is not None and len(sc.policy.grid_curve) == 24
    assert np.mean(sc.policy.grid_curve) == pytest.approx(381.0, abs=1.0)


def test_readme_policy_table_is_the_recorded_one():
    """README's policy comparison is sim/results/mlp100-policies/policies.md, as recorded."""
    recorded = (REPO / "sim" / "results" / "mlp100-policies" / "policies.md").read_text().strip()
    assert recorded in (REPO / "README.md").read_text()
    result = json.loads((REPO / "sim" / "results" / "mlp100-policies" / "policies.json").read_text())
    from p2pfm.sim.policy_compare import policies_table

    assert policies_table(result) == recorded
