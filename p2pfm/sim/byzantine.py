"""Aggregation rules against Byzantine peers: every (rule, attack, fraction), one seed.

Each point runs the base scenario with ``gossip.aggregation = rule`` and a ``[byzantine]``
table (``fraction`` of the peers play ``attack`` at its default strength), and records the
honest peers' final held-out loss (:mod:`p2pfm.sim.adversary`; the attackers' own models are
left out). Fraction 0 is run once per rule: the honest-only loss every attack is compared to
(``ratio`` = honest final loss / honest-only final loss of the same rule). Same seed
everywhere, so the attackers at 10 % are among those at 20 % and the data, devices and
partner choices are those of the honest-only run.

Output (``out``): ``results.json`` (the rows), ``table.md`` (loss by fraction for each attack
and rule, and a robustness summary per rule) and ``plot.png`` (ratio vs fraction, one panel per
attack). ``p2pfm sim byzantine`` is the command.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.config import ConfigError
from p2pfm.core.aggregation import AGGREGATIONS
from p2pfm.core.gossip import GossipConfig
from p2pfm.sim.run import simulate
from p2pfm.sim.scenario import SIM_ATTACKS, ByzantineConfig, Scenario, scenario_from_dict

DEFAULT_RULES: tuple[str, ...] = ("mean", "clipped_mean", "trimmed_mean", "median")
DEFAULT_ATTACKS: tuple[str, ...] = (
    "sign_flip",
    "scaling",
    "noise",
    "constant_direction",
    "free_rider",
    "nan",
    "stale_replay",
    "many_rounds",
)
DEFAULT_FRACTIONS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)

# The default sweep: 4 rules x (1 + 8 attacks x 3 fractions) = 100 runs of ~2 s each on one core.
MLP_BASE: dict[str, Any] = {
    "name": "byzantine-mlp",
    "description": "the small MLP, 20 peers, 100 rounds, no churn: aggregation rules against attacks",
    "peers": 20,
    "rounds": 100,
    "seed": 1,
    "eval_every": 10,
}
# The daemon's GPT, shrunk as in sim/scenarios/gpt8-none.toml (~20 s a run: a slow sweep).
GPT_BASE: dict[str, Any] = {
    "name": "byzantine-gpt",
    "description": "the byte-level GPT (tiny), 8 peers, 60 rounds, no churn: aggregation rules against attacks",
    "peers": 8,
    "rounds": 60,
    "seed": 1,
    "eval_every": 5,
    "workload": {
        "kind": "gpt",
        "gpt": {
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
            "train": {"batch_size": 8, "eval_batch_size": 8, "max_shard_bytes": 262144},
        },
    },
    "gossip": {"inner_steps": 5, "sync_every": 5},
}

RATIO_CAP = 1000.0  # the plot's ceiling: a ratio beyond it, or a diverged run, is drawn there


def base_scenario(workload: str = "mlp") -> Scenario:
    """The built-in base of the sweep for ``workload`` (``mlp`` or ``gpt``)."""
    bases = {"mlp": MLP_BASE, "gpt": GPT_BASE}
    if workload not in bases:
        raise ConfigError(f"--workload: must be one of {', '.join(bases)}, got {workload!r}")
    return scenario_from_dict(json.loads(json.dumps(bases[workload])))


def parse_names(text: str, flag: str, known: tuple[str, ...] | list[str]) -> list[str]:
    """``"a,b"`` -> ["a", "b"], each in ``known``, no repeats."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    if not names:
        raise ConfigError(f"{flag}: give at least one name")
    for name in names:
        if name not in known:
            raise ConfigError(f"{flag}: {name!r} is not one of {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag}: a name is repeated")
    return names


def parse_fractions(text: str) -> list[float]:
    """``"0,0.1,0.3"`` -> [0.0, 0.1, 0.3]; each in [0, 0.5), ascending, no repeats."""
    fractions = []
    for item in text.split(","):
        try:
            fraction = float(item)
        except ValueError:
            raise ConfigError(f"--fractions: {item.strip()!r} is not a number") from None
        if not (math.isfinite(fraction) and 0.0 <= fraction < 0.5):
            raise ConfigError(f"--fractions: {fraction:g} is outside [0, 0.5)")
        fractions.append(fraction)
    if fractions != sorted(set(fractions)):
        raise ConfigError("--fractions: give distinct fractions in ascending order")
    return fractions


def point(base: Scenario, rule: str, attack: str, fraction: float) -> Scenario:
    """The base scenario with aggregation ``rule`` and ``fraction`` of its peers playing ``attack``."""
    gossip = dataclasses.replace(base.gossip, aggregation=rule)
    byzantine = ByzantineConfig(fraction=fraction, attack=attack)
    name = f"{base.name}-{rule}-{attack}-{fraction:g}"
    return dataclasses.replace(base, gossip=gossip, byzantine=byzantine, name=name)


