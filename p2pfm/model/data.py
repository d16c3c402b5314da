"""The corpus: text files on this machine, split deterministically into shards per peer.

No downloads, ever. The default corpus is the Python standard library's own source files
(``sysconfig.get_paths()["stdlib"]``), which every machine with Python already has; users
point ``--data`` at their own folder of text files.

Splitting is by file, deterministic from the sorted relative paths alone: every peer
computes the same split on its own, with no coordination. A fixed held-out set (every
``HOLDOUT_EVERY``-th file) is never trained on and is what every peer evaluates on, so
eval losses are comparable across peers and runs.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from p2pfm.config import ConfigError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".toml", ".json", ".csv", ".html", ".c", ".h", ".js", ".ts")
HOLDOUT_EVERY = 20  # 5% of files held out for evaluation
MAX_FILE_BYTES = 1 << 20  # skip huge generated files; they would dominate a shard


def default_corpus_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus_files(root: Path) -> list[Path]:
    """Text files under ``root`` in a machine-independent order (sorted relative paths)."""
    if not root.exists():
        raise ConfigError(f"data: directory {root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"data: {root} is not a directory")
    files = []
    for path in root.rglob("*"):
        if path.suffix.lower() not in TEXT_SUFFIXES or "site-packages" in path.parts:
            continue
        try:
            if path.is_file() and 0 < path.stat().st_size <= MAX_FILE_BYTES:
                files.append(path)
        except OSError:
            continue
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ConfigError(
            f"data: no text files ({', '.join(TEXT_SUFFIXES)}) of at most {MAX_FILE_BYTES} bytes under {root}"
        )
    return files


def _file_rank(root: Path, path: Path) -> int:
    """A stable pseudo-random rank per file, so shards mix modules instead of taking runs of a package."""
    digest = hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class CorpusSplit:
    train_files: tuple[Path, ...]
    holdout_files: tuple[Path, ...]


def split_corpus(root: Path) -> CorpusSplit:
    files = sorted(list_corpus_files(root), key=lambda p: _file_rank(root, p))
    holdout = tuple(f for i, f in enumerate(files) if i % HOLDOUT_EVERY == 0)
    train = tuple(f for i, f in enumerate(files) if i % HOLDOUT_EVERY != 0)
    if not train:
        raise ConfigError(f"data: {root} has too few files to split into train and held-out ({len(files)} files)")
    return CorpusSplit(train_files=train, holdout_files=holdout or train[:1])


def _read_bytes(files: tuple[Path, ...] | list[Path], max_bytes: int) -> np.ndarray:
    chunks, total = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    blob = b"\n".join(chunks)[:max_bytes]
    return np.frombuffer(blob, dtype=np.uint8).copy()


@dataclass(frozen=True)
class ShardSpec:
    """Which shard this peer trains on: ``index`` of ``count`` (round-robin over ranked files)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count <= 0:
            raise ConfigError(f"num_shards: must be positive, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ConfigError(f"shard: must be in [0, {self.count}), got {self.index}")


class ByteDataset:
    """A peer's training bytes and the shared held-out bytes, with seeded batch sampling."""

    def __init__(
        self,
        root: Path | None,
        shard: ShardSpec,
        *,
        block_size: int,
        max_shard_bytes: int = 4 << 20,
        max_holdout_bytes: int = 1 << 20,
    ) -> None:
        self.root = root or default_corpus_dir()
        split = split_corpus(self.root)
        mine = [f for i, f in enumerate(split.train_files) if i % shard.count == shard.index]
        if not mine:
            raise ConfigError(
                f"data: shard {shard.index} of {shard.count} is empty ({len(split.train_files)} training files)"
            )
        self.block_size = block_size
        self.train = _read_bytes(mine, max_shard_bytes)
        self.holdout = _read_bytes(split.holdout_files, max_holdout_bytes)
        for name, array in (("training shard", self.train), ("held-out split", self.holdout)):
            if len(array) <= block_size + 1:
                raise ConfigError(
                    f"data: the {name} under {self.root} has {len(array)} bytes, fewer than block_size+2"
                )

    def batch(self, generator: torch.Generator, batch_size: int, *, holdout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (B, T), int64, drawn with ``generator``."""
        source = self.holdout if holdout else self.train
        starts = torch.randint(0, len(source) - self.block_size - 1, (batch_size,), generator=generator)
        offsets = starts.numpy()[:, None] + np.arange(self.block_size + 1)[None, :]
        window = torch.from_numpy(source[offsets].astype(np.int64))  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def eval_batches(self, count: int, batch_size: int, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out batches every peer evaluates on (same seed -> same bytes)."""
        generator = torch.Generator().manual_seed(seed)
        return [self.batch(generator, batch_size, holdout=True) for _ in range(count)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats per byte) over fixed held-out batches."""
    was_training = model.training
    model.eval()
    losses = [float(model(x, y)[1]) for x, y in batches]
    model.train(was_training)
    return float(np.mean(losses))
