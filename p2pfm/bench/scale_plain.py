"""The baseline of ``p2pfm bench scale``: one process training the same model in a plain AdamW loop.

Run as its own process (``python -m p2pfm.bench.scale_plain '<json>'``) so that its peak RSS
is its own: the same model, the same inner optimizer and step (:mod:`p2pfm.model.train`), the
same batch and data as a peer, and nothing else (no gossip state, no network, no snapshot).
Prints one JSON line: parameters, peak RSS, seconds per step.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from p2pfm.daemon.memory import process_rss
from p2pfm.model.config import GPT_PRESETS, InnerTrainConfig
from p2pfm.model.data import ByteDataset, ShardSpec
from p2pfm.model.gpt import build_model
from p2pfm.model.train import build_inner_optimizer, train_step


def plain_loop(
    preset: str, *, steps: int, batch_size: int, threads: int, block_size: int, seed: int = 0
) -> dict:
    """Train ``preset`` (context ``block_size``) for ``steps`` plain AdamW steps; peak RSS, step time."""
    torch.set_num_threads(threads)
    config = GPT_PRESETS[preset]
    model = build_model(config, seed)
    optimizer = build_inner_optimizer(model.parameters(), InnerTrainConfig())
    # The peer's own windows: the preset's positions, trained on block_size-byte windows (--seq-len).
    dataset = ByteDataset(None, ShardSpec(0, 8), block_size=min(block_size, config.block_size), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    train_step(model, optimizer, *dataset.batch(generator, batch_size))  # moments allocated, kernels warm
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, *dataset.batch(generator, batch_size))
    seconds = (time.perf_counter() - start) / max(1, steps)
    return {
        "preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "step_seconds": seconds,
        **process_rss(),
    }


def main() -> None:
    options = json.loads(sys.argv[1])
    print(json.dumps(plain_loop(**options)), flush=True)


if __name__ == "__main__":
    main()
