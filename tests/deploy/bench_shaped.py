"""Benchmark: real peers over shaped links, update compression on vs off.

Each peer runs in its own network namespace behind its own shaped link, so that between any
two peers the path has the given rate, round-trip time and loss (default 20 Mbit/s, 50 ms,
1% each way): each link gets RTT/4 of delay per direction and the matching share of the
loss (a path crosses two links). The same run is made once per codec and the per-round
figures are printed as a markdown table for the README. No timing is asserted anywhere:
this is a measurement, run by hand as root::

    sudo .venv/bin/python tests/deploy/bench_shaped.py                  # none vs topk
    sudo .venv/bin/python tests/deploy/bench_shaped.py --rounds 30 --model default --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hostenv import apt_install, is_root  # noqa: E402
from labswarm import LabSwarm  # noqa: E402
from netns import NetLab, available  # noqa: E402

MODELS = {
    "tiny": ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--block-size", "64"],
    "small": ["--n-layer", "2", "--n-embd", "128", "--n-head", "4", "--block-size", "64"],
    "default": [],  # the daemon's own default GPT (~1M parameters)
}


def run_once(args: argparse.Namespace, codec: str) -> dict:
    """One swarm of ``args.peers`` with ``codec``; returns the per-round figures."""
    peer_args = [
        *MODELS[args.model],
        "--batch-size",
        "16",
        "--eval-batches",
        "2",
        "--codec",
        codec,
        "--rounds",
        str(args.rounds),
        "--min-peers",
        str(args.peers),
    ]
    with NetLab(args.peers) as lab, tempfile.TemporaryDirectory(prefix="p2pfm-bench-") as tmp:
        per_link_loss = 100 * (1 - (1 - args.loss_pct / 100) ** 0.5)
        lab.shape_all(rate_mbit=args.rate_mbit, delay_ms=args.rtt_ms / 4, loss_pct=per_link_loss)
        swarm = LabSwarm(lab, Path(tmp), peer_args, run_id=f"bench-{codec}")
        started = time.monotonic()
        try:
            swarm.start_all()
            swarm.wait(
                lambda: all(p.poll() is not None for p in swarm.procs.values()),
                args.timeout,
                f"{args.rounds} rounds with codec {codec}",
                exits_ok=True,
            )
        finally:
            swarm.stop_all()
        wall = time.monotonic() - started
        per_peer = {i: [r for r in swarm.metrics(i) if r.get("event") == "round"] for i in swarm.procs}
        shaper = lab.shaper
    rounds = [r for records in per_peer.values() for r in records]
    if not rounds:
        raise RuntimeError(f"no round finished with codec {codec}")
    round_s = [r["round_seconds"] for r in rounds]
    # Wall time per round, from each peer's first to its last round record.
    wall_per_round = [
        (records[-1]["time"] - records[0]["time"]) / (len(records) - 1)
        for records in per_peer.values()
        if len(records) > 1
    ]
    bytes_per_round = [
        records[-1]["update_bytes_sent"] / len(records) for records in per_peer.values() if records
    ]
    finals = [records[-1]["eval_loss"] for records in per_peer.values() if records]
    return {
        "codec": codec,
        "shaper": shaper,
        "peers": len(per_peer),
        "rounds": max(len(r) for r in per_peer.values()),
        "params": rounds[0].get("params"),
        "wall_s": wall,
        "round_s_median": statistics.median(round_s),
        "round_s_p90": sorted(round_s)[int(0.9 * (len(round_s) - 1))],
        "wall_per_round_s": statistics.mean(wall_per_round) if wall_per_round else float("nan"),
        "update_bytes_per_round": statistics.mean(bytes_per_round),
        "received_per_round": statistics.mean(r["received_updates"] for r in rounds),
        "final_eval_loss": statistics.mean(finals),
    }


def table(results: list[dict], args: argparse.Namespace) -> str:
    first = results[0]
    lines = [
        f"{first['peers']} peers in {first['peers']} network namespaces; between any two: {args.rate_mbit:g} Mbit/s, "
        f"{args.rtt_ms:g} ms round trip, {args.loss_pct:g}% loss each way (shaper: {first['shaper']}); "
        f"GPT '{args.model}' ({first['params']:,} parameters), {args.rounds} rounds, 1 torch thread per peer, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| codec | round time median / p90 (s) | wall time per round (s) | update bytes sent per peer per round "
        "| updates received per round | final eval loss |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['codec']} | {r['round_s_median']:.2f} / {r['round_s_p90']:.2f} | {r['wall_per_round_s']:.2f} "
            f"| {r['update_bytes_per_round']:,.0f} | {r['received_per_round']:.2f} | {r['final_eval_loss']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="p2pfm over shaped links: compression on vs off")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rate-mbit", type=float, default=20.0)
    parser.add_argument("--rtt-ms", type=float, default=50.0, help="round-trip time between two peers")
    parser.add_argument("--loss-pct", type=float, default=1.0, help="loss per direction between two peers")
    parser.add_argument("--codecs", default="none,topk", help="comma-separated: none, fp16, int8, topk")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per codec run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not is_root():
        parser.error("needs root (network namespaces)")
    reason = available()
    if reason:
        parser.error(reason)
    apt_install(["iptables"])
    results = []
    for codec in args.codecs.split(","):
        print(f"bench: codec {codec} ...", file=sys.stderr, flush=True)
        results.append(run_once(args, codec))
        print(f"bench: codec {codec}: {results[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    print(table(results, args))
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
