"""``p2pfm bench``: benchmarks, one sub-subcommand each (``codecs``, ``swarm``, ``compare``, ``fuzz``, ``scale``, ``round``,
``transfer``).

To add one, write ``register_<name>(bench_subparsers)`` that declares its flags and sets
``handler``, and append it to :data:`BENCHES`. Handlers import the bench module lazily so
that ``p2pfm --help`` stays instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``p2pfm bench`` and every bench in :data:`BENCHES` under it."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks (codecs, ...)",
        description="Benchmarks of p2pfm's parts and of whole swarms.",
    )
    bench_subparsers = parser.add_subparsers(dest="bench_command", metavar="BENCH")

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(handler=show_help)
    for register_bench in BENCHES:
        register_bench(bench_subparsers)


def register_codecs(bench_subparsers: argparse._SubParsersAction) -> None:
    """``p2pfm bench codecs``: bits/param and MB/s of every codec inside a signed envelope."""
    parser = bench_subparsers.add_parser(
        "codecs",
        help="bits/param, encode+sign and verify+decode MB/s, error of every codec",
        description=(
            "Encode a random fp32 vector with every codec, seal it in a signed update envelope, "
            "open and decode it; report bits/param on the wire, MB/s of fp32 input (one thread) "
            "and the relative reconstruction error."
        ),
    )
    parser.add_argument(
        "--size", type=int, default=10_000_000, help="elements of the vector (default: 10,000,000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed runs per codec, best reported (default: 3)"
    )
    parser.add_argument(
        "--topk-fraction", type=float, default=0.01, help="share of entries topk keeps (default: 0.01)"
    )
    parser.add_argument("--block-size", type=int, default=256, help="int8 block size (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input vector (default: 0)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.set_defaults(handler=_run_codecs)


def _run_codecs(args: argparse.Namespace) -> int:
    import json

    from p2pfm.bench.codecs import CodecBenchConfig, format_table, run_codec_bench

    config = CodecBenchConfig(
        size=args.size,
        repeat=args.repeat,
        topk_fraction=args.topk_fraction,
        block_size=args.block_size,
        seed=args.seed,
    )
    rows = run_codec_bench(config)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"p2pfm bench codecs: {config.size:,} fp32 elements, best of {config.repeat}, one thread")
        print(format_table(rows))
    return 0


def register_compare(bench_subparsers: argparse._SubParsersAction) -> None:
    """``p2pfm bench compare``: p2pfm beside hivemind, DDP and one process on the same task."""
    from pathlib import Path

    parser = bench_subparsers.add_parser(
        "compare",
        help="p2pfm vs p2pfm-uncompressed, hivemind, DDP and a single process: loss vs time and bytes",
        description=(
            "Train the same model on the same shards with the same peers, batch and samples per peer "
            "as p2pfm (real peer processes), p2pfm --codec none, hivemind.Optimizer, torch DDP (gloo) and "
            "one process; report final eval loss, time to a target loss, bytes sent, bits/param/round and "
            "CPU utilisation, and plot loss vs wall time and vs bytes. See p2pfm/bench/compare.py."
        ),
    )
    parser.add_argument(
        "--peers", type=int, default=None, help="processes per distributed variant (default 4; quick 2)"
    )
    parser.add_argument(
        "--samples-per-peer",
        type=int,
        default=None,
        help="training sequences per peer (default 2400; quick 480); a multiple of inner_steps*batch",
    )
    parser.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="eval loss for time_to_target_s (default: 5%% above single's final loss)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 peers, ~0.1M-param GPT, 480 samples/peer: minutes"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset (default p2pfm,p2pfm-uncompressed,hivemind,ddp,single; "
        "also hivemind-local)",
    )
    parser.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    parser.add_argument(
        "--shaped",
        action="store_true",
        help="root only: run p2pfm and ddp with each process in its own network namespace, "
        "links shaped to 50 Mbit/s and 30 ms (p2pfm/netlab)",
    )
    parser.add_argument(
        "--time-cap",
        type=float,
        default=None,
        help="stop each variant after this many seconds and report what it reached (default: none)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/compare"),
        help="writes compare.json, compare.png and raw/ logs here (default runs/compare)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the rows as a JSON list instead of a table"
    )
    parser.set_defaults(handler=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    import json

    from p2pfm.bench.compare import run_compare
    from p2pfm.bench.compare_config import config_from_args
    from p2pfm.bench.compare_report import format_table

    config = config_from_args(args)
    result = run_compare(config, progress=not args.json)
    if args.json:
        print(json.dumps(result["rows"], indent=2))
    else:
        print(format_table(result["rows"], result["target_loss"]))
        print(f"wrote {config.out_dir / 'compare.json'} and {config.out_dir / 'compare.png'}")
    return 0 if not any(row["error"] for row in result["rows"]) else 1


def register_swarm(bench_subparsers: argparse._SubParsersAction) -> None:
    """``p2pfm bench swarm``: bits/param/round, time shares and swarm efficiency of a local swarm."""
    from pathlib import Path

    parser = bench_subparsers.add_parser(
        "swarm",
        help="local swarm: bits/param/round, share of time outside compute, efficiency vs one process",
        description=(
            "Run a real local swarm of the default model, then one process with all cores on the same "
            "model; report bits/param/round, the share of round time in compute, gossip and eval, and "
            "swarm efficiency (samples/s of all peers over samples/s of one process). See p2pfm/bench/swarm.py."
        ),
    )
    parser.add_argument("--peers", type=int, default=3, help="peer processes (default 3)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per peer (default 15)")
    parser.add_argument("--inner-steps", type=int, default=10, help="inner steps per round (default 10)")
    parser.add_argument(
        "--single-seconds", type=float, default=30.0, help="one-process baseline duration (default 30)"
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_run_swarm)


def _run_swarm(args: argparse.Namespace) -> int:
    import json
    import sys

    from p2pfm.bench.swarm import SwarmBenchConfig, format_report, run_swarm_bench
    from p2pfm.swarm import PeerFailed

    config = SwarmBenchConfig(
        peers=args.peers,
        rounds=args.rounds,
        inner_steps=args.inner_steps,
        single_seconds=args.single_seconds,
        out_dir=args.out,
    )
    try:
        result = run_swarm_bench(config, progress=not args.json)
    except PeerFailed as exc:  # the peer's own error, not a traceback of ours
        print(f"p2pfm: error: {exc}\np2pfm: the benchmark's swarm was stopped", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else format_report(result))
    return 0


def register_fuzz(bench_subparsers: argparse._SubParsersAction) -> None:
    """``p2pfm bench fuzz``: a fuzz campaign against a live peer's stream handlers."""
    from pathlib import Path

    parser = bench_subparsers.add_parser(
        "fuzz",
        help="fuzz a live peer's gossip/state/params handlers over libp2p: counts, 0 crashes, 0 accepted",
        description=(
            "Start one real peer on loopback (or attach with --target), send it --count mutated and valid "
            "messages over its gossip, state and params streams, and count how it answered: rejected or "
            "ignored by reason, dropped, accepted. Fails (exit 1) if the peer accepted an invalid message, "
            "crashed (died, logged a traceback or an ERROR, stopped answering) or refused a valid control. "
            "See p2pfm/bench/fuzz.py and fuzz_cases.py."
        ),
    )
    parser.add_argument("--count", type=int, default=10_000, help="messages to send (default 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the messages (default 0)")
    parser.add_argument(
        "--target", default=None, metavar="MADDR", help="attach to this live peer (full multiaddr)"
    )
    parser.add_argument("--run-id", default=None, help="the target's run id (required with --target)")
    parser.add_argument(
        "--target-log", type=Path, default=None, help="an attached target's log, scanned for errors"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="streams in flight (default 16)")
    parser.add_argument(
        "--control-fraction", type=float, default=0.02, help="share of valid controls (default 0.02)"
    )
    parser.add_argument(
        "--peer-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for the launched target, repeatable (e.g. --peer-arg=--open)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the launched target's files here")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(handler=_run_fuzz)


