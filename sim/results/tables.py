"""Print the Markdown tables of sim/results/README.md from the recorded runs' summary.json files.

    python sim/results/tables.py                      # every table, from sim/results/
    python sim/results/tables.py main seeds           # some of them
    python sim/results/tables.py --results /tmp/old main
    python sim/results/tables.py compare --old /tmp/old-results   # old -> new, per run

Tables: ``main`` (100 peers, no churn vs exponential, diurnal and 30 % per 10 rounds), ``sync50``
(the fixed 50-round sync interval), ``gpt`` (8 GPT peers), ``trace-example``, ``trace-phone-week``
(run tables in the format of the former ``comparison_table`` of ``p2pfm/sim/report.py``, removed in
commit 9001d70: the "at round" column only where the README's table has it), ``seeds`` (no churn vs
30 % per 10 rounds over seeds 1-3), ``reasons`` (state downloads refused, messages ignored and
rejected by reason) and ``compare`` (old -> new, from a copy of an earlier ``sim/results``: final
loss, change, consensus distance, state downloads total/adopted/mixed, refused, catch-up).
The sweep's table is its own ``mlp100-sweep/sweep.md`` (written by ``p2pfm sim sweep``).
Reads only JSON; needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

# name -> (runs, baseline, "at round" column)
RUN_TABLES: dict[str, tuple[list[str], str | None, bool]] = {
    "main": (
        [
            "mlp100-none",
            "mlp100-exp10",
            "mlp100-exp30",
            "mlp100-exp50",
            "mlp100-diurnal",
            "mlp100-fraction30",
        ],
        "mlp100-none",
        False,
    ),
    "sync50": (["mlp100-sync50-none", "mlp100-sync50-fraction30"], "mlp100-sync50-none", False),
    "gpt": (["gpt8-none", "gpt8-fraction30"], "gpt8-none", True),
    "trace-example": (["trace-example"], None, False),
    "trace-phone-week": (["trace-phone-week"], None, True),
}
SEEDS = (1, 2, 3)
SWEEP = "mlp100-sweep"
# Runs the "compare" and "reasons" tables cover (mlp1000-bench is not regenerated with the others).
COMPARED = [
    "mlp100-none",
    "mlp100-none-seed2",
    "mlp100-none-seed3",
    "mlp100-exp10",
    "mlp100-exp30",
    "mlp100-exp50",
    "mlp100-diurnal",
    "mlp100-fraction30",
    "mlp100-fraction30-seed2",
    "mlp100-fraction30-seed3",
    "mlp100-sync50-none",
    "mlp100-sync50-fraction30",
    "gpt8-none",
    "gpt8-fraction30",
    "trace-example",
    "trace-phone-week",
]
TABLES = [*RUN_TABLES, "seeds", "reasons", "compare"]


def load(results: Path, run: str) -> dict[str, Any]:
    """``run``'s summary.json; a sweep point is named ``mlp100-sweep rate 0.1``."""
    if " rate " in run:
        sweep, rate = run.split(" rate ")
        return json.loads((results / sweep / f"rate_{rate}" / "summary.json").read_text())
    return json.loads((results / run / "summary.json").read_text())


def sweep_runs(results: Path) -> list[str]:
    """The sweep's points, by rate, as ``load`` names them."""
    folders = sorted((results / SWEEP).glob("rate_*"), key=lambda p: float(p.name[5:]))
    return [f"{SWEEP} rate {p.name[5:]}" for p in folders]


