"""``p2pfm attack``: a live malicious peer that replays issue 12's attacks on a swarm you run.

Each flag maps to one field of :class:`p2pfm.daemon.attacker.AttackConfig`; the attacks are
in :mod:`p2pfm.daemon.attack_moves`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pfm.cli.peer import PEER_FLAGS

# p2pfm.core.attacks.UPDATE_ATTACKS, named here so that building the parser imports no numpy
# (tests/test_attack_cli.py checks that they agree).
FORGES = ("sign_flip", "scaling", "noise", "constant_direction", "free_rider", "nan")
MODEL_FLAGS = ("--n-layer", "--n-embd", "--n-head", "--block-size")

EPILOG = """attacks (several run side by side):
  far_ahead       announce --claim-round (default 1,000,000), or the swarm's newest + --ahead K
  poisoned_state  serve --state (zero|scaled|noise|initial) as our state and params; its hash
                  matches our own signed announcement
  updates         a forged update (--forge, --scale) to every live peer each --interval,
                  claiming its announced round + --lead, from --keys keys
  many_rounds     --rounds-per-round updates per push, each claiming another round
  drain           once peers announce --final-round (they drain), push forged updates to them
  sybil           announce --count fresh identities (default 200) pointing at us
  dht_junk        --count junk DHT records (default 5000), one over a live peer's subkey
  flood           valid updates at --rate per second (default 500)
  burst           --count valid top-k updates at once (default 400), from --keys keys
  id_churn        rejected messages from a new libp2p identity every --every (45) messages
  big_frames      --count parallel frames (default 4) of --frame-mib (60) MiB of junk
  state_leech     request state and params from every peer, --count times (default 5)

The log (--out) has one JSON object a line: "online", events, and "summary" lines per attack
with answers counted ("accepted", "refused" by reason, "failed") and bytes received.
Only for swarms you run: this is how p2pfm's defences are tested."""


def count_value(text: str) -> tuple[str, int]:
    """``--count``: ``N`` (every attack, key ``*``) or ``ATTACK=N``."""
    name, _, number = text.rpartition("=")
    try:
        return name or "*", int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or ATTACK=N, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attack",
        help="run a malicious peer against a swarm (tests the defences)",
        description="Join a swarm's DHT like a peer and run the chosen attacks until --duration or Ctrl-C.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from p2pfm.daemon.attacker import ATTACKS, STATES  # light: no numpy until an attack runs

    parser.add_argument(
        "--initial-peers", nargs="+", required=True, metavar="MULTIADDR", help="any live peer"
    )
    parser.add_argument("--run-id", required=True, help="the swarm's run id")
    parser.add_argument(
        "--attack", nargs="+", required=True, choices=ATTACKS, metavar="NAME", help="see below"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON-lines log (default WORK_DIR/attack.jsonl)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("p2pfm-attack"), help="the persona's files")
    parser.add_argument(
        "--key", type=Path, default=None, help="persona key file (an insider's; default: fresh)"
    )
    parser.add_argument(
        "--cert", type=Path, default=None, help="persona admission certificate (insider mode)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the run's seed (our initial weights are the swarm's)"
    )
    for flag in MODEL_FLAGS:
        parser.add_argument(flag, type=int, default=None, help=f"as the swarm's peers: {PEER_FLAGS[flag][2]}")
    parser.add_argument("--claim-round", type=int, default=1_000_000, help="far_ahead: round to announce")
    parser.add_argument(
        "--ahead", type=int, default=None, help="far_ahead: announce newest round + this instead"
    )
    parser.add_argument("--state", choices=STATES, default="zero", help="what we serve as our state")
    parser.add_argument("--state-scale", type=float, default=100.0, help="scaled/noise state strength")
    parser.add_argument("--forge", default="scaling", help=f"update attack: {', '.join(FORGES)}")
    parser.add_argument("--scale", type=float, default=None, help="its strength (default: the registry's)")
    parser.add_argument("--keys", type=int, default=1, help="signing keys for updates (1 = the persona's)")
    parser.add_argument(
        "--rounds-per-round", type=int, default=33, help="many_rounds: rounds claimed per push"
    )
    parser.add_argument("--final-round", type=int, default=0, help="drain: the swarm's --rounds")
    parser.add_argument(
        "--count",
        nargs="+",
        type=count_value,
        default=[],
        metavar="[ATTACK=]N",
        help="how many: N for every attack, or ATTACK=N (default: each attack's own)",
    )
    parser.add_argument("--rate", type=float, default=500.0, help="flood: updates per second")
    parser.add_argument("--every", type=int, default=45, help="id_churn: messages per libp2p identity")
    parser.add_argument("--frame-mib", type=int, default=60, help="big_frames: MiB per frame")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between pushes to a peer")
    parser.add_argument("--lead", type=int, default=4, help="claim a peer's announced round + this")
    parser.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0 = never)"
    )
    parser.add_argument("--target", default=None, help="attack only this peer id (default: every live peer)")
    parser.add_argument(
        "--no-announce", action="store_true", help="do not announce the persona (a silent stranger)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from p2pfm.daemon.attacker import AttackConfig, run_attack

    model = {
        flag.lstrip("-").replace("-", "_"): getattr(args, flag.lstrip("-").replace("-", "_"))
        for flag in MODEL_FLAGS
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None
    }
    config = AttackConfig(
        initial_peers=tuple(args.initial_peers), run_id=args.run_id, attacks=tuple(dict.fromkeys(args.attack)),
        out=args.out or args.work_dir / "attack.jsonl", work_dir=args.work_dir, key=args.key, cert=args.cert,
        seed=args.seed, model=model, claim_round=args.claim_round, ahead=args.ahead, state=args.state,
        state_scale=args.state_scale, forge=args.forge, scale=args.scale, keys=args.keys,
        rounds_per_round=args.rounds_per_round, final_round=args.final_round, counts=dict(args.count), rate=args.rate,
        every=args.every, frame_mib=args.frame_mib, interval_s=args.interval, lead=args.lead,
        duration_s=args.duration, announce=not args.no_announce, target=args.target,
    )  # fmt: skip
    return run_attack(config)
