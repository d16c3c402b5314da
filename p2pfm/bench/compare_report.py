"""The report of ``p2pfm bench compare``: one row per variant, a text table, and a plot.

Rows are computed from :class:`~p2pfm.bench.compare_variants.VariantRun` objects alone, so that
the arithmetic (time to target, bits per parameter per round, CPU use) is tested without
running anything; the fields are described in :mod:`p2pfm.bench.compare`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from p2pfm.bench.compare_config import CompareConfig
from p2pfm.bench.compare_variants import VariantRun


def default_target(runs: list[VariantRun]) -> float | None:
    """5% above single's final loss; without single, the worst final loss (every variant reaches it)."""
    finals = {r.variant: r.points[-1].eval_loss for r in runs if r.points and not r.error}
    if "single" in finals:
        return round(finals["single"] * 1.05, 4)
    return max(finals.values()) if finals else None


def summarize_runs(
    config: CompareConfig, runs: list[VariantRun]
) -> tuple[list[dict[str, Any]], float | None]:
    target = config.target_loss if config.target_loss is not None else default_target(runs)
    cores = os.cpu_count() or 1
    rows = []
    for run in runs:
        reached = next((p.t for p in run.points if target is not None and p.eval_loss <= target), None)
        rounds = run.comm_rounds
        bits = (
            8.0 * run.payload_bytes / run.params / run.processes / rounds
            if rounds and run.params and run.processes
            else None
        )
        wire_bits = (
            8.0 * run.bytes_sent / run.params / run.processes / rounds
            if rounds and run.params and run.processes
            else None
        )
        rows.append(
            {
                "variant": run.variant,
                "final_eval_loss": run.points[-1].eval_loss if run.points else None,
                "time_to_target_s": reached,
                "bytes_sent": run.bytes_sent,
                "bits_per_param_per_round": bits,
                "wire_bits_per_param_per_round": wire_bits,
                "payload_bytes": run.payload_bytes,
                "bytes_to_target": next(
                    (p.bytes_sent for p in run.points if target is not None and p.eval_loss <= target), None
                ),
                "wall_s": run.wall_s,
                "cpu_seconds": run.cpu_s,
                "cpu_utilisation": run.cpu_s / max(run.wall_s, 1e-9) / cores,
                "comm_rounds_per_peer": rounds,
                "processes": run.processes,
                "samples_per_peer": run.points[-1].samples_per_peer if run.points else 0,
                "params": run.params,
                "target_loss": target,
                "error": run.error,
                "completed": run.completed,
                **run.extra,
            }
        )
    base = next((r for r in rows if r["variant"] == "p2pfm"), None)
    for row in rows:
        ok = base is not None and base["time_to_target_s"] and row["time_to_target_s"] is not None
        row["time_to_target_vs_p2pfm"] = row["time_to_target_s"] / base["time_to_target_s"] if ok else None
    return rows, target


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_table(rows: list[dict[str, Any]], target: float | None) -> str:
    header = (
        f"{'variant':<19} {'final loss':>10} {'t->target s':>11} {'x p2pfm':>8} {'wall s':>7} "
        f"{'bytes sent':>10} {'payload':>10} {'bits/param/rnd':>14} {'CPU %':>6}"
    )
    lines = [
        f"target eval loss {target:.4f} nats/byte" if target is not None else "no target",
        header,
        "-" * len(header),
    ]
    for row in rows:
        lines.append(
            f"{row['variant']:<19} {_fmt(row['final_eval_loss'], '.4f'):>10} {_fmt(row['time_to_target_s'], '.1f'):>11} "
            f"{_fmt(row['time_to_target_vs_p2pfm'], '.2f'):>8} {row['wall_s']:>7.1f} {_fmt_bytes(row['bytes_sent']):>10} "
            f"{_fmt_bytes(row['payload_bytes']):>10} {_fmt(row['bits_per_param_per_round'], '.3f'):>14} "
            f"{100 * row['cpu_utilisation']:>6.0f}"
            + ("  FAILED" if row["error"] else "")
            + ("" if row["completed"] else f"  (time cap: {row['samples_per_peer']} samples/peer)")
        )
    return "\n".join(lines)


def plot(runs: list[VariantRun], target: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        if not run.points:
            continue
        xs = [p.t for p in run.points]
        ys = [p.eval_loss for p in run.points]
        (line,) = left.plot(xs, ys, marker=".", label=run.variant)
        with_bytes = [(p.bytes_sent, p.eval_loss) for p in run.points if p.bytes_sent > 0]
        if with_bytes:
            bx, by = zip(*with_bytes, strict=True)
            right.plot(bx, by, marker=".", color=line.get_color(), label=run.variant)
        elif run.variant == "single":
            right.axhline(ys[-1], color=line.get_color(), linestyle=":", label="single (no bytes): final")
    for ax in (left, right):
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.grid(alpha=0.3)
    left.set_xlabel("wall time since the first process started (s)")
    right.set_xlabel("bytes sent, all processes (log)")
    right.set_xscale("log")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
