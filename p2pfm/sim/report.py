"""Results of a run: ``summary.json``, ``metrics.csv``, ``timing.json`` and PNG plots.

``summary.json`` depends only on the scenario and the seed (floats rounded to 6 significant
digits), so the same run gives the same bytes; wall-clock time lives in ``timing.json``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.config import config_to_dict
from p2pfm.core.gossip import bits_per_param, expected_round_bits_per_param
from p2pfm.sim.energy import account

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"
TIMING_FILE = "timing.json"


def tidy(value: Any) -> Any:
    """JSON-friendly and stable: 6 significant digits, no NaN (null instead)."""
    if isinstance(value, dict):
        return {str(k): tidy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return None
        return float(f"{value:.6g}")
    return value


def last_measured(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The last metrics row with a measured loss ({} if none).

    The engine writes a row at every evaluation round, with NaN losses when no peer was
    online and holding the model; the "final" figures come from this row, not blindly from
    the last one, and the summary says which round that was.
    """
    for row in reversed(rows):
        if math.isfinite(row["mean_loss"]):
            return row
    return {}


def final_note(
    rounds: int, end: dict[str, Any], measured: dict[str, Any], round_seconds: float
) -> str | None:
    """A sentence for summary.json when the final figures need a caveat, else None.

    ``end`` is the last metrics row (always the scenario's last round), ``measured`` the
    last row with a loss. A reader comparing runs must know when "final" is not the end.
    """
    notes = []
    if not measured:
        notes.append(
            "no loss was measured: no peer was online and holding the model at any evaluation round; "
            "final_loss and consensus_distance are null"
        )
    elif measured["round"] != rounds:
        notes.append(
            f"no peer was online and holding the model after round {rounds} of {rounds} "
            f"(t = {end.get('time_s', rounds * round_seconds):g} s, {end.get('online', 0)} online, "
            f"{end.get('ready', 0)} ready): final_loss, final_loss_min, final_loss_max and "
            f"consensus_distance are from round {measured['round']} (t = {measured['time_s']:g} s, "
            f"{measured['ready']} peers), the last round with a measured loss; compare runs at a "
            "round they all measured (metrics.csv), not at their final figures"
        )
    if measured and measured["ready"] == 1:
        notes.append("the final figures come from a single peer, so consensus_distance is 0 by definition")
    return "; ".join(notes) + "." if notes else None


