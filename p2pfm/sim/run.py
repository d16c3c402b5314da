"""Run one scenario end to end: build, simulate, write results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from p2pfm.sim.engine import Simulation
from p2pfm.sim.report import summarize, write_results
from p2pfm.sim.scenario import Scenario


def simulate(
    scenario: Scenario, out: Path | None = None, *, progress: bool = False, plots: bool = True
) -> tuple[Simulation, dict[str, Any]]:
    """Simulate ``scenario``; write results under ``out`` (if given); return the run and its summary.

    The finished :class:`Simulation` is returned too because comparisons across runs (the churn
    sweep) need the per-round metrics, not just the final figures, to compare at a common round.
    """
    started = time.perf_counter()
    sim = Simulation(scenario, progress=progress).run()
    wall = time.perf_counter() - started
    if out is None:
        return sim, summarize(sim)
    return sim, write_results(sim, Path(out), wall, plots=plots)


def run_scenario(
    scenario: Scenario, out: Path | None = None, *, progress: bool = False, plots: bool = True
) -> dict[str, Any]:
    """Simulate ``scenario``; write results under ``out`` (if given) and return the summary."""
    return simulate(scenario, out, progress=progress, plots=plots)[1]
