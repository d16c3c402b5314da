"""``p2pfm swarm``: a local multi-peer swarm of real processes on loopback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from p2pfm.cli.peer import add_peer_flags, overrides_from_args

SWARM_MANAGED = (
    "--key",
    "--work-dir",
    "--run-id",
    "--seed",
    "--rounds",
    "--shard",
    "--num-shards",
    "--threads",
    "--min-peers",
    "--listen",
    "--announce",
    "--initial-peers",
    "--authority",
    "--cert",
    "--revocations",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "swarm",
        help="run N real peers on this machine and summarize the run",
        description="Start N real peer processes on loopback (each its own DHT node and libp2p host), "
        "show progress, stop them, and write OUT/summary.json and OUT/loss.png. Training flags pass "
        "through to every peer. The swarm is admitted: it makes its own authority (OUT/authority.key) and "
        "certifies every peer, as a swarm across machines would; --open runs an open swarm instead.",
    )
    parser.add_argument("--peers", type=int, default=3, help="number of peer processes (default 3)")
    parser.add_argument("--rounds", type=int, default=30, help="gossip rounds per peer (default 30)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/swarm-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    parser.add_argument("--run-id", default="p2pfm-swarm", help="swarm name")
    parser.add_argument(
        "--threads-per-peer", type=int, default=0, help="torch threads per peer (0 = cores // peers)"
    )
    parser.add_argument("--json", action="store_true", help="print summary.json to stdout")
    add_peer_flags(parser, skip=SWARM_MANAGED)
    parser.set_defaults(handler=run)


def _passthrough(args: argparse.Namespace) -> list[str]:
    from p2pfm.cli.peer import LIST_FLAGS, PEER_FLAGS

    result: list[str] = []
    for flag in {**PEER_FLAGS, **LIST_FLAGS}:
        if flag in SWARM_MANAGED:
            continue
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        result += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return result


def run(args: argparse.Namespace) -> int:
    import time

    from p2pfm.config import ConfigError
    from p2pfm.daemon.config import load_peer_config
    from p2pfm.swarm import PeerFailed, SwarmOptions, run_swarm

    load_peer_config(None, overrides_from_args(args))  # validate pass-through flags before starting anything
    if args.data is not None and not Path(args.data).exists():
        raise ConfigError(f"--data: {args.data} does not exist; give a folder of text files or one text file")
    out = args.out or Path("runs") / time.strftime("swarm-%Y%m%d-%H%M%S")
    try:
        summary = run_swarm(
            SwarmOptions(
                peers=args.peers,
                rounds=args.rounds,
                out_dir=out,
                seed=args.seed,
                run_id=args.run_id,
                peer_args=tuple(_passthrough(args)),
                threads_per_peer=args.threads_per_peer,
                admitted=not args.open,
            )
        )
    except PeerFailed as exc:
        # The peer's own error, not a traceback of ours: the swarm only noticed it.
        print(
            f"p2pfm: error: {exc}\np2pfm: the swarm was stopped; every peer's log is in {out}/peer-*/peer.log",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        print(
            f"swarm of {summary['peers']} peers, {summary['rounds']} rounds, {summary['params']:,} parameters, "
            f"{summary['wall_seconds']:.0f} s"
        )
        print(
            f"eval loss {summary['initial_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f} nats/byte; "
            f"consensus distance {summary['consensus_distance']:.2e}; "
            f"{summary['bits_per_param_per_round']:.3f} bits/param/round"
        )
        split = summary.get("data_split") or {}
        if split.get("shard_bytes"):
            shards = ", ".join(f"{b:,}" for b in split["shard_bytes"].values())
            print(
                f"data: {split['corpus_bytes']:,} bytes of text; held-out {split['holdout_bytes']:,} bytes; "
                f"shards in memory {shards} bytes"
            )
        print(f"wrote {out / 'summary.json'} and {out / 'loss.png'}")
    return 0