def summarize(sim) -> dict[str, Any]:
    """The summary of a finished :class:`~p2pfm.sim.engine.Simulation`.

    Every "final" figure comes with the round (as numbered in metrics.csv: rounds completed)
    and virtual time at which it was measured, and ``final_is_last_round`` / ``note`` say
    when that is not the scenario's last round (everybody offline at the end), so runs are
    never compared at different rounds without it showing.
    """
    sc, m = sim.scenario, sim.metrics
    end = m.rows[-1] if m.rows else {}
    last = last_measured(m.rows)
    energy = account(
        sc.energy,
        sim.profiles,
        sim.device_of,
        sim.compute_s,
        sim.online_s,
        sim.bytes_sent,
        sim.bytes_received,
        useful_steps=m.useful_steps,
        flops_per_step=sim.workload.flops_per_step,
    )
    catch = np.array(m.catchup, dtype=np.float64)
    catchup = {
        "count": int(catch.size),
        "mean": float(catch.mean()) if catch.size else None,
        "median": float(np.median(catch)) if catch.size else None,
        "p90": float(np.percentile(catch, 90)) if catch.size else None,
        "max": int(catch.max()) if catch.size else None,
        "within_1_round": float((catch <= 1).mean()) if catch.size else None,
        "not_caught_up_at_end": len(sim.trackers),
        "interrupted_by_leaving": m.catchup_interrupted,
        "tolerance": sc.catchup_tolerance,
    }
    peer_rounds = m.useful_steps // sc.gossip.inner_steps
    online_time = np.array([t for t, _ in m.online_curve] + [sim.end_time])
    online_counts = np.array([c for _, c in m.online_curve], dtype=np.float64)
    mean_online = float((np.diff(online_time) * online_counts).sum() / max(sim.end_time, 1e-12)) / sc.peers
    summary = {
        "scenario": sc.name,
        "seed": sc.seed,
        "peers": sc.peers,
        "rounds": sc.rounds,
        "workload": sc.workload.kind,
        "params": sim.workload.numel,
        "signatures": sc.verify_signatures,
        "round_seconds": sim.round_seconds,
        "virtual_seconds": sim.end_time,
        "initial_loss": sim.initial_loss,
        "final_loss": last.get("mean_loss"),
        "final_loss_min": last.get("min_loss"),
        "final_loss_max": last.get("max_loss"),
        "final_loss_round": last.get("round"),
        "final_loss_time_s": last.get("time_s"),
        "final_loss_peers": last.get("ready"),
        "final_is_last_round": bool(last) and last["round"] == sc.rounds,
        "online_at_end": end.get("online"),
        "ready_at_end": end.get("ready"),
        "note": final_note(sc.rounds, end, last, sim.round_seconds),
        "target_loss": sc.target_loss,
        "time_to_target_s": m.time_to_target_s,
        "time_to_target_round": m.time_to_target_round,
        "consensus_distance": last.get("consensus_distance"),
        "consensus_distance_round": last.get("round"),
        "consensus_distance_time_s": last.get("time_s"),
        "bytes_sent_total": float(sim.bytes_sent.sum()),
        "update_message_bytes": sim.update_bytes,
        "state_bytes": sim.state_bytes,
        "bits_per_param_per_round": expected_round_bits_per_param(
            sim.update_bytes, sim.workload.numel, sc.gossip.fanout
        ),
        "sync_bits_per_param_per_round": bits_per_param(
            sim.sync_bytes_sent, sim.workload.numel * peer_rounds
        ),
        "energy_wh": energy.energy_wh,
        "energy_breakdown_wh": {
            "compute": energy.compute_wh,
            "idle": energy.idle_wh,
            "network": energy.network_wh,
        },
        "energy_by_device_wh": energy.by_device_wh,
        "carbon_g": energy.carbon_g,
        "grid_g_per_kwh": energy.grid_g_per_kwh,
        "datacenter_energy_wh": energy.datacenter_energy_wh,
        "datacenter_carbon_g": energy.datacenter_carbon_g,
        "marginal_energy_wh": energy.marginal_wh,
        "marginal_carbon_g": energy.marginal_carbon_g,
        "datacenter_embodied_g": energy.datacenter_embodied_g,
        "datacenter_mfu": energy.datacenter_mfu,
        "datacenter_gpu_hours": energy.datacenter_gpu_hours,
        "edge_to_datacenter_carbon": energy.edge_to_datacenter_carbon,
        "useful_flops": m.useful_steps * sim.workload.flops_per_step,
        "churn_model": sc.churn.model,
        "churn_events": {"leaves": m.leaves, "joins": m.joins},
        "mean_online_fraction": mean_online,
        "rejoin_catchup_rounds": catchup,
        "state_downloads": {
            "total": m.state_downloads,
            "refused": m.states_refused,
            "adopted": m.adopted,
            "mixed": m.mixed,
            "periodic_syncs": m.syncs,
            "syncs_refused": m.syncs_refused,
        },
        "messages": {
            "sent": m.messages_sent,
            "delivered": m.messages_delivered,
            "lost_sender_left": m.lost_sender_left,
            "lost_receiver_gone": m.lost_receiver_gone,
            "rejected": dict(sorted(m.rejected.items())),  # lowered the sender's score
            "ignored": dict(sorted(m.ignored.items())),  # authentic but unused (e.g. stale rounds)
        },
        "computations_lost": m.computations_lost,
        "straggler_rounds": m.straggler_rounds,
        "peer_rounds_computed": peer_rounds,
        "devices": {name: sim.device_of.count(name) for name in sorted(sim.profiles)},
    }
    if sc.byzantine is not None:
        summary["byzantine"] = byzantine_summary(sim)
    if sim.ledger is not None:
        summary["policy"] = policy_summary(sim, energy.datacenter_carbon_g)
    return tidy(summary)


def policy_summary(sim, datacenter_carbon_g: float) -> dict[str, Any]:
    """The ``policy`` block: the rules, pauses, and carbon charged at the grid's hourly intensity."""
    config, ledger, m = sim.scenario.policy, sim.ledger, sim.metrics
    energy_wh = ledger.energy_j / 3600.0
    return {
        "rules": list(config.gate.rules),
        "pauses": m.pauses,
        "resumes": m.resumes,
        "paused_peer_seconds": float(sim.paused_s.sum()),
        "grid_source": config.grid_source,
        "energy_wh": energy_wh,
        "carbon_g": ledger.carbon_g,
        "mean_grid_g_per_kwh": ledger.carbon_g / (energy_wh / 1000.0) if energy_wh > 0 else None,
        "datacenter_carbon_g": datacenter_carbon_g,
    }