def _delta(value: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Loss change vs the baseline, only if both final losses were measured at the same round."""
    if base is None:
        return ""
    mine, theirs = value.get("final_loss_round"), base.get("final_loss_round")
    if mine is None or theirs is None or value.get("final_loss") is None or base.get("final_loss") is None:
        return "n/a (round unknown)"
    if mine != theirs:
        return f"n/a (round {mine} vs {theirs})"
    return f"{100 * (value['final_loss'] / base['final_loss'] - 1):+.2f}%"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _catch_up(s: dict[str, Any]) -> str:
    catch = s["rejoin_catchup_rounds"]
    return "-" if catch["median"] is None else f"{catch['median']:g}; {100 * catch['within_1_round']:.0f}%"


def run_table(summaries: list[dict[str, Any]], baseline: str | None, at_round: bool) -> str:
    """The former ``comparison_table``: one row per run, the loss change vs ``baseline``."""
    base = next((s for s in summaries if s["scenario"] == baseline), None)
    head = "| scenario | churn | mean online | leaves | final loss | "
    rule = "| --- | --- | ---: | ---: | ---: | "
    if at_round:
        head += "at round | "
        rule += "---: | "
    lines = [
        head + "vs baseline | consensus dist. | catch-up rounds (median; <= 1) | sent (MB) "
        "| sync bits/param/round | energy (Wh) | carbon (g) | datacentre (g) |",
        rule + "---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        at = f" {s.get('final_loss_round', '?')}/{s['rounds']} |" if at_round else ""
        lines.append(
            f"| {s['scenario']} | {s['churn_model']} | {100 * s['mean_online_fraction']:.0f}% "
            f"| {s['churn_events']['leaves']} | {_number(s['final_loss'], '.4f')} |{at} {_delta(s, base)} "
            f"| {_number(s['consensus_distance'], '.3g')} "
            f"| {_catch_up(s)} | {s['bytes_sent_total'] / 1e6:.3g} | {s.get('sync_bits_per_param_per_round', 0):.3g} "
            f"| {s['energy_wh']:.3g} | {s['carbon_g']:.3g} "
            f"| {s['datacenter_carbon_g']:.2g} |"
        )
    notes = [f"{s['scenario']}: {s['note']}" for s in summaries if s.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def seeds_table(results: Path) -> str:
    """No churn vs 30 % per 10 rounds, seed by seed (seed 1 is the unsuffixed run)."""
    lines = [
        "| seed | no churn | 30% per 10 rounds | change | consensus (none / churn) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for seed in SEEDS:
        suffix = "" if seed == 1 else f"-seed{seed}"
        none, churn = load(results, f"mlp100-none{suffix}"), load(results, f"mlp100-fraction30{suffix}")
        lines.append(
            f"| {seed} | {none['final_loss']:.4f} | {churn['final_loss']:.4f} "
            f"| {100 * (churn['final_loss'] / none['final_loss'] - 1):+.2f}% "
            f"| {none['consensus_distance']:.3f} / {churn['consensus_distance']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _downloads(s: dict[str, Any]) -> str:
    d = s["state_downloads"]
    return f"{d['total']}/{d['adopted']}/{d['mixed']}"


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def reasons_table(results: Path, runs: list[str]) -> str:
    """Why peers did not take what they were sent: refused state downloads, messages by reason."""
    lines = [
        "| run | state downloads (total/adopted/mixed) | refused | messages sent | ignored | rejected |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for run in runs:
        s = load(results, run)
        m = s["messages"]
        lines.append(
            f"| {run} | {_downloads(s)} | {s['state_downloads'].get('refused', 0)} | {m['sent']} "
            f"| {_reasons(m.get('ignored', {}))} | {_reasons(m.get('rejected', {}))} |"
        )
    return "\n".join(lines) + "\n"


def compare_table(old: Path, new: Path, runs: list[str]) -> str:
    """Old -> new per run that changed; the unchanged runs are listed below the table.

    A run counts as unchanged when its final loss, consensus distance, state downloads and
    catch-up are the same (``refused`` absent from an old summary counts as 0)."""
    lines = [
        "| run | final loss | change | consensus dist. | state downloads (total/adopted/mixed) | refused "
        "| catch-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    unchanged = []
    for run in runs:
        a, b = load(old, run), load(new, run)
        fields = [
            (s["final_loss"], s["consensus_distance"], _downloads(s), s["state_downloads"].get("refused", 0))
            for s in (a, b)
        ]
        if fields[0] == fields[1] and _catch_up(a) == _catch_up(b):
            unchanged.append(run)
            continue
        name = run
        # Summaries recorded before final_loss_round existed measured at the last round.
        rounds = tuple(s.get("final_loss_round", s["rounds"]) for s in (a, b))
        if rounds[0] != a["rounds"] or rounds[1] != b["rounds"]:
            name += (
                f" (round {rounds[0]})" if rounds[0] == rounds[1] else f" (round {rounds[0]} -> {rounds[1]})"
            )
        change = (
            "n/a"
            if rounds[0] != rounds[1] or a["final_loss"] is None or b["final_loss"] is None
            else f"{100 * (b['final_loss'] / a['final_loss'] - 1):+.1f}%"
        )
        lines.append(
            f"| {name} | {_number(a['final_loss'], '.4f')} -> {_number(b['final_loss'], '.4f')} | {change} "
            f"| {_number(a['consensus_distance'], '.3g')} -> {_number(b['consensus_distance'], '.3g')} "
            f"| {_downloads(a)} -> {_downloads(b)} "
            f"| {a['state_downloads'].get('refused', 0)} -> {b['state_downloads'].get('refused', 0)} "
            f"| {_catch_up(a)} -> {_catch_up(b)} |"
        )
    tail = ["", "Unchanged: " + ", ".join(unchanged) + "."] if unchanged else []
    return "\n".join(lines + tail) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="tables: " + ", ".join(TABLES) + " (default: all but compare, which needs --old)",
    )
    parser.add_argument("tables", nargs="*", choices=[[], *TABLES], metavar="TABLE", help="tables to print")
    parser.add_argument("--results", type=Path, default=HERE, help="recorded runs (default: this folder)")
    parser.add_argument("--old", type=Path, help="compare only: an earlier copy of the recorded runs")
    args = parser.parse_args(argv)
    names = args.tables or [t for t in TABLES if t != "compare"]
    if "compare" in names and args.old is None:
        parser.error("compare needs --old DIR")
    blocks = []
    for name in names:
        if name in RUN_TABLES:
            runs, baseline, at_round = RUN_TABLES[name]
            blocks.append(run_table([load(args.results, r) for r in runs], baseline, at_round))
        elif name == "seeds":
            blocks.append(seeds_table(args.results))
        elif name == "reasons":
            blocks.append(reasons_table(args.results, COMPARED + sweep_runs(args.results)))
        else:
            blocks.append(compare_table(args.old, args.results, COMPARED + sweep_runs(args.results)))
    print("\n".join(blocks), end="")


if __name__ == "__main__":
    main()
