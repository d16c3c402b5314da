"""Churn-resilience curves: one scenario at several churn rates.

The churn rate r is "fraction r of the peers leave (and come back later) every
``churn.every_rounds`` rounds": each point runs the scenario with ``churn.model =
"fraction"`` and ``churn.fraction = r`` (r = 0 is no churn), same seed, same everything else.
Output: ``sweep.json``, ``sweep.md`` (a table) and ``churn_curve.png`` (final loss vs rate),
plus each point's own results and plots in ``rate_<r>/``.

Like with like: losses are compared at ``compare_round``, the last evaluation round at which
every point measured a loss. That is the scenario's last round unless some point had nobody
online at the end; each point also keeps its own last measured ``final_loss`` and its round.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from p2pfm.config import ConfigError
from p2pfm.sim.report import tidy
from p2pfm.sim.run import simulate
from p2pfm.sim.scenario import Scenario


def parse_rates(text: str) -> list[float]:
    """``"0,0.1,0.3"`` -> [0.0, 0.1, 0.3]; each in [0, 1)."""
    rates = []
    for item in text.split(","):
        try:
            rate = float(item)
        except ValueError:
            raise ConfigError(f"--churn-rates: {item.strip()!r} is not a number") from None
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"--churn-rates: {rate:g} is outside [0, 1)")
        rates.append(rate)
    if not rates:
        raise ConfigError("--churn-rates: give at least one rate")
    return rates


def at_rate(scenario: Scenario, rate: float) -> Scenario:
    churn = dataclasses.replace(scenario.churn, model="fraction" if rate > 0 else "none", fraction=rate)
    return dataclasses.replace(scenario, churn=churn, name=f"{scenario.name}-churn{rate:g}")


def common_round(curves: list[dict[int, dict[str, Any]]]) -> int | None:
    """The last round present in every curve (round -> metrics row with a measured loss), or None."""
    if not curves:
        return None
    shared = set(curves[0])
    for curve in curves[1:]:
        shared &= set(curve)
    return max(shared) if shared else None


def run_sweep(scenario: Scenario, rates: list[float], out: Path, *, progress: bool = False) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    points = []
    curves = []
    for rate in rates:
        sim, summary = simulate(
            at_rate(scenario, rate), out / f"rate_{rate:g}", progress=progress, plots=True
        )
        curves.append({row["round"]: row for row in sim.metrics.rows if math.isfinite(row["mean_loss"])})
        points.append(
            {
                "churn_rate": rate,
                "final_loss": summary["final_loss"],
                "final_loss_round": summary["final_loss_round"],
                "final_is_last_round": summary["final_is_last_round"],
                "consensus_distance": summary["consensus_distance"],
                "energy_wh": summary["energy_wh"],
                "carbon_g": summary["carbon_g"],
                "bytes_sent_total": summary["bytes_sent_total"],
                "mean_online_fraction": summary["mean_online_fraction"],
                "catchup_median_rounds": summary["rejoin_catchup_rounds"]["median"],
                "catchup_within_1_round": summary["rejoin_catchup_rounds"]["within_1_round"],
            }
        )
    compare = common_round(curves)
    for point, curve in zip(points, curves, strict=True):
        row = curve.get(compare, {}) if compare is not None else {}
        # Rounded as summary.json rounds, so a sweep whose points all end measured gives
        # exactly the numbers of their summaries.
        point["loss_at_compare_round"] = tidy(row.get("mean_loss"))
        point["consensus_at_compare_round"] = tidy(row.get("consensus_distance"))
    baseline = next((p["loss_at_compare_round"] for p in points if p["churn_rate"] == 0), None)
    for point in points:
        loss = point["loss_at_compare_round"]
        point["loss_vs_no_churn"] = (loss / baseline - 1.0) if baseline and loss is not None else None
    result = {
        "scenario": scenario.name,
        "seed": scenario.seed,
        "peers": scenario.peers,
        "rounds": scenario.rounds,
        "every_rounds": scenario.churn.every_rounds,
        "compare_round": compare,
        "points": points,
    }
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sweep.md").write_text(sweep_table(result))
    _plot(result, out / "churn_curve.png")
    return result


def sweep_table(result: dict[str, Any]) -> str:
    """Markdown: each rate's loss at the common round; a line per point whose final figure is older."""
    compare = result.get("compare_round")
    if compare is None:
        at = "no round at which every rate measured a loss, so none are compared"
    elif compare == result["rounds"]:
        at = f"losses at round {compare}, the last"
    else:
        at = f"losses at round {compare} of {result['rounds']}, the last round every rate measured"
    lines = [
        f"Churn sweep of `{result['scenario']}` ({result['peers']} peers, {result['rounds']} rounds, seed {result['seed']}; "
        f"rate = fraction of peers leaving and rejoining every {result['every_rounds']} rounds; {at})",
        "",
        "| churn rate | final loss | vs no churn | online | catch-up (median rounds) | energy (Wh) | carbon (g) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for p in result["points"]:
        delta = "" if p["loss_vs_no_churn"] is None else f"{100 * p['loss_vs_no_churn']:+.2f}%"
        catch = "-" if p["catchup_median_rounds"] is None else f"{p['catchup_median_rounds']:g}"
        loss = "-" if p["loss_at_compare_round"] is None else f"{p['loss_at_compare_round']:.4f}"
        lines.append(
            f"| {p['churn_rate']:g} | {loss} | {delta} | {100 * p['mean_online_fraction']:.0f}% | {catch} "
            f"| {p['energy_wh']:.3g} | {p['carbon_g']:.3g} |"
        )
        if p["final_loss_round"] != result["rounds"]:
            last = (
                "never"
                if p["final_loss"] is None
                else f"{p['final_loss']:.4f} at round {p['final_loss_round']}"
            )
            notes.append(f"- rate {p['churn_rate']:g}: no peer online at the end; last measured loss {last}")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [p["churn_rate"] for p in result["points"]]
    losses = [
        math.nan if p["loss_at_compare_round"] is None else p["loss_at_compare_round"]
        for p in result["points"]
    ]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=80)
    ax.plot(rates, losses, marker="o")
    if result["points"] and result["points"][0]["churn_rate"] == 0:
        ax.axhline(losses[0] * 1.02, color="gray", linestyle="--", label="no churn + 2%")
        ax.legend()
    ax.set_xlabel(f"fraction of peers leaving/rejoining every {result['every_rounds']} rounds")
    ax.set_ylabel(f"held-out loss at round {result.get('compare_round')}")
    ax.set_title(f"{result['scenario']}: churn resilience")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