def byzantine_summary(sim) -> dict[str, Any]:
    """The ``byzantine`` block of summary.json: the attack, the honest peers' loss, what was refused.

    ``honest_final_loss`` is the mean held-out loss of the honest peers online and holding the
    model at the last evaluation that had any; the attackers' own models are left out (they
    train honestly here, but a real attacker's model says nothing about the swarm's). A loss
    that is not finite (the honest models were driven to overflow) is null, with
    ``honest_diverged`` true: never an older, finite figure in its place.
    """
    config, m = sim.scenario.byzantine, sim.metrics
    last = next((row for row in reversed(m.honest_rows) if row["honest_ready"]), {})
    loss = last.get("honest_mean_loss")
    return {
        "fraction": config.fraction,
        "attack": config.attack,
        "scale": config.resolved_scale,
        **({"forge": config.forge, "rounds_per_round": config.rounds_per_round}
           if config.attack == "many_rounds" else {}),
        "peers": [int(p) for p in sim.adversary.members],
        "honest_final_loss": loss,
        "honest_diverged": loss is not None and not math.isfinite(loss),
        "honest_final_loss_round": last.get("round"),
        "honest_final_loss_peers": last.get("honest_ready"),
        "rejected": sum(m.rejected.values()),  # all messages refused with a lower score
        "ignored": sum(m.ignored.values()),  # all messages refused without one (stale, banned, ...)
        "from_byzantine": {
            "sent": m.byzantine_sent,
            "accepted": m.byzantine_accepted,
            "rejected": dict(sorted(m.byzantine_rejected.items())),
            "ignored": dict(sorted(m.byzantine_ignored.items())),
            "lost": m.byzantine_lost,
        },
        "diverged_computations": m.diverged_computations,
    }  # fmt: skip


def write_results(sim, out: Path, wall_seconds: float, *, plots: bool = True) -> dict[str, Any]:
    """Write summary.json, metrics.csv, timing.json, scenario.json and plots to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(sim)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    scenario = config_to_dict(sim.scenario)
    scenario.pop("base_dir", None)
    if scenario.get("byzantine", {}) is None:
        scenario.pop("byzantine")  # no [byzantine] table: scenario.json as before there was one
    (out / "scenario.json").write_text(json.dumps(tidy(scenario), indent=2) + "\n")
    timing = {
        "wall_seconds": round(wall_seconds, 2),
        "peer_rounds_per_second": round(summary["peer_rounds_computed"] / max(wall_seconds, 1e-9), 1),
    }
    (out / TIMING_FILE).write_text(json.dumps(timing, indent=2) + "\n")
    rows = sim.metrics.rows
    if rows:
        with (out / METRICS_FILE).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    if plots:
        plot_run(sim, summary, out)
    return summary


def plot_run(sim, summary: dict[str, Any], out: Path) -> None:
    """loss.png (loss vs virtual time), online.png (online peers), energy.png (by device class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sim.metrics.rows
    name = sim.scenario.name
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    t = [r["time_s"] / 60 for r in rows]
    ax.plot(t, [r["mean_loss"] for r in rows], label="mean over live peers")
    ax.fill_between(
        t, [r["min_loss"] for r in rows], [r["max_loss"] for r in rows], alpha=0.25, label="min-max"
    )
    ax.set_xlabel("virtual time (min)")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title(f"{name}: loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
    curve = sim.metrics.online_curve + [(sim.end_time, sim.metrics.online_curve[-1][1])]
    ax.step([c[0] / 60 for c in curve], [c[1] for c in curve], where="post")
    ax.set_ylim(0, sim.scenario.peers * 1.05)
    ax.set_xlabel("virtual time (min)")
    ax.set_ylabel("online peers")
    ax.set_title(f"{name}: online peers ({sim.scenario.churn.model} churn)")
    fig.tight_layout()
    fig.savefig(out / "online.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
    by_device = summary["energy_by_device_wh"]
    names = list(by_device) + ["datacentre\nbaseline"]
    values = list(by_device.values()) + [summary["datacenter_energy_wh"]]
    ax.bar(names, values, color=["tab:blue"] * len(by_device) + ["tab:gray"])
    ax.set_ylabel("energy at the wall (Wh)")
    ax.set_yscale("log")
    ax.set_title(f"{name}: energy by device class")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "energy.png")
    plt.close(fig)
