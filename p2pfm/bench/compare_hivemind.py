"""Baseline worker of ``p2pfm bench compare``: one ``hivemind.Optimizer`` peer per process.

hivemind forks helper processes (its DHT, a ``p2pd`` daemon), so each peer is its own OS
process started with ``subprocess`` (spawn-based multiprocessing fails on an unpicklable
lock). Rank 0 starts the DHT and writes its address to ``--maddr-file``; the others join
through ``--initial-peer`` and call ``load_state_from_peers()`` as hivemind's docs say.

Configuration (the collaborative one from ``hivemind.Optimizer``'s docstring, sized for a
small local run; see BRIEF section 6):

- ``mode=grad`` (default): gradients averaged every epoch, ``target_batch_size =
  world * batch_size`` (one optimizer step per local step, like DDP), fp16 compression of
  gradients and of the parameter averaging hivemind also runs every epoch
  (``average_state_every=1``, its default).
- ``mode=local``: ``use_local_updates=True`` (hivemind's quickstart): every peer steps on
  its own gradients, parameters are averaged in the background every epoch of
  ``world * batch_size * eval_every`` samples, i.e. as often as p2pfm gossips.
- ``matchmaking_time`` 1 s (hivemind suggests 3-5 s for small local runs; at one optimizer
  step per epoch that would dominate), ``averaging_timeout`` 10 s.

hivemind does not report bytes; the launcher measures what the ``p2pd`` children write.

    python -m p2pfm.bench.compare_hivemind --rank 0 --world 4 --maddr-file F --steps 200 ...
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from p2pfm.bench.compare_common import WorkerLog, add_worker_flags, batch_generator, inner_optimizer, setup
from p2pfm.model.data import evaluate

MATCHMAKING_TIME_S = 1.0
AVERAGING_TIMEOUT_S = 10.0


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, dht: object) -> object:
    import hivemind
    from hivemind.compression import Float16Compression

    local = args.mode == "local"
    target = args.world * args.batch_size * (args.eval_every if local else 1)
    return hivemind.Optimizer(
        dht=dht,
        run_id=args.run_id,
        batch_size_per_step=args.batch_size,
        target_batch_size=target,
        params=model.parameters(),
        optimizer=lambda params: inner_optimizer(args, params),
        use_local_updates=local,
        matchmaking_time=MATCHMAKING_TIME_S,
        averaging_timeout=AVERAGING_TIMEOUT_S,
        grad_compression=Float16Compression(),
        state_averaging_compression=Float16Compression(),
        load_state_compression=Float16Compression(),
        verbose=False,
    )


def wait_for_all(folder: Path, rank: int, world: int, timeout_s: float = 300.0) -> None:
    """File barrier: every rank has built its optimizer (and loaded state) before anyone trains.

    Without it, rank 0 trains alone while the others are still importing torch and joining,
    and on a small budget may finish before they arrive.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready-{rank}").touch()
    deadline = time.time() + timeout_s
    while sum(1 for i in range(world) if (folder / f"ready-{i}").exists()) < world:
        if time.time() > deadline:
            raise TimeoutError(f"not all {world} ranks were ready after {timeout_s:.0f} s")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m p2pfm.bench.compare_hivemind",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_worker_flags(parser)
    parser.add_argument("--mode", choices=("grad", "local"), default="grad")
    parser.add_argument("--run-id", default="p2pfm-compare-hivemind")
    parser.add_argument("--maddr-file", type=Path, help="rank 0 writes its DHT address here")
    parser.add_argument("--initial-peer", default=None, help="a live peer's multiaddr (ranks > 0)")
    parser.add_argument(
        "--barrier-dir",
        type=Path,
        default=None,
        help="start training only when every rank has written its ready file here",
    )
    args = parser.parse_args(argv)
    logging.getLogger("hivemind").setLevel(logging.WARNING)

    import hivemind

    log = WorkerLog(args.log)
    model, dataset, eval_set = setup(args)
    dht = hivemind.DHT(
        initial_peers=[args.initial_peer] if args.initial_peer else [],
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        start=True,
    )
    if args.maddr_file is not None:
        maddrs = [str(a) for a in dht.get_visible_maddrs()]
        tmp = args.maddr_file.with_suffix(".tmp")
        tmp.write_text(maddrs[0])
        tmp.replace(args.maddr_file)
    optimizer = build_optimizer(args, model, dht)
    if args.initial_peer:
        optimizer.load_state_from_peers()
    if args.barrier_dir is not None:
        wait_for_all(args.barrier_dir, args.rank, args.world)
    generator = batch_generator(args.seed, args.rank)
    log.write(
        "start", rank=args.rank, params=model.num_parameters(), initial_eval_loss=evaluate(model, eval_set)
    )
    for step in range(1, args.steps + 1):
        inputs, targets = dataset.batch(generator, args.batch_size)
        _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            log.write(
                "eval",
                step=step,
                samples=step * args.batch_size,
                eval_loss=evaluate(model, eval_set),
                train_loss=float(loss.detach()),
                epoch=int(optimizer.local_epoch),
            )
    log.write(
        "end", rank=args.rank, steps=args.steps, epochs=int(optimizer.local_epoch), wall_end=time.time()
    )
    log.close()
    optimizer.shutdown()
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
