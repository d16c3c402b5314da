"""``p2pfm sim SCENARIO.toml``, ``p2pfm sim sweep SCENARIO.toml --churn-rates ...``,
``p2pfm sim byzantine [SCENARIO.toml] [--rules ...] [--attacks ...] [--fractions ...]`` and
``p2pfm sim convert-trace PHONE_TRACE --out TRACE.csv``.

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
        description="Run a churn-resilience scenario (sim/scenarios/*.toml), `sim sweep` over churn rates, "
        "`sim byzantine` (aggregation rules against Byzantine peers), "
        "or `sim convert-trace` a phone trace (user_id,week,start_ms:end_ms;...) to our CSV (sim/traces/README.md).",
        usage="p2pfm sim SCENARIO.toml [--out DIR] [--seed N] [--rounds N]\n"
        "       p2pfm sim sweep SCENARIO.toml --churn-rates 0,0.1,0.3 [--out DIR] [--seed N]\n"
        "       p2pfm sim policies SCENARIO.toml [--out DIR] [--seed N] [--rounds N]\n"
        "       p2pfm sim byzantine [SCENARIO.toml] [--workload mlp] [--rounds N] [--peers N] "
        "[--fractions 0,0.1,0.2,0.3]\n"
        "                           [--rules mean,...] [--attacks sign_flip,...] [--seed S] [--out DIR] [--json]\n"
        "       p2pfm sim convert-trace PHONE_TRACE --out TRACE.csv [--absolute-times] [--run-seconds S]",
    )
    parser.add_argument("target", metavar="SCENARIO.toml", help="scenario file, or `sweep` followed by one")
    parser.add_argument("scenario", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="results directory (default sim/results/<name>[-sweep])")
    parser.add_argument("--seed", type=int, help="override the scenario's seed")
    parser.add_argument("--rounds", type=int, help="override the scenario's number of rounds (quick checks)")
    parser.add_argument("--churn-rates", help="sweep only: comma-separated fractions, e.g. 0,0.1,0.3,0.5")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    byzantine = parser.add_argument_group("sim byzantine")
    byzantine.add_argument("--workload", help="built-in base without a scenario file: mlp (default) or gpt")
    byzantine.add_argument("--peers", type=int, help="override the base's number of peers")
    byzantine.add_argument("--fractions", help="Byzantine fractions, e.g. 0,0.1,0.2,0.3 (the default)")
    byzantine.add_argument(
        "--rules", help="aggregation rules (default mean,clipped_mean,trimmed_mean,median)"
    )
    byzantine.add_argument("--attacks", help="attacks (default: all the simulator plays)")
    byzantine.add_argument("--json", action="store_true", help="print results.json instead of the table")
    parser.add_argument(
        "--absolute-times",
        action="store_true",
        help="convert-trace only: times share one clock (e.g. epoch ms), one device per user, "
        "earliest start = 0 (default: ms from each week's start, one device per user-week)",
    )
    parser.add_argument(
        "--run-seconds",
        type=float,
        help="convert-trace only: print the churn.trace_time_scale that replays the whole trace over "
        "this many virtual seconds (rounds x round_seconds)",
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import os

    # The MLP workload runs thousands of tiny batched matmuls: one BLAS thread per process is
    # faster than two fighting over them (and leaves the other core to the rest of the machine).
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    from p2pfm.config import ConfigError
    from p2pfm.sim.scenario import load_scenario

    if args.target == "byzantine":
        return byzantine_sweep(args)
    for flag in ("workload", "peers", "fractions", "rules", "attacks"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag}: only for `p2pfm sim byzantine`")
    if args.json:
        raise ConfigError("--json: only for `p2pfm sim byzantine`")
    if args.target == "convert-trace":
        return convert_trace(args)
    if args.absolute_times or args.run_seconds is not None:
        raise ConfigError("--absolute-times, --run-seconds: only for `p2pfm sim convert-trace`")
    sweep = args.target in ("sweep", "policies")
    path = args.scenario if sweep else args.target
    if path is None:
        raise ConfigError(
            "sim sweep: give a scenario file: p2pfm sim sweep SCENARIO.toml --churn-rates 0,0.3"
        )
    if not sweep and args.scenario is not None:
        raise ConfigError(f"sim: unexpected argument {args.scenario!r}")
    if args.target != "sweep" and args.churn_rates is not None:
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
    if args.target == "policies":
        from p2pfm.sim.policy_compare import policies_table, run_policies

        out = args.out or Path("sim/results") / f"{scenario.name}"
        print(policies_table(run_policies(scenario, out, progress=progress)))
        print(f"results in {out}", file=sys.stderr)
        return 0
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
    keys += ("byzantine",) if "byzantine" in summary else ()  # the honest peers' figures
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"results in {out}", file=sys.stderr)
    return 0


def byzantine_sweep(args: argparse.Namespace) -> int:
    """Every (rule, attack, fraction) on one base scenario; the table (or JSON) on stdout."""
    from p2pfm.config import ConfigError
    from p2pfm.core.aggregation import AGGREGATIONS
    from p2pfm.sim.byzantine import (
        DEFAULT_ATTACKS,
        DEFAULT_FRACTIONS,
        DEFAULT_RULES,
        base_scenario,
        byzantine_table,
        parse_fractions,
        parse_names,
        run_byzantine_sweep,
    )
    from p2pfm.sim.scenario import SIM_ATTACKS, load_scenario

    if args.churn_rates is not None or args.absolute_times or args.run_seconds is not None:
        raise ConfigError("--churn-rates, --absolute-times, --run-seconds: not for `p2pfm sim byzantine`")
    if args.scenario is not None and args.workload is not None:
        raise ConfigError("--workload: give a scenario file or --workload, not both")
    base = (
        load_scenario(args.scenario) if args.scenario is not None else base_scenario(args.workload or "mlp")
    )
    changes: dict = {}
    for flag, lowest in (("seed", 0), ("rounds", 1), ("peers", 2)):
        value = getattr(args, flag)
        if value is None:
            continue
        if value < lowest or (flag == "seed" and value >= 2**63):
            raise ConfigError(
                f"--{flag}: must be at least {lowest}" + (" and below 2**63" if flag == "seed" else "")
            )
        changes[flag] = value
    base = base.with_changes(**changes) if changes else base
    rules = parse_names(args.rules, "--rules", list(AGGREGATIONS)) if args.rules else list(DEFAULT_RULES)
    attacks = parse_names(args.attacks, "--attacks", SIM_ATTACKS) if args.attacks else list(DEFAULT_ATTACKS)
    fractions = parse_fractions(args.fractions) if args.fractions else list(DEFAULT_FRACTIONS)
    out = args.out or Path("sim/results") / f"{base.name}-sweep"
    result = run_byzantine_sweep(base, rules, attacks, fractions, out, progress=not args.no_progress)
    print(json.dumps(result, indent=2) if args.json else byzantine_table(result))
    print(f"results in {out}", file=sys.stderr)
    return 0


def convert_trace(args: argparse.Namespace) -> int:
    """Write a phone trace in our CSV format and say how to replay all of it."""
    import math

    from p2pfm.config import ConfigError
    from p2pfm.sim.scenario import TRACE_TIME_SCALE_MAX, TRACE_TIME_SCALE_MIN
    from p2pfm.sim.traces import TraceError, convert_phone_trace

    if args.scenario is None or args.out is None:
        raise ConfigError(
            "sim convert-trace: give the input and --out: p2pfm sim convert-trace IN.txt --out OUT.csv"
        )
    for flag in ("seed", "rounds", "churn_rates"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')}: not for `p2pfm sim convert-trace`")
    if args.run_seconds is not None and not (math.isfinite(args.run_seconds) and args.run_seconds > 0):
        raise ConfigError("--run-seconds: must be a positive number of virtual seconds")
    source = Path(args.scenario)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(str(source), 0, f"cannot be read: {exc}") from None
    result = convert_phone_trace(text, str(source), absolute=args.absolute_times)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(result.csv)
    print(
        f"{args.out}: {result.devices} devices, {result.intervals_out} intervals "
        f"({result.intervals_in} read, overlapping or touching ones merged; "
        f"{result.empty_dropped} empty user-weeks dropped), span {result.span_s:g} trace seconds",
        file=sys.stderr,
    )
    if args.run_seconds is not None:
        scale = result.time_scale_for(args.run_seconds)
        if not TRACE_TIME_SCALE_MIN <= scale <= TRACE_TIME_SCALE_MAX:
            raise ConfigError(f"--run-seconds: gives trace_time_scale {scale:g}, outside the allowed range")
        print(
            f"trace_time_scale = {scale!r}  # [churn]: {result.span_s:g} trace s over {args.run_seconds:g} virtual s"
        )
    return 0
