"""In-process ablation of the gossip algorithm on the default GPT: N peers, one process, real bytes.

Each peer is a :class:`p2pfm.core.protocol.PeerProtocol` (the object the daemon and the simulator
drive) with its own :class:`LocalTrainer`. Peers run in lock-step, one round at a time, and the
bench carries out what the protocol decides, as the daemon's round driver does
(``p2pfm/daemon/rounds.py``):

1. every peer runs H inner AdamW steps, builds its update (``make_update``), seals it once
   (signed) and pushes the bytes to ``fanout`` random other peers (``choose_partners``, one
   seeded RNG per peer);
2. every receiver runs every receiving rule on those bytes (``receive_update``: envelope,
   signature, kind, metadata, round window, codec);
3. every peer merges with the daemon's sum-preserving weights (``finish_round(live_others)``)
   and follows its ``plan_round``: a ``Sync`` is a parameter pull from one random other peer
   (signed ``state_request`` -> ``serve_params`` -> ``open_params`` -> ``mix``);
4. after the last round every peer drains (``drain``), as the daemon's final drain does.

Nobody leaves and every peer is at the same round, so a ``CatchUp`` plan cannot occur; if one did,
the bench stops with an error instead of inventing a state transfer. Signatures are made and
verified (Ed25519); the virtual clock advances one second per round. Everything is seeded
(models, data order, keys, partners, nonces), torch runs on one thread per process, and the
figures do not depend on ``--jobs``.

Measured per variant: the mean held-out eval loss over peers after each round, the consensus
distance (mean ||x_i - mean|| / ||mean||), and bits per parameter per round per peer of sealed
update messages (whole envelopes, as sent) and of parameter-sync answers. Used to choose the
defaults recorded in ``protocols/gossip.md`` section 2 (``PYTHONPATH=.``: this checkout's p2pfm,
whatever else is installed; the JSON records which one ran):

    PYTHONPATH=. python bench/gossip_ablation.py --peers 3 --rounds 20 \\
        --variants none,topk,topk-f1,topk-sync10 --jobs 2 --out bench/results/ablation-2026-11-30
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import p2pfm
from p2pfm.core.codecs import CodecSpec
from p2pfm.core.errors import Refusal
from p2pfm.core.gossip import GossipConfig, choose_partners, consensus_distance
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import CatchUp, Event, LocalWork, PeerProtocol, PeerSetup, Sync
from p2pfm.daemon.trainer import LocalTrainer
from p2pfm.model.config import InnerTrainConfig
from p2pfm.model.data import ByteDataset, ShardSpec
from p2pfm.model.gpt import GPTConfig, build_model

# Each variant changes one thing of the default algorithm; all but topk-sync10 never sync, so the
# syncs do not blur what the variant changes (with 3 peers the default "auto" interval is 50
# rounds, so "topk" is the default configuration for runs of up to 49 rounds).
VARIANTS = {
    "none": GossipConfig(codec=CodecSpec(name="none"), sync_every=0),
    "int8": GossipConfig(codec=CodecSpec(name="int8"), sync_every=0),
    "topk": GossipConfig(sync_every=0),
    "topk-sync10": GossipConfig(sync_every=10),
    "topk-f1": GossipConfig(fanout=1, sync_every=0),
    "topk-nesterov": GossipConfig(sync_every=0, outer_lr=0.7, outer_momentum=0.9),
    "topk3": GossipConfig(codec=CodecSpec(topk_fraction=0.03), sync_every=0),
}
RUN_ID = "gossip-ablation"
CLOCK_START = 1_800_000_000.0  # virtual unix time of round 0; one second per round
TRAIN = InnerTrainConfig()  # the daemon's default inner loop: batch 16, lr 3e-3, 4 x 16 held-out batches


@dataclasses.dataclass
class Peer:
    protocol: PeerProtocol
    trainer: LocalTrainer
    rng: np.random.Generator  # partners and nonces, like the daemon's per-peer RNG

    @property
    def id(self) -> str:
        return self.protocol.peer_id


def make_peers(config: GossipConfig, count: int, seed: int) -> list[Peer]:
    model_config = GPTConfig()
    keys = np.random.default_rng([seed, 1])
    peers = []
    for index in range(count):
        dataset = ByteDataset(
            None,
            ShardSpec(index, count),
            block_size=model_config.block_size,
            max_shard_bytes=TRAIN.max_shard_bytes,
        )
        trainer = LocalTrainer(
            build_model(model_config, seed),
            dataset,
            lr=TRAIN.lr,
            weight_decay=TRAIN.weight_decay,
            batch_size=TRAIN.batch_size,
            seed=seed * 1000 + index,
            eval_batches=TRAIN.eval_batches,
            eval_batch_size=TRAIN.eval_batch_size,
        )
        setup = PeerSetup(identity=Identity.from_private_bytes(keys.bytes(32)), run_id=RUN_ID, gossip=config)
        protocol = PeerProtocol(setup, trainer.flat())
        peers.append(Peer(protocol, trainer, np.random.default_rng([seed, 2, index])))
    return peers


def pull_params(peer: Peer, donor: Peer, now: float) -> int:
    """One consensus pull, both sides, as the daemon's ``pull_params`` / ``handle_params``; returns bytes served."""
    nonce = peer.rng.bytes(16)
    request = peer.protocol.state_request(nonce, now)
    answer = donor.protocol.serve_params(donor.protocol.open(request, now, stream="params"), now)
    params, round_ = peer.protocol.open_params(answer, donor.protocol.identity.public_key_bytes, nonce, now)
    peer.protocol.mix(params, round_)
    peer.trainer.load_flat(peer.protocol.params)
    return len(answer)


