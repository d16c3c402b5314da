"""Recompute the datacentre baseline of every recorded simulator run, from what the run recorded.

The baseline changed (issue 14: MFU that falls with model size, embodied carbon per GPU-hour;
``p2pfm/energy/datacenter.py``) but the swarm side did not, so the recorded runs need not be
re-run: the datacentre figures depend only on the useful inner steps (``useful_flops`` /
the workload's FLOPs per step, both recorded) and the energy config. This rewrites each
``summary.json``'s ``datacenter_*`` and ``edge_to_datacenter_carbon`` fields and the
``energy`` table of its ``scenario.json`` (old ``datacenter_gflops_per_w`` -> the new keys at
their defaults, PUE and datacentre country kept). Idempotent. Run from the repository root:

    python sim/results/rebaseline.py
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from p2pfm.sim.energy import datacenter_model, datacenter_steps, grid_intensity
from p2pfm.sim.report import tidy
from p2pfm.sim.scenario import EnergyConfig

RESULTS = Path(__file__).resolve().parent


def tokens_per_step(workload: dict) -> int:
    """Samples x tokens per sample of one inner step, as p2pfm.sim.workloads counts FLOPs."""
    if workload["kind"] == "mlp":
        return int(workload["mlp"]["batch_size"])
    gpt = workload["gpt"]
    return int(gpt["train"]["batch_size"]) * int(gpt["model"]["block_size"])


def rebaseline(folder: Path) -> bool:
    summary_path, scenario_path = folder / "summary.json", folder / "scenario.json"
    if not (summary_path.exists() and scenario_path.exists()):
        return False
    summary, scenario = json.loads(summary_path.read_text()), json.loads(scenario_path.read_text())
    old = scenario["energy"]
    keep = {k: v for k, v in old.items() if k in {f.name for f in dataclasses.fields(EnergyConfig)}}
    config = EnergyConfig(**keep)
    flops_step = 6.0 * summary["params"] * tokens_per_step(scenario["workload"])
    steps = summary["useful_flops"] / flops_step
    grid = grid_intensity(config, config.datacenter_country)
    dc = datacenter_model(config).train(*datacenter_steps(steps, flops_step, summary["peers"]), grid)
    summary.update(
        datacenter_energy_wh=dc.energy_wh, datacenter_carbon_g=dc.carbon_g, datacenter_embodied_g=dc.embodied_g,
        datacenter_mfu=dc.mfu, datacenter_gpu_hours=dc.gpu_hours,
        edge_to_datacenter_carbon=summary["carbon_g"] / dc.carbon_g if dc.carbon_g > 0 else None,
    )  # fmt: skip
    scenario["energy"] = dataclasses.asdict(config)
    summary_path.write_text(json.dumps(tidy(summary), indent=2) + "\n")  # as p2pfm.sim.report writes them
    scenario_path.write_text(json.dumps(tidy(scenario), indent=2) + "\n")
    return True


def main() -> int:
    done = [p.parent for p in sorted(RESULTS.rglob("summary.json")) if rebaseline(p.parent)]
    for folder in done:
        print(folder.relative_to(RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
