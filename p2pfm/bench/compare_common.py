"""What every baseline worker of ``p2pfm bench compare`` shares: flags, model, data, eval log.

A worker is one OS process (``python -m p2pfm.bench.compare_ddp ...`` or
``python -m p2pfm.bench.compare_hivemind ...``). It builds exactly what a ``p2pfm peer``
builds for the same flags: the default GPT (or the flags' smaller config) from the run seed,
the peer's corpus shard ``ShardSpec(rank, world)``, the fixed held-out batches, and the
daemon's inner optimizer and step (:mod:`p2pfm.model.train`). It appends JSON lines to ``--log``: one ``start``, one ``eval`` every
``--eval-every`` local steps, one ``end``. Times are unix seconds, so the launcher aligns
all processes on its own clock.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from p2pfm.model.config import InnerTrainConfig
from p2pfm.model.data import ByteDataset, ShardSpec
from p2pfm.model.gpt import GPT, GPTConfig, build_model
from p2pfm.model.train import build_inner_optimizer

# The daemon's [train] defaults, read rather than copied: every variant scores the same bytes.
EVAL_BATCHES = InnerTrainConfig().eval_batches
EVAL_BATCH_SIZE = InnerTrainConfig().eval_batch_size


def add_worker_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every worker takes; the launcher passes the same values to every variant."""
    parser.add_argument("--rank", type=int, required=True, help="this process's index (its data shard)")
    parser.add_argument("--world", type=int, required=True, help="number of processes (shards)")
    parser.add_argument("--steps", type=int, required=True, help="local optimizer steps to run")
    parser.add_argument("--batch-size", type=int, required=True, help="sequences per local step")
    parser.add_argument("--lr", type=float, required=True, help="AdamW learning rate")
    parser.add_argument("--eval-every", type=int, required=True, help="local steps between evaluations")
    parser.add_argument("--seed", type=int, required=True, help="run seed (initial weights, batch order)")
    parser.add_argument("--threads", type=int, required=True, help="torch threads")
    parser.add_argument("--n-layer", type=int, default=GPTConfig.n_layer)
    parser.add_argument("--n-embd", type=int, default=GPTConfig.n_embd)
    parser.add_argument("--n-head", type=int, default=GPTConfig.n_head)
    parser.add_argument("--block-size", type=int, default=GPTConfig.block_size)
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines log to append to")


def model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size)


def inner_optimizer(args: argparse.Namespace, params: ParamsT) -> torch.optim.Optimizer:
    """The daemon's inner AdamW at the launcher's ``--lr``; weight decay the peers' default (0).

    ``params`` may be parameter groups: ``hivemind.Optimizer`` calls its factory with those.
    """
    return build_inner_optimizer(params, InnerTrainConfig(lr=args.lr, batch_size=args.batch_size))


def setup(args: argparse.Namespace) -> tuple[GPT, ByteDataset, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Threads, model (same init on every rank), this rank's shard and the shared held-out batches."""
    torch.set_num_threads(args.threads)
    config = model_config(args)
    model = build_model(config, args.seed)
    dataset = ByteDataset(None, ShardSpec(args.rank, args.world), block_size=config.block_size)
    return model, dataset, dataset.eval_batches(EVAL_BATCHES, EVAL_BATCH_SIZE)


def batch_generator(seed: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + rank)


class WorkerLog:
    """Append-only JSON lines, flushed per record (the launcher reads them after the run)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        self._handle.write(
            json.dumps({"event": event, "time": time.time(), "pid": os.getpid(), **fields}) + "\n"
        )

    def close(self) -> None:
        self._handle.close()