def run(variant: str, peers_count: int, rounds: int, seed: int) -> dict:
    torch.set_num_threads(1)
    config = VARIANTS[variant]
    peers = make_peers(config, peers_count, seed)
    ids = [p.id for p in peers]
    by_id = {p.id: p for p in peers}
    live_others = peers_count - 1
    for peer in peers:  # start-up: online, and the swarm is not ahead of anybody
        peer.protocol.fire(Event.ONLINE)
        assert peer.protocol.plan_join(max(p.protocol.round for p in peers if p is not peer)) is None
        peer.protocol.fire(Event.QUORUM_SETTLED)
    history, update_bytes, sync_bytes, syncs, refused = [], 0, 0, 0, 0
    start = time.perf_counter()
    for round_index in range(rounds):
        now = CLOCK_START + round_index
        outbox = []
        for peer in peers:
            stats = peer.trainer.train_steps(config.inner_steps)
            work = LocalWork(samples=stats.samples, inner_steps=stats.steps, train_loss=stats.mean_loss)
            message = peer.protocol.seal("update", peer.protocol.make_update(peer.trainer.flat(), work), now)
            for target in choose_partners(ids, peer.id, config.fanout, peer.rng):
                outbox.append((by_id[target], peer.id, message))
                update_bytes += len(message)
        for receiver, sender, message in outbox:
            try:
                receiver.protocol.receive_update(sender, message, now)
            except Refusal:  # counted by the protocol; in lock-step none is expected
                refused += 1
        received = []
        for peer in peers:
            params, report = peer.protocol.finish_round(live_others)
            peer.trainer.load_flat(params)
            received.append(report.received)
        synced = 0
        for peer in peers:
            newest = max(p.protocol.round for p in peers if p is not peer)
            plan = peer.protocol.plan_round(newest, live_others)
            if isinstance(plan, CatchUp):
                raise RuntimeError(f"{variant}: catch-up plan {plan} in a lock-step run (a bench bug)")
            if isinstance(plan, Sync):
                partner = choose_partners(ids, peer.id, 1, peer.rng)[0]
                sync_bytes += pull_params(peer, by_id[partner], now)
                synced += 1
        syncs += synced
        losses = [p.trainer.evaluate() for p in peers]
        history.append(
            {
                "round": round_index + 1,
                "eval_loss": float(np.mean(losses)),
                "eval_losses": [float(x) for x in losses],
                "consensus": consensus_distance([p.protocol.params for p in peers]),
                "received": received,
                "syncs": synced,
            }
        )
        h = history[-1]
        print(
            f"{variant:>14} round {h['round']:3d}/{rounds}  loss {h['eval_loss']:.4f}  consensus {h['consensus']:.2e}  "
            f"received {received}  syncs {synced}  {time.perf_counter() - start:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    drained = 0
    for peer in peers:  # the daemon's final drain (in lock-step every update was merged in its round)
        peer.protocol.fire(Event.ROUNDS_DONE)
        params, applied = peer.protocol.drain(live_others)
        peer.trainer.load_flat(params)
        peer.protocol.fire(Event.STOP)
        drained += applied
    if drained:
        losses = [p.trainer.evaluate() for p in peers]
        history[-1].update(
            eval_loss=float(np.mean(losses)),
            eval_losses=[float(x) for x in losses],
            consensus=consensus_distance([p.protocol.params for p in peers]),
        )
    numel, peer_rounds = peers[0].protocol.learner.numel, peers_count * rounds
    return {
        "variant": variant,
        "final_eval_loss": history[-1]["eval_loss"],
        "consensus_distance": history[-1]["consensus"],
        "bits_per_param_per_round": 8 * update_bytes / (numel * peer_rounds),
        "sync_bits_per_param_per_round": 8 * sync_bytes / (numel * peer_rounds),
        "syncs": syncs,
        "drained": drained,
        "messages_accepted": sum(p.protocol.accepted for p in peers),
        "messages_refused": refused,
        "messages_rejected": _merged(p.protocol.scores.rejected for p in peers),
        "messages_ignored": _merged(p.protocol.scores.ignored for p in peers),
        "params": numel,
        "seconds": round(time.perf_counter() - start, 1),
        "history": history,
        "config": dataclasses.asdict(config),
    }


def _merged(counters) -> dict[str, int]:
    total: dict[str, int] = {}
    for counter in counters:
        for reason, count in counter.items():
            total[reason] = total.get(reason, 0) + count
    return dict(sorted(total.items()))


def table(results: list[dict], rounds: int) -> str:
    lines = [
        f"| variant | eval loss after {rounds} rounds | consensus distance | update bits/param/round "
        "| sync bits/param/round | syncs | refused |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['final_eval_loss']:.4f} | {r['consensus_distance']:.2e} "
            f"| {r['bits_per_param_per_round']:.3f} | {r['sync_bits_per_param_per_round']:.3f} "
            f"| {r['syncs']} | {r['messages_refused']} |"
        )
    return "\n".join(lines)


def git_state(package: Path) -> dict:
    """Commit and cleanliness of the checkout the measured ``p2pfm`` was imported from."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=package, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "p2pfm": str(package),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", type=int, default=3, help="peers in the swarm (default 3)")
    parser.add_argument("--rounds", type=int, default=20, help="gossip rounds (default 20)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds models, data order, keys, partners (default 0)"
    )
    parser.add_argument(
        "--variants",
        default="none,topk,topk-sync10",
        help=f"comma-separated, of: {', '.join(VARIANTS)} (default none,topk,topk-sync10)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="variants run in parallel processes (default 1)")
    parser.add_argument("--json", help="write the results (config, rows, per-round history) here")
    parser.add_argument("--out", help="folder for ablation.json and table.txt (bench/results convention)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.peers < 2 or args.rounds < 1 or args.jobs < 1:
        parser.error("need --peers >= 2, --rounds >= 1, --jobs >= 1")
    package = Path(p2pfm.__file__).resolve().parent
    checkout = Path(__file__).resolve().parents[1]
    if package.parent != checkout:  # `python bench/...` puts bench/, not the cwd, first on sys.path
        print(
            f"warning: measuring the p2pfm at {package}, not this checkout's ({checkout}); "
            f"run with PYTHONPATH={checkout} to measure this one",
            file=sys.stderr,
        )
    started = time.perf_counter()
    tasks = [(v, args.peers, args.rounds, args.seed) for v in variants]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(tasks))) as pool:
            results = pool.starmap(run, tasks)
    else:
        results = [run(*task) for task in tasks]
    seconds = time.perf_counter() - started
    command = "python bench/gossip_ablation.py " + " ".join(sys.argv[1:])
    text = table(results, args.rounds)
    print(text)
    print(
        f"{len(results)} variant(s), {args.peers} peers, {args.rounds} rounds, seed {args.seed}: "
        f"{seconds:.0f} s wall with --jobs {args.jobs}",
        file=sys.stderr,
    )
    document = {
        "command": command,
        "config": {
            "peers": args.peers,
            "rounds": args.rounds,
            "seed": args.seed,
            "variants": variants,
            "model": dataclasses.asdict(GPTConfig()),
            "train": dataclasses.asdict(TRAIN),
            "signatures": "ed25519, made and verified",
            "clock": "virtual, one second per round",
        },
        "git": git_state(package),
        "wall_seconds": round(seconds, 1),
        "results": results,
    }
    paths = [Path(args.json)] if args.json else []
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        paths.append(out / "ablation.json")
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (out / "table.txt").write_text(f"{command}\n{date}, {seconds:.0f} s wall\n\n{text}\n")
    for path in paths:
        path.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
