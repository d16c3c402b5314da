"""Swarm energy reports: per peer and in total, from verified announcements or from metrics.

Each peer's totals travel in its signed announcement (``energy_wh``, ``marginal_wh``,
``tokens``, ``energy_source``, ``grid_g_per_kwh``: bounded by the announce schema), so any peer
can build the swarm's report from claims whose signer it has checked
(:func:`report_from_announcements`). ``p2pfm swarm``'s ``summary.json`` builds the same shape
from each peer's own metrics file instead (:func:`energy_report`), because the driver is no
DHT peer and the metrics outlive the run. A claim is only as honest as its signer: signatures
stop forgery and tampering, not a peer that lies about itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from p2pfm.core.announce import Announcement
from p2pfm.energy.tracker import JOULES_PER_WH, carbon_g


def peer_figures(
    energy_wh: float, marginal_wh: float, tokens: int, source: str, grid: float
) -> dict[str, Any]:
    """One peer's row: energy, carbon and joules per token in both views."""
    return {
        "energy_wh": energy_wh, "marginal_wh": marginal_wh,
        "carbon_g": carbon_g(energy_wh, grid), "marginal_carbon_g": carbon_g(marginal_wh, grid),
        "tokens": tokens, "j_per_token": energy_wh * JOULES_PER_WH / tokens if tokens else None,
        "marginal_j_per_token": marginal_wh * JOULES_PER_WH / tokens if tokens else None,
        "energy_source": source, "grid_g_per_kwh": grid,
    }  # fmt: skip


def energy_report(per_peer: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over peers' rows (:func:`peer_figures`), with the rows under ``per_peer``.

    ``energy_source`` is the single source when all peers agree, else ``mixed:`` and the sorted list.
    """
    energy = sum(r["energy_wh"] for r in per_peer.values())
    marginal = sum(r["marginal_wh"] for r in per_peer.values())
    tokens = sum(r["tokens"] for r in per_peer.values())
    sources = sorted({r["energy_source"] for r in per_peer.values()})
    return {
        "energy_wh": energy, "marginal_wh": marginal,
        "carbon_g": sum(r["carbon_g"] for r in per_peer.values()),
        "marginal_carbon_g": sum(r["marginal_carbon_g"] for r in per_peer.values()),
        "tokens": tokens,
        "j_per_token": energy * JOULES_PER_WH / tokens if tokens else None,
        "marginal_j_per_token": marginal * JOULES_PER_WH / tokens if tokens else None,
        "energy_source": sources[0] if len(sources) == 1 else ("mixed:" + ",".join(sources) if sources else None),
        "per_peer": {k: dict(v) for k, v in sorted(per_peer.items())},
    }  # fmt: skip


def report_from_announcements(announcements: Iterable[Announcement]) -> dict[str, Any]:
    """The swarm's energy report from verified announcements (newest per peer; the caller checks them).

    Peers whose announcements carry no energy figures (older versions) are listed under ``unreported``.
    """
    rows: dict[str, dict[str, Any]] = {}
    unreported: list[str] = []
    for a in announcements:
        if a.energy_wh is None or a.tokens is None or a.energy_source is None:
            unreported.append(a.peer_id)
            continue
        marginal = a.marginal_wh if a.marginal_wh is not None else a.energy_wh
        grid = a.grid_g_per_kwh if a.grid_g_per_kwh is not None else 0.0
        rows[a.peer_id] = peer_figures(
            a.energy_wh, min(marginal, a.energy_wh), a.tokens, a.energy_source, grid
        )
    return {**energy_report(rows), "unreported": sorted(unreported)}
