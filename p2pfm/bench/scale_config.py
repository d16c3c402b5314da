"""``p2pfm bench scale``'s settings, importable without numpy or torch (``--help`` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SIZES = ("1m", "10m", "124m")


@dataclass(frozen=True)
class ScaleBenchConfig:
    sizes: tuple[str, ...] = DEFAULT_SIZES  # model presets (p2pfm.model.config.GPT_PRESETS)
    peers: int = 2  # training peers; one more joins at the end and downloads the state
    rounds: int = 3  # rounds measured per peer (after one warm-up round)
    inner_steps: int = 4
    batch_size: int = 4
    block_size: int = 128  # training window (--seq-len): 124M at 1024 bytes is a minute per step on 2 cores
    plain_steps: int = 4
    seed: int = 0
    out_dir: Path | None = None
    timeout_s: float = 3600.0  # per size: everything is slow on a laptop CPU at 124M
    threads_per_peer: int = field(default=0)  # 0 = cores // peers
