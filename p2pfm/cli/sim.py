"""``p2pfm sim SCENARIO.toml`` and ``p2pfm sim sweep SCENARIO.toml --churn-rates ...``.

Thin: each handler loads the scenario (strict, errors name the field), applies the flags
and calls one function of :mod:`p2pfm.sim`. Results go to ``--out`` (default
``sim/results/<scenario name>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sim",
        help="simulate a swarm with churn on a virtual clock",
        description="Run a churn-resilience scenario (sim/scenarios/*.toml), or `sim sweep` over churn rates.",
        usage="p2pfm sim SCENARIO.toml [--out DIR] [--seed N] [--rounds N]\n       p2pfm sim sweep SCENARIO.toml --churn-rates 0,0.1,0.3 [--out DIR] [--seed N]",
    )
    parser.add_argument("target", metavar="SCENARIO.toml", help="scenario file, or `sweep` followed by one")
    parser.add_argument("scenario", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="results directory (default sim/results/<name>[-sweep])")
    parser.add_argument("--seed", type=int, help="override the scenario's seed")
    parser.add_argument("--rounds", type=int, help="override the scenario's number of rounds (quick checks)")
    parser.add_argument("--churn-rates", help="sweep only: comma-separated fractions, e.g. 0,0.1,0.3,0.5")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import os

    # The MLP workload runs thousands of tiny batched matmuls: one BLAS thread per process is
    # faster than two fighting over them (and leaves the other core to the rest of the machine).
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    from p2pfm.config import ConfigError
    from p2pfm.sim.scenario import load_scenario

    sweep = args.target == "sweep"
    path = args.scenario if sweep else args.target
    if path is None:
        raise ConfigError(
            "sim sweep: give a scenario file: p2pfm sim sweep SCENARIO.toml --churn-rates 0,0.3"
        )
    if not sweep and args.scenario is not None:
        raise ConfigError(f"sim: unexpected argument {args.scenario!r}")
    if not sweep and args.churn_rates is not None:
        raise ConfigError("--churn-rates: only for `p2pfm sim sweep`")
    scenario = load_scenario(path)
    if args.seed is not None:
        if not 0 <= args.seed < 2**63:
            raise ConfigError("--seed: must be in [0, 2**63)")
        scenario = scenario.with_changes(seed=args.seed)
    if args.rounds is not None:
        if args.rounds < 1:
            raise ConfigError("--rounds: must be at least 1")
        scenario = scenario.with_changes(rounds=args.rounds)
    progress = not args.no_progress
    if sweep:
        from p2pfm.sim.sweep import parse_rates, run_sweep, sweep_table

        rates = parse_rates(args.churn_rates or "0,0.1,0.3,0.5")
        out = args.out or Path("sim/results") / f"{scenario.name}-sweep"
        result = run_sweep(scenario, rates, out, progress=progress)
        print(sweep_table(result))
        print(f"results in {out}", file=sys.stderr)
        return 0
    from p2pfm.sim.run import run_scenario

    out = args.out or Path("sim/results") / scenario.name
    summary = run_scenario(scenario, out, progress=progress)
    keys = ("final_loss", "final_loss_round", "final_is_last_round", "note", "time_to_target_s", "consensus_distance", "bytes_sent_total", "energy_wh", "carbon_g",
            "datacenter_carbon_g", "churn_events", "rejoin_catchup_rounds")  # fmt: skip
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"results in {out}", file=sys.stderr)
    return 0
