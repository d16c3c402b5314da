"""Run one scenario end to end: build, simulate, write results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from p2pfm.sim.engine import Simulation
from p2pfm.sim.report import write_results
from p2pfm.sim.scenario import Scenario


def run_scenario(
    scenario: Scenario, out: Path | None = None, *, progress: bool = False, plots: bool = True
) -> dict[str, Any]:
    """Simulate ``scenario``; write results under ``out`` (if given) and return the summary."""
    started = time.perf_counter()
    sim = Simulation(scenario, progress=progress).run()
    wall = time.perf_counter() - started
    if out is None:
        from p2pfm.sim.report import summarize

        return summarize(sim)
    return write_results(sim, Path(out), wall, plots=plots)