def _run_fuzz(args: argparse.Namespace) -> int:
    from p2pfm.bench.fuzz import FuzzConfig, dump, format_report, passed, run_fuzz

    config = FuzzConfig(
        count=args.count, seed=args.seed, target=args.target, run_id=args.run_id, target_log=args.target_log,
        concurrency=args.concurrency, control_fraction=args.control_fraction,
        extra_peer_args=tuple(args.peer_arg), work_dir=args.work_dir,
    )  # fmt: skip
    result = run_fuzz(config, progress=not args.json)
    print(dump(result) if args.json else format_report(result))
    return 0 if passed(result) else 1


def register_scale(bench_subparsers: argparse._SubParsersAction) -> None:
    """``p2pfm bench scale``: memory, round-time split, bytes and state download at 1M-124M parameters."""
    from pathlib import Path

    from p2pfm.bench.scale_config import DEFAULT_SIZES, ScaleBenchConfig

    default = ScaleBenchConfig()
    parser = bench_subparsers.add_parser(
        "scale",
        help="model sizes 1M-124M: peak RSS vs a plain loop, round-time split, bytes, state download vs TCP",
        description=(
            "For each model preset: a plain single-process AdamW loop of the same model (its peak RSS), then "
            "a real local swarm (peak RSS and its breakdown per peer, round time split into compute, "
            "codec + sign, verify + decode, merge, snapshot and the rest, bytes per round) and a joiner "
            "downloading the full state, timed against a plain TCP copy of the same bytes on loopback. "
            "At 124M parameters on a laptop CPU this takes tens of minutes. See p2pfm/bench/scale.py."
        ),
    )
    parser.add_argument(
        "--sizes",
        default=",".join(DEFAULT_SIZES),
        help=f"comma-separated presets (default {','.join(DEFAULT_SIZES)})",
    )
    parser.add_argument(
        "--peers", type=int, default=default.peers, help=f"training peers (default {default.peers})"
    )
    parser.add_argument(
        "--rounds", type=int, default=default.rounds, help=f"measured rounds (default {default.rounds})"
    )
    parser.add_argument(
        "--inner-steps",
        type=int,
        default=default.inner_steps,
        help=f"steps per round (default {default.inner_steps})",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=default.batch_size,
        help=f"sequences per step (default {default.batch_size})",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=default.block_size,
        help=f"context per sequence (default {default.block_size})",
    )
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_run_scale)


