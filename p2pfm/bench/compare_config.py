"""What one ``p2pfm bench compare`` run is: variants, sizes, limits (:class:`CompareConfig`).

Every variant takes its settings from here, so that they all train the same model on the same
samples with the same batch and evaluation period; see :mod:`p2pfm.bench.compare` for the
variants and what is measured.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfm.config import ConfigError, require
from p2pfm.model.gpt import GPTConfig

ALL_VARIANTS = ("p2pfm", "p2pfm-uncompressed", "hivemind", "ddp", "single")
OPTIONAL_VARIANTS = ("hivemind-local",)
SHAPED_VARIANTS = ("p2pfm", "p2pfm-uncompressed", "ddp")
EDGE_LINK = (50.0, 30.0)  # Mbit/s and ms of delay on each host's link: a good home/edge uplink
QUICK_MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)  # ~0.1M params: seconds per round


@dataclass(frozen=True)
class CompareConfig:
    """One side-by-side run. Defaults: the full comparison (4 peers, default GPT)."""

    peers: int = 4
    samples_per_peer: int = (
        2400  # 150 steps of 16 (15 rounds): ~10-15 min for all five variants on 2 shared cores
    )
    batch_size: int = 16  # the daemon's train.batch_size default
    inner_steps: int = 10  # p2pfm's H (its default); also every variant's evaluation period in steps
    lr: float = 3e-3  # the daemon's inner AdamW lr, used by every variant
    seed: int = 0
    target_loss: float | None = None  # None: 5% above single's final loss
    model: GPTConfig = field(default_factory=GPTConfig)
    variants: tuple[str, ...] = ALL_VARIANTS
    out_dir: Path = Path("runs/compare")
    threads: int = 0  # 0: max(1, cores // peers)
    timeout_s: float = 1800.0  # per variant; a variant that overruns is killed and reported as failed
    time_cap_s: float | None = None  # per variant: stop here and report what it reached (completed: false)
    quick: bool = False
    shaped: tuple[float, float] | None = (
        None  # (Mbit/s, ms one way per link end): each process in its own netns
    )
    command: str = ""

    def __post_init__(self) -> None:
        require(self.peers >= 1, "peers", f"must be at least 1, got {self.peers}")
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.inner_steps >= 1, "inner_steps", "must be at least 1")
        per_round = self.inner_steps * self.batch_size
        require(
            self.samples_per_peer >= per_round and self.samples_per_peer % per_round == 0,
            "samples_per_peer",
            f"must be a positive multiple of inner_steps * batch_size = {per_round}, got {self.samples_per_peer}",
        )
        require(self.lr > 0, "lr", "must be positive")
        require(self.target_loss is None or self.target_loss > 0, "target_loss", "must be positive")
        unknown = set(self.variants) - set(ALL_VARIANTS) - set(OPTIONAL_VARIANTS)
        require(
            not unknown and len(self.variants) > 0,
            "variants",
            f"unknown {sorted(unknown)}; choose from {', '.join(ALL_VARIANTS + OPTIONAL_VARIANTS)}",
        )
        require(self.threads >= 0, "threads", "must be non-negative")
        require(self.time_cap_s is None or self.time_cap_s > 0, "time_cap_s", "must be positive")
        require(
            self.shaped is None or set(self.variants) <= set(SHAPED_VARIANTS),
            "variants",
            f"with --shaped only {', '.join(SHAPED_VARIANTS)} run (one network namespace per process)",
        )

    @property
    def steps(self) -> int:
        return self.samples_per_peer // self.batch_size

    @property
    def rounds(self) -> int:
        return self.steps // self.inner_steps

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.peers)


def quick_config(**overrides: Any) -> CompareConfig:
    """Small settings for ``--quick``: 2 peers, a ~0.1M-parameter GPT, 6 rounds of 10 steps of 8."""
    values: dict[str, Any] = {
        "peers": 2,
        "samples_per_peer": 480,
        "batch_size": 8,
        "model": QUICK_MODEL,
        "quick": True,
        "timeout_s": 300.0,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CompareConfig(**values)


def config_from_args(args: Any) -> CompareConfig:
    """Build the config from ``p2pfm bench compare`` flags (``--quick`` picks the small defaults)."""
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else None
    if args.shaped and variants is None:
        variants = ("p2pfm", "ddp")
    common = {
        "peers": args.peers,
        "time_cap_s": args.time_cap,
        "shaped": EDGE_LINK if args.shaped else None,
        "samples_per_peer": args.samples_per_peer,
        "target_loss": args.target_loss,
        "seed": args.seed,
        "variants": variants,
        "out_dir": args.out,
        "command": "p2pfm " + " ".join(sys.argv[1:]),
    }
    if args.quick:
        return quick_config(**common)
    try:
        return CompareConfig(**{k: v for k, v in common.items() if v is not None})
    except TypeError as exc:  # pragma: no cover - flags map 1:1 to fields
        raise ConfigError(str(exc)) from None
