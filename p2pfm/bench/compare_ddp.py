"""Baseline workers of ``p2pfm bench compare``: ``ddp`` (one rank) and ``single``.

- ``ddp``: torch DistributedDataParallel over gloo on 127.0.0.1, one process per rank,
  gradients all-reduced after every backward; each rank draws ``--batch-size`` sequences
  from its own shard ``ShardSpec(rank, world)``. Rank 0 evaluates every ``--eval-every``
  steps (the others wait for it at the next all-reduce, as they would in practice).
  Bytes are not measured: a ring all-reduce sends ``2 (n-1)/n * 4 * params`` bytes per
  rank per step, which the launcher computes.
- ``single``: one process and no network. Each step takes ``--batch-size`` sequences from
  every one of the ``--world`` shards (the total batch the swarm trains per step, on the
  same bytes), for ``--steps`` steps: the same samples as all peers together.

    python -m p2pfm.bench.compare_ddp ddp --rank 0 --world 4 --port 29500 --steps 200 ...
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from p2pfm.bench.compare_common import (
    EVAL_BATCH_SIZE,
    EVAL_BATCHES,
    WorkerLog,
    add_worker_flags,
    batch_generator,
    inner_optimizer,
    model_config,
    setup,
)
from p2pfm.model.data import ByteDataset, ShardSpec, evaluate
from p2pfm.model.train import train_step


def run_ddp(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    log = WorkerLog(args.log)
    model, dataset, eval_set = setup(args)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{args.host}:{args.port}",
        rank=args.rank,
        world_size=args.world,
    )
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's weights: identical start anyway
    optimizer = inner_optimizer(args, ddp.parameters())
    generator = batch_generator(args.seed, args.rank)
    log.write(
        "start",
        rank=args.rank,
        params=model.num_parameters(),
        initial_eval_loss=evaluate(model, eval_set) if args.rank == 0 else None,
    )
    for step in range(1, args.steps + 1):
        inputs, targets = dataset.batch(generator, args.batch_size)
        loss = train_step(
            ddp, optimizer, inputs, targets
        )  # the all-reduce runs in backward, bucket by bucket
        if args.rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            log.write(
                "eval",
                step=step,
                samples=step * args.batch_size,
                eval_loss=evaluate(model, eval_set),
                train_loss=loss,
            )
    dist.barrier()
    log.write("end", rank=args.rank, steps=args.steps)
    dist.destroy_process_group()
    log.close()
    return 0


def run_single(args: argparse.Namespace) -> int:
    log = WorkerLog(args.log)
    torch.set_num_threads(args.threads)
    config = model_config(args)
    from p2pfm.model.gpt import build_model

    model = build_model(config, args.seed)
    shards = [
        ByteDataset(None, ShardSpec(i, args.world), block_size=config.block_size) for i in range(args.world)
    ]
    eval_set = shards[0].eval_batches(EVAL_BATCHES, EVAL_BATCH_SIZE)
    optimizer = inner_optimizer(args, model.parameters())
    generators = [batch_generator(args.seed, i) for i in range(args.world)]
    log.write("start", rank=0, params=model.num_parameters(), initial_eval_loss=evaluate(model, eval_set))
    for step in range(1, args.steps + 1):
        parts = [shard.batch(g, args.batch_size) for shard, g in zip(shards, generators, strict=True)]
        inputs = torch.cat([p[0] for p in parts])  # (world * B, T)
        targets = torch.cat([p[1] for p in parts])
        loss = train_step(model, optimizer, inputs, targets)
        if step % args.eval_every == 0 or step == args.steps:
            log.write(
                "eval",
                step=step,
                samples=step * args.batch_size * args.world,
                eval_loss=evaluate(model, eval_set),
                train_loss=loss,
            )
    log.write("end", rank=0, steps=args.steps, wall_end=time.time())
    log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2pfm.bench.compare_ddp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", choices=("ddp", "single"))
    parser.add_argument("--host", default="127.0.0.1", help="ddp: rank 0's address")
    parser.add_argument("--port", type=int, default=0, help="ddp: rank 0's TCP port")
    add_worker_flags(parser)
    args = parser.parse_args(argv)
    return run_ddp(args) if args.mode == "ddp" else run_single(args)


if __name__ == "__main__":
    sys.exit(main())