def _run_scale(args: argparse.Namespace) -> int:
    import json
    import sys

    from p2pfm.bench.scale import ScaleBenchConfig, format_report, run_scale_bench
    from p2pfm.swarm import PeerFailed

    config = ScaleBenchConfig(
        sizes=tuple(s.strip() for s in args.sizes.split(",") if s.strip()), peers=args.peers,
        rounds=args.rounds, inner_steps=args.inner_steps, batch_size=args.batch_size,
        block_size=args.block_size, out_dir=args.out,
    )  # fmt: skip
    from p2pfm.model.config import GPT_PRESETS

    unknown = [s for s in config.sizes if s not in GPT_PRESETS]
    if unknown:
        print(
            f"p2pfm: error: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(GPT_PRESETS)}",
            file=sys.stderr,
        )
        return 2
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else print
    try:
        report = run_scale_bench(config, log=log)
    except (PeerFailed, TimeoutError) as exc:
        print(f"p2pfm: error: {exc}\np2pfm: the benchmark's swarm was stopped", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1, sort_keys=True) if args.json else format_report(report))
    return 0


def register_round(bench_subparsers: argparse._SubParsersAction) -> None:
    """``p2pfm bench round``: seconds of a round's arithmetic (make_update, receive, finish_round)."""
    parser = bench_subparsers.add_parser(
        "round",
        help="seconds of one peer's round arithmetic at any size, and a digest to compare code versions",
        description=(
            "Two in-process gossip learners (no torch, no network) run rounds: local = anchor + noise, "
            "make_update, receive the other's update, finish_round. Prints seconds per part (first "
            "round, best of the rest) and a SHA-256 of every wire and final array: two versions of the "
            "code with the same digest computed the same bits. See p2pfm/bench/round.py."
        ),
    )
    parser.add_argument("--numel", type=int, default=10_000_000, help="parameters (default 10,000,000)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after the first (default 3)")
    parser.add_argument("--codec", default="topk", help="codec id (default topk: top-1%% + int8)")
    parser.add_argument("--momentum", type=float, default=0.0, help="outer Nesterov momentum (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the anchor and noise (default 0)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_run_round)


def _run_round(args: argparse.Namespace) -> int:
    import json
    import sys

    from p2pfm.bench.round import RoundBenchConfig, format_report, run_round_bench
    from p2pfm.config import ConfigError

    try:
        config = RoundBenchConfig(
            numel=args.numel,
            rounds=args.rounds,
            codec=args.codec,
            outer_momentum=args.momentum,
            seed=args.seed,
        )
    except ConfigError as exc:
        print(f"p2pfm: error: {exc}", file=sys.stderr)
        return 2
    result = run_round_bench(config)
    print(json.dumps(result, indent=1, sort_keys=True) if args.json else format_report(result))
    return 0


def parse_shaped(text: str) -> tuple[float, float]:
    """``--shaped RATE_MBIT[,DELAY_MS]`` as (rate, delay); argparse reports a bad value with the flag."""
    parts = text.split(",")
    try:
        if len(parts) > 2:
            raise ValueError
        rate, delay = float(parts[0]), float(parts[1]) if len(parts) == 2 else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected RATE_MBIT or RATE_MBIT,DELAY_MS (e.g. 300 or 200,5)"
        ) from None
    if not rate > 0 or not delay >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the rate must be positive and the delay 0 or more")
    return rate, delay


