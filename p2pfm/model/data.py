"""The corpus: text on this machine, split into byte ranges for evaluation and per-peer shards.

No downloads, ever. The default corpus is the Python standard library's own source files
(``sysconfig.get_paths()["stdlib"]``), which every machine with Python already has; users
point ``--data`` at their own folder of text, or at a single text file, of any size.

How the split works, and why:

* **One byte stream.** The usable files, in sorted relative-path order (machine-independent),
  are seen as one concatenated stream of ``corpus_bytes`` bytes. Splitting by byte range
  instead of by file is what lets a folder holding one big book train a swarm: a file is
  no longer the unit, so one file (or two files and three peers) splits like a thousand.
* **Fixed-size blocks.** The stream is cut into blocks of ``block_bytes`` (about 1/256 of the
  corpus, between 256 bytes and 64 KiB, larger only past a million blocks). Blocks are the
  unit of mixing: a shard made of many blocks from all over the corpus sees every book,
  package and style, where contiguous ranges would give each peer one package and make
  their updates pull apart. 64 KiB is large enough that reading a block is one cheap
  sequential read and few training windows straddle two unrelated blocks.
* **Held-out blocks, seed-independent.** About 5 % of the blocks (at least one) are chosen
  by a permutation with a fixed salt. They are never trained on, and every peer of every
  run over the same corpus evaluates on the same bytes, so eval losses are comparable
  across peers, runs and seeds.
* **Shards by a seeded permutation.** The other blocks are shuffled by a permutation seeded
  with the run's seed and dealt round-robin: shard ``k`` of ``n`` takes every n-th block of
  the shuffle, so shards are disjoint, differ in size by at most one block, and are mixed.
  A peer caps its shard at ``max_shard_bytes`` by keeping a prefix of its shuffled blocks,
  which is a random sample of its shard, not its first package.

Every peer computes the same split on its own, from the file list, the seed and the shard
count alone: no coordination. Memory stays bounded whatever the corpus size: listing reads
only file sizes and a few KiB per file (the text check); a peer then reads just its capped
shard and the capped held-out set, block by block, with seek + readinto into one
preallocated array. A multi-GB file is never read whole.

What counts as text: files with a text suffix (``TEXT_SUFFIXES``; any name when ``--data``
is a single file) whose sampled bytes (head, middle and tail) hold no NUL byte and are at
least three quarters valid UTF-8 (Latin-1 prose stays in; legacy CJK encodings and binaries
do not). Other files are skipped with a warning naming them: a byte-level model trained on
binary noise learns nothing useful, and the user should know what was left out.
"""

from __future__ import annotations

import logging
import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from p2pfm.config import ConfigError
from p2pfm.model.device import autocast

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".toml", ".json", ".csv", ".html", ".c", ".h", ".js", ".ts")
HOLDOUT_FRACTION = 0.05  # share of blocks held out for evaluation
HOLDOUT_SALT = 0x9E1D0  # fixed: the held-out set must not move with the run's seed
SHARD_SALT = 0x5A4D  # keeps the shard permutation independent of other uses of the seed
TARGET_BLOCKS = 256  # enough blocks that even a small corpus mixes well across shards
MIN_BLOCK_BYTES = 256  # below this, block boundaries would cut most training windows
MAX_BLOCK_BYTES = 64 << 10  # one cheap sequential read; few windows straddle two blocks
MAX_BLOCKS = 1 << 20  # past this, blocks grow: permutations stay a few MB for any corpus
SNIFF_BYTES = 4096  # bytes sampled at the head, middle and tail of each file
MAX_INVALID_UTF8 = 0.25  # more invalid sequences per sampled byte: not text (Latin-1 prose stays in)


