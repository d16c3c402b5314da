"""In-process ablation of the gossip algorithm on the default GPT (no network, no signing).

Runs N peers round-robin in one process through the real :class:`GossipLearner` (same code
as the daemon) to compare codecs, fanout and sync settings on final eval loss and consensus
distance. Used to choose the defaults recorded in ``protocols/gossip.md``.

    python bench/gossip_ablation.py --peers 3 --rounds 20 --variants none,topk,topk-sync10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from p2pfm.core.codecs import CodecSpec
from p2pfm.core.gossip import GossipConfig, GossipLearner, choose_partners
from p2pfm.daemon.trainer import LocalTrainer
from p2pfm.model.data import ByteDataset, ShardSpec
from p2pfm.model.gpt import GPTConfig, build_model
from p2pfm.swarm import consensus_distance

VARIANTS = {
    "none": GossipConfig(codec=CodecSpec(name="none"), sync_every=0),
    "int8": GossipConfig(codec=CodecSpec(name="int8"), sync_every=0),
    "topk": GossipConfig(sync_every=0),
    "topk-sync10": GossipConfig(sync_every=10),
    "topk-f1": GossipConfig(fanout=1, sync_every=0),
    "topk-nesterov": GossipConfig(sync_every=0, outer_lr=0.7, outer_momentum=0.9),
    "topk3": GossipConfig(codec=CodecSpec(topk_fraction=0.03), sync_every=0),
}


def run(variant: str, peers: int, rounds: int, seed: int) -> dict:
    config = VARIANTS[variant]
    model_config = GPTConfig()
    rng = np.random.default_rng(seed)
    trainers, learners = [], []
    for index in range(peers):
        dataset = ByteDataset(None, ShardSpec(index, peers), block_size=model_config.block_size)
        trainer = LocalTrainer(
            build_model(model_config, seed),
            dataset,
            lr=3e-3,
            weight_decay=0.0,
            batch_size=16,
            seed=seed * 1000 + index,
            eval_batches=4,
            eval_batch_size=16,
        )
        trainers.append(trainer)
        learners.append(GossipLearner(trainer.flat(), config))
    ids = [f"peer{i}" for i in range(peers)]
    history, bytes_sent = [], 0
    start = time.time()
    for round_index in range(rounds):
        outbox = []
        for i, (trainer, learner) in enumerate(zip(trainers, learners, strict=True)):
            trainer.train_steps(config.inner_steps)
            wire = learner.make_update(trainer.flat())
            size = sum(len(v) for v in wire.values() if isinstance(v, bytes))
            for target in choose_partners(ids, ids[i], config.fanout, rng):
                outbox.append((ids.index(target), ids[i], round_index, wire))
                bytes_sent += size
        for target, sender, sender_round, wire in outbox:
            learners[target].receive(sender, sender_round, wire)
        for trainer, learner in zip(trainers, learners, strict=True):
            params, _ = learner.finish_round()
            trainer.load_flat(params)
        for i, learner in enumerate(learners):
            if learner.should_sync():
                partner = choose_partners(ids, ids[i], 1, rng)[0]
                learner.mix_with(learners[ids.index(partner)].params, learners[ids.index(partner)].round)
                trainers[i].load_flat(learner.params)
        losses = [t.evaluate() for t in trainers]
        history.append(
            {
                "round": round_index + 1,
                "eval_loss": float(np.mean(losses)),
                "consensus": consensus_distance([lr.params for lr in learners]),
            }
        )
        print(variant, history[-1], f"{time.time() - start:.0f}s", flush=True)
    numel = learners[0].numel
    return {
        "variant": variant,
        "final_eval_loss": history[-1]["eval_loss"],
        "consensus_distance": history[-1]["consensus"],
        "bits_per_param_per_round": 8 * bytes_sent / (numel * peers * rounds),
        "history": history,
        "config": dataclasses.asdict(config),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="none,topk,topk-sync10")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [run(v, args.peers, args.rounds, args.seed) for v in args.variants.split(",")]
    for r in results:
        print(
            f"{r['variant']:>14}  loss {r['final_eval_loss']:.4f}  consensus {r['consensus_distance']:.2e}  "
            f"bits/param/round {r['bits_per_param_per_round']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
