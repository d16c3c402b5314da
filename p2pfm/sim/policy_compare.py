"""``p2pfm sim policies SCENARIO.toml``: one scenario under each energy policy of ``policy.compare``.

Same seed, devices, availability and grid; only the rules of the peers' gate change. Output:
``policies.json``, ``policies.md`` (the table: time to the target loss, best and final loss, energy,
carbon at the grid's hourly intensity, the datacentre baseline, carbon saved and time-to-loss
cost against ``always``), ``policies.png`` (loss over time; carbon against time to target), and
each policy's own results in ``<policy>/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from p2pfm.config import ConfigError
from p2pfm.sim.policy_model import with_rules
from p2pfm.sim.report import tidy
from p2pfm.sim.run import simulate
from p2pfm.sim.scenario import Scenario


def under_policy(scenario: Scenario, entry: str) -> Scenario:
    assert scenario.policy is not None
    policy = dataclasses.replace(scenario.policy, gate=with_rules(scenario.policy.gate, entry))
    return dataclasses.replace(scenario, policy=policy, name=f"{scenario.name}-{slug(entry)}")


def slug(entry: str) -> str:
    return entry.replace(",", "+")


def run_policies(scenario: Scenario, out: Path, *, progress: bool = False) -> dict[str, Any]:
    if scenario.policy is None:
        raise ConfigError(
            f"{scenario.name}: `sim policies` needs a [policy] table (see sim/scenarios/mlp100-policies.toml)"
        )
    out.mkdir(parents=True, exist_ok=True)
    runs, curves = [], {}
    for entry in scenario.policy.compare:
        sim, summary = simulate(under_policy(scenario, entry), out / slug(entry), progress=progress)
        policy = summary["policy"]
        measured = [
            (row["mean_loss"], row["time_s"]) for row in sim.metrics.rows if math.isfinite(row["mean_loss"])
        ]
        best = min(measured, default=(None, None))
        runs.append({
            "best_loss": best[0], "best_loss_time_s": best[1],
            "policy": entry, "final_loss": summary["final_loss"], "final_loss_round": summary["final_loss_round"],
            "time_to_target_s": summary["time_to_target_s"], "peer_rounds": summary["peer_rounds_computed"],
            "pauses": policy["pauses"], "paused_peer_seconds": policy["paused_peer_seconds"],
            "energy_wh": policy["energy_wh"], "carbon_g": policy["carbon_g"],
            "mean_grid_g_per_kwh": policy["mean_grid_g_per_kwh"],
            "datacenter_energy_wh": summary["datacenter_energy_wh"], "datacenter_carbon_g": summary["datacenter_carbon_g"],
        })  # fmt: skip
        curves[entry] = [(row["time_s"], row["mean_loss"]) for row in sim.metrics.rows]
    base = next((r for r in runs if r["policy"] == "always"), runs[0])
    for run in runs:
        run["carbon_saved"] = 1.0 - run["carbon_g"] / base["carbon_g"] if base["carbon_g"] else None
        t, t0 = run["time_to_target_s"], base["time_to_target_s"]
        run["time_to_target_cost"] = t / t0 - 1.0 if t is not None and t0 else None
    result = tidy({
        "scenario": scenario.name, "seed": scenario.seed, "peers": scenario.peers, "rounds": scenario.rounds,
        "target_loss": scenario.target_loss, "baseline": base["policy"],
        "virtual_seconds": scenario.rounds * sim.round_seconds,  # the same round deadline in every run
        "grid_source": scenario.policy.grid_source, "grid_curve": list(scenario.policy.grid_curve),
        "runs": runs,
    })  # fmt: skip
    (out / "policies.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / "policies.md").write_text(policies_table(result) + "\n")
    plot_policies(result, curves, out / "policies.png")
    return result


def _fmt(value: Any, spec: str, none: str = "not reached") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def policies_table(result: dict[str, Any]) -> str:
    """The markdown table of a comparison (README and sim/results print this)."""
    lines = [
        f"| policy | time to loss {result['target_loss']} (s) | cost vs always | best loss | final loss | "
        "peer-rounds | energy (Wh) | carbon (g) | mean grid (g/kWh) | carbon saved | datacentre (g) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        lines.append(
            f"| `{r['policy']}` | {_fmt(r['time_to_target_s'], '.1f')} | {_fmt(r['time_to_target_cost'], '+.0%', '-')} | "
            f"{_fmt(r['best_loss'], '.3f')} | {_fmt(r['final_loss'], '.3f')} | {r['peer_rounds']} | {_fmt(r['energy_wh'], '.3f')} | "
            f"{_fmt(r['carbon_g'], '.3f')} | {_fmt(r['mean_grid_g_per_kwh'], '.0f', '-')} | "
            f"{_fmt(r['carbon_saved'], '+.0%', '-')} | {_fmt(r['datacenter_carbon_g'], '.2g')} |"
        )
    return "\n".join(lines)


def plot_policies(result: dict[str, Any], curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for entry, points in curves.items():
        finite = [(t, loss) for t, loss in points if math.isfinite(loss)]
        left.plot([t for t, _ in finite], [loss for _, loss in finite], label=entry)
    if result["target_loss"] is not None:
        left.axhline(result["target_loss"], color="grey", linestyle=":", label="target")
    left.set(xlabel="virtual time (s)", ylabel="mean eval loss (ready peers)", title="loss by policy")
    left.legend(fontsize=8)
    for run in result["runs"]:
        reached = run["time_to_target_s"] is not None
        x = run["time_to_target_s"] if reached else result["virtual_seconds"]
        right.scatter([x], [run["carbon_g"]], marker="o" if reached else "x")
        right.annotate(run["policy"], (x, run["carbon_g"]), fontsize=8)
    right.set(xlabel="time to target loss (virtual s; x = not reached by the end)", ylabel="carbon (g CO2e)",
              title="carbon vs time to target")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