def default_corpus_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _not_text_reason(path: Path, size: int) -> str | None:
    """Why ``path`` is not text, from bounded samples (head, middle, tail); None if it is text.

    Sampling keeps the check O(1) per file, so listing a multi-GB file costs three small reads.
    """
    offsets = [0] if size <= 3 * SNIFF_BYTES else [0, size // 2 - SNIFF_BYTES // 2, size - SNIFF_BYTES]
    invalid = total = 0
    with path.open("rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            sample = handle.read(SNIFF_BYTES if len(offsets) > 1 else 3 * SNIFF_BYTES)
            if b"\0" in sample:
                return "contains NUL bytes"
            # A sample may cut a multi-byte character at either end: that costs at most two
            # replacement characters, far below the threshold.
            invalid += sample.decode("utf-8", errors="replace").count("\ufffd")
            total += len(sample)
    if invalid > MAX_INVALID_UTF8 * max(1, total):
        return f"{invalid} invalid UTF-8 sequences in {total} sampled bytes"
    return None


@dataclass(frozen=True)
class CorpusFile:
    """One usable text file: its path, its machine-independent name, and its size in bytes."""

    path: Path
    name: str
    size: int


def _text_description() -> str:
    return (
        f"text means files ending in {', '.join(TEXT_SUFFIXES)} (any name when --data is one file) "
        "that are UTF-8 without NUL bytes"
    )


def list_corpus_files(root: Path, *, skipped_level: int = logging.WARNING) -> list[CorpusFile]:
    """Usable text files under ``root`` (a folder, or one file), sorted by relative path.

    Files that are not text are skipped and logged at ``skipped_level`` naming them (the
    default corpus passes INFO: the stdlib's legacy-encoding test fixtures are expected).
    """
    if not root.exists():
        raise ConfigError(f"data: {root} does not exist; give a folder of text files or one text file")
    if root.is_file():
        candidates = [(root, root.name)]
    elif root.is_dir():
        candidates = []
        for path in root.rglob("*"):
            if path.suffix.lower() not in TEXT_SUFFIXES or "site-packages" in path.relative_to(root).parts:
                continue
            candidates.append((path, path.relative_to(root).as_posix()))
    else:
        raise ConfigError(f"data: {root} is neither a folder nor a regular file")
    files, skipped = [], 0
    for path, name in candidates:
        try:
            if not path.is_file():
                continue
            size = path.stat().st_size
            if size == 0:
                continue
            reason = _not_text_reason(path, size)
        except OSError as exc:
            log.log(skipped_level, "data: skipping %s: cannot read it (%s)", path, exc)
            skipped += 1
            continue
        if reason is not None:
            log.log(skipped_level, "data: skipping %s: not text (%s)", path, reason)
            skipped += 1
            continue
        files.append(CorpusFile(path=path, name=name, size=size))
    files.sort(key=lambda f: f.name)
    if not files:
        note = f"; {skipped} files were skipped as not text" if skipped else ""
        raise ConfigError(f"data: no usable text under {root}: {_text_description()}{note}")
    return files


class Corpus:
    """The usable files of a data path, seen as one concatenated byte stream."""

    def __init__(self, root: Path, files: list[CorpusFile]) -> None:
        self.root = root
        self.files = tuple(files)
        # offsets[i] is where file i starts in the stream; offsets[-1] is the total.
        self.offsets = np.concatenate([[0], np.cumsum([f.size for f in files], dtype=np.int64)])
        self.total_bytes = int(self.offsets[-1])

    @classmethod
    def scan(cls, root: Path | None) -> Corpus:
        """List ``root`` (None: the default corpus); reads only sizes and small samples."""
        if root is None:
            return cls(
                default_corpus_dir(), list_corpus_files(default_corpus_dir(), skipped_level=logging.INFO)
            )
        return cls(root, list_corpus_files(root))

    def read_into(self, start: int, out: np.ndarray) -> int:
        """Fill ``out`` (uint8) with the stream's bytes from ``start``; returns the bytes read.

        Fewer than ``len(out)`` only if a file shrank since it was listed.
        """
        view = memoryview(out)
        done = 0
        index = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while done < len(out) and index < len(self.files):
            file = self.files[index]
            within = start + done - int(self.offsets[index])
            want = min(len(out) - done, file.size - within)
            try:
                with file.path.open("rb") as handle:
                    handle.seek(within)
                    got = handle.readinto(view[done : done + want]) or 0
            except OSError:
                got = 0
            done += got
            if got < want:
                break
            index += 1
        return done


def block_layout(total_bytes: int) -> tuple[int, int]:
    """(block_bytes, block_count) for a stream of ``total_bytes``; depends on the size alone."""
    block = min(MAX_BLOCK_BYTES, max(MIN_BLOCK_BYTES, math.ceil(total_bytes / TARGET_BLOCKS)))
    block = max(block, math.ceil(total_bytes / MAX_BLOCKS))
    return block, math.ceil(total_bytes / block)


class CorpusSplit:
    """Held-out blocks and per-shard blocks of a corpus, deterministic from (corpus, seed, count)."""

    def __init__(self, corpus: Corpus, *, count: int, seed: int = 0) -> None:
        if count < 1:
            raise ConfigError(f"num_shards: must be positive, got {count}")
        self.corpus = corpus
        self.count = count
        self.block_bytes, self.block_count = block_layout(corpus.total_bytes)
        if self.block_count < 2:
            raise ConfigError(
                f"data: {corpus.root} has only {corpus.total_bytes} bytes of text, too little to split into "
                f"training and held-out blocks of {self.block_bytes} bytes; add more text"
            )
        order = np.random.default_rng([HOLDOUT_SALT]).permutation(self.block_count)
        held = max(1, round(self.block_count * HOLDOUT_FRACTION))
        self.holdout_blocks = order[:held]  # in permuted order: a capped prefix is still a sample
        train = np.sort(order[held:])
        self._shuffled = np.random.default_rng([SHARD_SALT, seed % 2**64]).permutation(train)

    @property
    def train_block_count(self) -> int:
        return len(self._shuffled)

    def shard_blocks(self, index: int) -> np.ndarray:
        """Shard ``index``'s blocks in its seeded order (a prefix is a random sample of it)."""
        return self._shuffled[index :: self.count]

    def block_range(self, block: int) -> tuple[int, int]:
        start = int(block) * self.block_bytes
        return start, min(start + self.block_bytes, self.corpus.total_bytes)

    def blocks_bytes(self, blocks: np.ndarray) -> int:
        """Total bytes of ``blocks`` (only the corpus's last block may be short)."""
        return sum(stop - start for start, stop in map(self.block_range, blocks))

    def read(self, blocks: np.ndarray, max_bytes: int) -> np.ndarray:
        """The bytes of a prefix of ``blocks`` up to ``max_bytes``, read in stream order.

        Memory is the returned array only: blocks are read straight into it, and adjacent
        blocks are merged into one read so a contiguous run costs one seek.
        """
        chosen, size = [], 0
        for block in blocks:
            if size >= max_bytes:
                break
            start, stop = self.block_range(block)
            chosen.append((start, stop))
            size += stop - start
        chosen.sort()
        runs: list[list[int]] = []
        for start, stop in chosen:
            if runs and runs[-1][1] == start:
                runs[-1][1] = stop
            else:
                runs.append([start, stop])
        size = min(size, max_bytes)
        out = np.empty(size, dtype=np.uint8)
        filled = 0
        for start, stop in runs:
            want = min(stop - start, size - filled)
            if want <= 0:
                break
            got = self.corpus.read_into(start, out[filled : filled + want])
            filled += got
        return out[:filled]


def split_corpus(root: Path | None, count: int, seed: int = 0) -> CorpusSplit:
    """Scan ``root`` (None: the default corpus) and split it for ``count`` shards."""
    return CorpusSplit(Corpus.scan(root), count=count, seed=seed)


@dataclass(frozen=True)
class ShardSpec:
    """Which shard this peer trains on: ``index`` of ``count`` (round-robin over shuffled blocks)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count <= 0:
            raise ConfigError(f"num_shards: must be positive, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ConfigError(f"shard: must be in [0, {self.count}), got {self.index}")


class ByteDataset:
    """A peer's training bytes and the shared held-out bytes, with seeded batch sampling.

    Holds at most ``max_shard_bytes + max_holdout_bytes`` bytes, whatever the corpus size.
    """

    def __init__(
        self,
        root: Path | None,
        shard: ShardSpec,
        *,
        block_size: int,
        max_shard_bytes: int = 4 << 20,
        max_holdout_bytes: int = 1 << 20,
        seed: int = 0,
        corpus: Corpus | None = None,
    ) -> None:
        """``corpus``: an already scanned corpus of ``root`` (the simulator scans once for all peers)."""
        corpus = corpus or Corpus.scan(root)
        self.root = corpus.root
        split = CorpusSplit(corpus, count=shard.count, seed=seed)
        mine = split.shard_blocks(shard.index)
        if len(mine) == 0:
            raise ConfigError(
                f"data: shard {shard.index} of {shard.count} is empty: {self.root} has {corpus.total_bytes} bytes "
                f"of text, {split.train_block_count} training blocks of {split.block_bytes} bytes; "
                "use fewer shards (peers) or add text"
            )
        self.block_size = block_size
        self.corpus_bytes = corpus.total_bytes
        self.shard_total_bytes = split.blocks_bytes(mine)  # before the max_shard_bytes cap
        self.train = split.read(mine, max_shard_bytes)
        self.holdout = split.read(split.holdout_blocks, max_holdout_bytes)
        for name, array in (("training shard", self.train), ("held-out split", self.holdout)):
            if len(array) <= block_size + 1:
                raise ConfigError(
                    f"data: the {name} under {self.root} has {len(array)} bytes, fewer than block_size+2"
                )

    def sizes(self) -> dict[str, int]:
        """Bytes of the corpus, of this shard in memory, and of the held-out set in memory (metrics)."""
        return {
            "corpus_bytes": self.corpus_bytes,
            "shard_bytes": len(self.train),
            "holdout_bytes": len(self.holdout),
        }

    def batch(
        self, generator: torch.Generator, batch_size: int, *, holdout: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (B, T), int64, drawn with ``generator``."""
        source = self.holdout if holdout else self.train
        starts = torch.randint(0, len(source) - self.block_size - 1, (batch_size,), generator=generator)
        offsets = starts.numpy()[:, None] + np.arange(self.block_size + 1)[None, :]
        window = torch.from_numpy(source[offsets].astype(np.int64))  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def eval_batches(
        self, count: int, batch_size: int, seed: int = 1234
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out batches every peer evaluates on (same seed -> same bytes)."""
        generator = torch.Generator().manual_seed(seed)
        return [self.batch(generator, batch_size, holdout=True) for _ in range(count)]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], *, precision: str = "fp32"
) -> float:
    """Mean cross-entropy (nats per byte) over fixed held-out batches (already on the model's device)."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        with autocast(x.device, precision):
            losses.append(float(model(x, y)[1]))
    model.train(was_training)
    return float(np.mean(losses))


TOKENIZE_CHUNK_BYTES = 256 << 10  # text handed to the tokenizer at once: bounded time and memory per call


def tokenize_bytes(data: np.ndarray, encode: Callable[[str], list[int]], vocab_size: int) -> np.ndarray:
    """Token ids (int32) of the UTF-8 bytes ``data``, encoded in chunks cut after a newline.

    A newline byte is never inside a multi-byte character, so cutting there keeps every chunk
    valid UTF-8 (invalid bytes from the corpus itself decode as U+FFFD). Ids outside
    ``[0, vocab_size)`` mean the tokenizer does not belong to the model: refused, not clamped.
    """
    pieces: list[np.ndarray] = []
    start, size = 0, len(data)
    while start < size:
        stop = min(size, start + TOKENIZE_CHUNK_BYTES)
        if stop < size:
            newline = np.flatnonzero(data[start:stop] == 0x0A)
            if len(newline):
                stop = start + int(newline[-1]) + 1
        text = data[start:stop].tobytes().decode("utf-8", errors="replace")
        pieces.append(np.asarray(encode(text), dtype=np.int64))
        start = stop
    ids = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ConfigError(
            f"model_source: the tokenizer produced id {int(ids.max())}, outside the model's vocabulary of "
            f"{vocab_size}; the tokenizer files do not belong to this model"
        )
    return ids.astype(np.int32)


class TokenDataset(ByteDataset):
    """A :class:`ByteDataset` whose shard and held-out set are token ids from a model's own tokenizer.

    The split is the byte split, unchanged (same held-out blocks, same seeded shards, same
    ``max_shard_bytes`` cap): only the bytes each peer already holds are tokenized, so memory
    stays bounded and peers of one run evaluate on the same held-out text. Batches and
    evaluation are inherited: windows of ``block_size`` tokens instead of bytes.
    """

    def __init__(
        self,
        root: Path | None,
        shard: ShardSpec,
        *,
        encode: Callable[[str], list[int]],
        vocab_size: int,
        block_size: int,
        max_shard_bytes: int = 4 << 20,
        max_holdout_bytes: int = 1 << 20,
        seed: int = 0,
        corpus: Corpus | None = None,
    ) -> None:
        super().__init__(
            root, shard, block_size=block_size, max_shard_bytes=max_shard_bytes,
            max_holdout_bytes=max_holdout_bytes, seed=seed, corpus=corpus,
        )  # fmt: skip
        self.shard_bytes, self.holdout_bytes = len(self.train), len(self.holdout)
        self.train = tokenize_bytes(self.train, encode, vocab_size)
        self.holdout = tokenize_bytes(self.holdout, encode, vocab_size)
        for name, array in (("training shard", self.train), ("held-out split", self.holdout)):
            if len(array) <= block_size + 1:
                raise ConfigError(
                    f"data: the {name} under {self.root} is {len(array)} tokens, fewer than block_size+2 "
                    f"({block_size + 2}); add text or lower model.block_size"
                )

    def sizes(self) -> dict[str, int]:
        """The byte split (as :class:`ByteDataset` reports it) and the tokens it became."""
        return {
            "corpus_bytes": self.corpus_bytes,
            "shard_bytes": self.shard_bytes,
            "holdout_bytes": self.holdout_bytes,
            "shard_tokens": len(self.train),
            "holdout_tokens": len(self.holdout),
        }