def register_transfer(bench_subparsers: argparse._SubParsersAction) -> None:
    """``p2pfm bench transfer``: a joiner's state download against a plain TCP copy of the same bytes."""
    from pathlib import Path

    parser = bench_subparsers.add_parser(
        "transfer",
        help="state download (libp2p stream and direct lane) vs a plain TCP copy of the same bytes",
        description=(
            "Serve a random state of --bytes (params + two AdamW moments; 1.49e9 is a 124M model's) from a "
            "donor's snapshot with the daemon's own handlers and download it with the daemon's own client "
            "(signed manifest, every chunk hash-checked and written, whole-state checks), once with the "
            "chunks on the libp2p stream and once on the direct lane (sealed TCP); time each against a "
            "plain TCP copy of the same file (no framing, no hashing, bytes discarded). Report seconds, "
            "MB/s and each download's ratio to the TCP copy (medians of --repeats). Without --shaped all "
            "runs in one process on loopback (CPU-bound: it measures our CPU cost, not a link). With "
            "--shaped (root) donor and joiner are two processes in two network namespaces joined by links "
            "shaped to RATE_MBIT (and DELAY_MS each way of each link): the TCP copy and both downloads "
            "cross the same shaped link. Needs ~2x --bytes of free disk. See p2pfm/bench/transfer.py "
            "and transfer_shaped.py."
        ),
    )
    parser.add_argument(
        "--bytes",
        type=int,
        default=1_490_000_000,
        help="state size in bytes (default 1,490,000,000: a 124M model with its AdamW moments)",
    )
    parser.add_argument(
        "--shaped",
        type=parse_shaped,
        default=None,
        metavar="RATE_MBIT[,DELAY_MS]",
        help="root only: donor and joiner in two network namespaces, links shaped to RATE_MBIT Mbit/s "
        "and DELAY_MS ms on each direction of each link (round trip +4x DELAY_MS), e.g. 300 or 200,5",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="alternated rounds of TCP copy and downloads, medians (default 2)",
    )
    parser.add_argument(
        "--chunk-bytes", type=int, default=4 << 20, help="the donor's state chunk (default 4 MiB)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="snapshot and partial files here (default: a temp dir)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=_run_transfer)


def _run_transfer(args: argparse.Namespace) -> int:
    import json
    import sys

    if args.bytes < 4096 or args.repeats < 1:
        print("p2pfm: error: --bytes must be at least 4096 and --repeats at least 1", file=sys.stderr)
        return 2
    if args.shaped is not None:
        from p2pfm.bench.transfer_shaped import measure_shaped_download
        from p2pfm.netlab.netns import available

        reason = available()
        if reason:
            print(
                f"p2pfm: error: --shaped needs root and iproute2 ({reason}): run it with sudo, "
                "or drop --shaped for the loopback measurement",
                file=sys.stderr,
            )
            return 2
        rate, delay = args.shaped
        result = measure_shaped_download(
            args.bytes, rate, delay, args.repeats, args.work_dir, chunk_bytes=args.chunk_bytes
        )
    else:
        from p2pfm.bench.transfer import measure_download

        result = measure_download(
            args.bytes, chunk_bytes=args.chunk_bytes, work_dir=args.work_dir, repeats=args.repeats
        )
    print(json.dumps(result, indent=1) if args.json else format_transfer(result))
    return 0


def format_transfer(result: dict) -> str:
    """A few lines: the TCP copy, then each download's MB/s and share of the TCP copy's rate."""
    link = result.get("link")
    where = (
        f"links {link['rate_mbit']:g} Mbit/s ({link['link_MBps']:g} MB/s), +{link['rtt_added_ms']:g} ms RTT, "
        f"{link['shaper']}"
        if link
        else "loopback, one process"
    )
    lines = [
        f"p2pfm bench transfer: {result['total_bytes']:,} bytes, {where}, median of {result['repeats']}",
        f"  {'TCP copy':<30} {result['tcp_copy_MBps']:>8.1f} MB/s",
    ]
    for label, key, ratio in (
        ("download, libp2p stream", "libp2p_download_MBps", "download_vs_tcp"),
        ("  its chunks", "libp2p_stream_MBps", "stream_vs_tcp"),
        ("download, direct lane", "lane_download_MBps", "lane_download_vs_tcp"),
        ("  its chunks", "lane_MBps", "lane_vs_tcp"),
    ):
        lines.append(f"  {label:<30} {result[key]:>8.1f} MB/s  {100 * result[ratio]:5.1f} % of TCP")
    return "\n".join(lines)


BENCHES: list[Callable[[argparse._SubParsersAction], None]] = [
    register_codecs,
    register_swarm,
    register_compare,
    register_fuzz,
    register_scale,
    register_round,
    register_transfer,
]
"""Registration functions of every ``p2pfm bench`` subcommand, in help order."""