def run_byzantine_sweep(
    base: Scenario,
    rules: list[str],
    attacks: list[str],
    fractions: list[float],
    out: Path | None = None,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every point; write results.json, table.md and plot.png under ``out`` (if given)."""
    for rule in rules:
        if rule not in AGGREGATIONS:
            raise ConfigError(f"rules: {rule!r} is not one of {', '.join(AGGREGATIONS)}")
    for attack in attacks:
        if attack not in SIM_ATTACKS:
            raise ConfigError(f"attacks: {attack!r} is not one of {', '.join(SIM_ATTACKS)}")
    attacked = [f for f in fractions if f > 0]
    jobs = [(rule, attacks[0], 0.0) for rule in rules] + [
        (rule, attack, fraction) for rule in rules for attack in attacks for fraction in attacked
    ]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="byzantine sweep", unit="run")
    runs: dict[tuple[str, str, float], dict[str, Any]] = {}
    # Poisoned models overflow float32 on purpose; the summaries say so, numpy need not warn.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for rule, attack, fraction in jobs:
            if bar is not None:
                bar.set_postfix_str(f"{rule} {attack} {fraction:g}")
            _, summary = simulate(point(base, rule, attack, fraction), None)
            runs[(rule, attack, fraction)] = summary
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    rows = []
    for rule in rules:
        honest_only = runs[(rule, attacks[0], 0.0)]["byzantine"]["honest_final_loss"]
        for attack in attacks:
            for fraction in fractions:
                summary = runs[(rule, attacks[0] if fraction == 0 else attack, fraction)]
                rows.append(_row(rule, attack, fraction, summary, honest_only))
    result = {
        "scenario": base.name,
        "workload": base.workload.kind,
        "seed": base.seed,
        "peers": base.peers,
        "rounds": base.rounds,
        "fanout": base.gossip.fanout,
        "codec": base.gossip.codec.name,
        "default_rule": GossipConfig().aggregation,
        "rules": rules,
        "attacks": attacks,
        "fractions": fractions,
        "scales": {attack: ByzantineConfig(attack=attack).resolved_scale for attack in attacks},
        "rows": rows,
        "robustness": robustness(rows, rules, fractions),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "table.md").write_text(byzantine_table(result))
        _plot(result, out / "plot.png")
    return result


def _row(rule: str, attack: str, fraction: float, summary: dict[str, Any], honest_only: float | None) -> dict:
    block = summary["byzantine"]
    loss = block["honest_final_loss"]  # None: diverged (or nobody honest measured)
    ratio = loss / honest_only if loss is not None and honest_only else None
    attackers = block["from_byzantine"]
    return {
        "rule": rule,
        "attack": attack,
        "fraction": fraction,
        "byzantine_peers": len(block["peers"]),
        "honest_final_loss": loss,
        "honest_only_final_loss": honest_only,
        "ratio": None if ratio is None else float(f"{ratio:.6g}"),
        "diverged": block["honest_diverged"],
        "rejected": block["rejected"],
        "ignored": block["ignored"],
        "byzantine_sent": attackers["sent"],
        # Passed every check and queued; a later claim of the same sender may still replace it.
        "byzantine_accepted": attackers["accepted"],
        "byzantine_refused": dict(sorted({**attackers["rejected"], **attackers["ignored"]}.items())),
    }


def robustness(rows: list[dict[str, Any]], rules: list[str], fractions: list[float]) -> list[dict[str, Any]]:
    """Per rule: honest-only loss, and the worst and the geometric-mean ratio over attacks at each fraction.

    A diverged point counts as ``RATIO_CAP`` (the worst the plot shows), so one blow-up is
    not averaged away and never turns into a missing value that flatters a rule.
    """
    summary = []
    for rule in rules:
        mine = [r for r in rows if r["rule"] == rule]
        entry: dict[str, Any] = {
            "rule": rule,
            "honest_only_final_loss": mine[0]["honest_only_final_loss"] if mine else None,
            "worst_ratio": {},
            "geomean_ratio": {},
        }
        for fraction in fractions:
            if fraction == 0:
                continue
            points = [r for r in mine if r["fraction"] == fraction]
            ratios = [min(r["ratio"], RATIO_CAP) if r["ratio"] is not None else RATIO_CAP for r in points]
            entry["worst_ratio"][f"{fraction:g}"] = float(f"{max(ratios):.6g}")
            entry["geomean_ratio"][f"{fraction:g}"] = float(f"{math.exp(np.mean(np.log(ratios))):.6g}")
        summary.append(entry)
    return summary


def _loss(value: float | None, diverged: bool) -> str:
    if value is None:
        return "diverged" if diverged else "-"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1e}"


def compact_table(result: dict[str, Any]) -> str:
    """Markdown, one row per attack and one column per rule: the losses at every fraction, "a / b / c"."""
    fractions = result["fractions"]
    attacked = [f for f in fractions if f > 0]
    rules = result["rules"]
    rows = result["rows"]
    cell = lambda r: _loss(r["honest_final_loss"], r["diverged"])  # noqa: E731
    lines = [
        "| attack (" + " / ".join(f"{100 * f:g} %" for f in attacked) + ") | " + " | ".join(rules) + " |",
        "| --- | " + " | ".join("---:" for _ in rules) + " |",
    ]
    if 0.0 in fractions:
        honest = [next(r for r in rows if r["rule"] == rule and r["fraction"] == 0) for rule in rules]
        lines.append("| none (honest only) | " + " | ".join(cell(r) for r in honest) + " |")
    for attack in result["attacks"]:
        cells = []
        for rule in rules:
            points = [r for r in rows if r["attack"] == attack and r["rule"] == rule and r["fraction"] > 0]
            cells.append(" / ".join(cell(r) for r in points))
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def byzantine_table(result: dict[str, Any]) -> str:
    """Markdown: the honest peers' final loss by fraction for every attack and rule, then per-rule
    robustness, then the same losses compact (:func:`compact_table`)."""
    fractions = result["fractions"]
    lines = [
        f"Honest peers' final held-out loss (mean over honest peers) with a fraction of Byzantine peers: "
        f"`{result['scenario']}` ({result['workload']}, {result['peers']} peers, {result['rounds']} rounds, "
        f"fanout {result['fanout']}, codec {result['codec']}, seed {result['seed']}). "
        "0 % is the same honest-only run for every attack. Refused: messages rejected + ignored at the "
        "largest fraction (the attackers' by reason).",
        "",
        "| attack | rule | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " | refused |",
        "| --- | --- | " + " | ".join("---:" for _ in fractions) + " | ---: |",
    ]
    for attack in result["attacks"]:
        for rule in result["rules"]:
            points = [r for r in result["rows"] if r["attack"] == attack and r["rule"] == rule]
            cells = [_loss(r["honest_final_loss"], r["diverged"]) for r in points]
            last = points[-1]
            reasons = ", ".join(f"{k} {v}" for k, v in last["byzantine_refused"].items())
            refused = f"{last['rejected'] + last['ignored']}" + (f" ({reasons})" if reasons else "")
            lines.append(f"| {attack} | {rule} | " + " | ".join(cells) + f" | {refused} |")
    attacked = [f for f in fractions if f > 0]
    lines += [
        "",
        "Robustness per rule: honest-only loss, and the loss ratio to it (honest final / honest-only) over "
        f"all attacks, worst and geometric mean; a diverged run counts as {RATIO_CAP:g}.",
        "",
        "| rule | honest-only loss | "
        + " | ".join(f"worst at {100 * f:g} %" for f in attacked)
        + " | "
        + " | ".join(f"geo-mean at {100 * f:g} %" for f in attacked)
        + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in attacked * 2) + " |",
    ]
    for entry in result["robustness"]:
        worst = [f"{entry['worst_ratio'][f'{f:g}']:.3g}" for f in attacked]
        geo = [f"{entry['geomean_ratio'][f'{f:g}']:.3g}" for f in attacked]
        lines.append(
            f"| {entry['rule']} | {_loss(entry['honest_only_final_loss'], False)} | "
            + " | ".join(worst + geo)
            + " |"
        )
    lines += ["", "The losses again, compact:", "", compact_table(result)]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = result["attacks"]
    columns = min(4, len(attacks))
    rows_ = math.ceil(len(attacks) / columns)
    fig, axes = plt.subplots(
        rows_, columns, figsize=(3.2 * columns, 2.8 * rows_), dpi=80, sharex=True, sharey=True, squeeze=False
    )
    for ax, attack in zip(axes.flat, attacks, strict=False):
        for rule in result["rules"]:
            points = [r for r in result["rows"] if r["attack"] == attack and r["rule"] == rule]
            xs = [100 * r["fraction"] for r in points]
            ys = [RATIO_CAP if r["ratio"] is None else min(r["ratio"], RATIO_CAP) for r in points]
            ax.plot(xs, ys, marker="o", label=rule)
        ax.set_title(attack, fontsize=9)
        ax.set_yscale("log")
        ax.set_ylim(0.8, RATIO_CAP * 1.5)
        ax.axhline(1.0, color="gray", linewidth=0.6, linestyle="--")
    for ax in axes.flat[len(attacks) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("Byzantine peers (%)")
    for ax in axes[:, 0]:
        ax.set_ylabel("loss / honest-only")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        f"{result['scenario']}: honest peers' final loss vs Byzantine fraction "
        f"(ratio to honest-only; {RATIO_CAP:g} = diverged or worse)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
