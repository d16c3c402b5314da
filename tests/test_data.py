"""The corpus: byte-range blocks split into a fixed held-out set and seeded per-peer shards."""

from __future__ import annotations

import logging
import pathlib
import random
import shutil

import numpy as np
import pytest
import torch

from p2pfm.config import ConfigError
from p2pfm.model.data import (
    ByteDataset,
    Corpus,
    CorpusSplit,
    ShardSpec,
    block_layout,
    list_corpus_files,
    split_corpus,
)

FILES = 60
BLOCK = 16
WORDS = (
    "the",
    "a",
    "river",
    "stone",
    "quiet",
    "morning",
    "of",
    "and",
    "light",
    "over",
    "garden",
    "she",
    "walked",
    "slowly",
    "toward",
    "old",
    "house",
    "where",
    "nobody",
    "had",
    "lived",
    "for",
    "years",
    "in",
    "winter",
)


def english_like(size: int, seed: int = 0) -> str:
    """Deterministic English-like prose of exactly ``size`` bytes (seeded random words and lines)."""
    rng = random.Random(seed)
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".\n"
        lines.append(line)
        total += len(line)
    return "".join(lines)[:size]


@pytest.fixture
def corpus(tmp_path):
    """60 small text files in nested folders, plus files that must be ignored."""
    root = tmp_path / "corpus"
    for i in range(FILES):
        folder = root / f"pkg{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = (".py", ".txt", ".md")[i % 3]
        (folder / f"file{i:02d}{suffix}").write_text(f"# file {i}\n" + f"line {i} of text\n" * 20)
    (root / "image.png").write_bytes(b"\x89PNG" * 100)  # not a text suffix
    (root / "empty.txt").write_text("")  # empty files are skipped
    (root / "site-packages").mkdir()
    (root / "site-packages" / "vendored.py").write_text("x = 1\n" * 50)  # never third-party code
    return root


@pytest.fixture
def book(tmp_path):
    """A folder holding one 1.1 MB plain-text book: the most natural --data folder."""
    root = tmp_path / "book"
    root.mkdir()
    (root / "book.txt").write_text(english_like(1_100_000))
    return root


def stream_of(root) -> bytes:
    """The corpus's concatenated byte stream, read the simple way (for checking)."""
    return b"".join(f.path.read_bytes() for f in list_corpus_files(root))


def expected_bytes(split: CorpusSplit, blocks, stream: bytes) -> bytes:
    """The bytes of ``blocks`` in stream order, as ByteDataset should hold them (no cap)."""
    return b"".join(stream[slice(*split.block_range(b))] for b in sorted(blocks))


def test_lists_only_nonempty_text_files_sorted(corpus):
    """Only non-empty text files outside site-packages are listed, in sorted relative-path order."""
    names = [f.name for f in list_corpus_files(corpus)]
    assert len(names) == FILES
    assert names == sorted(names)
    assert "empty.txt" not in names and "image.png" not in names
    assert not any("site-packages" in n for n in names)


def test_same_seed_gives_the_same_split_and_another_seed_other_shards(corpus):
    """Every peer computes the same split; the seed reshuffles shards but not the held-out set."""
    first, second, other = (
        split_corpus(corpus, 3, seed=1),
        split_corpus(corpus, 3, seed=1),
        split_corpus(corpus, 3, 2),
    )
    for index in range(3):
        assert np.array_equal(first.shard_blocks(index), second.shard_blocks(index))
    assert not all(np.array_equal(first.shard_blocks(i), other.shard_blocks(i)) for i in range(3))
    assert np.array_equal(first.holdout_blocks, other.holdout_blocks)  # eval comparable across seeds


def test_split_does_not_depend_on_the_absolute_location(corpus, tmp_path):
    """A copy of the corpus elsewhere splits the same way (file order uses relative paths)."""
    copy = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(corpus, copy)
    a, b = split_corpus(corpus, 4, seed=5), split_corpus(copy, 4, seed=5)
    assert np.array_equal(a.holdout_blocks, b.holdout_blocks)
    assert all(np.array_equal(a.shard_blocks(i), b.shard_blocks(i)) for i in range(4))
    assert stream_of(corpus) == stream_of(copy)


@pytest.mark.parametrize("count", [1, 3, 8])
def test_holdout_and_shards_are_disjoint_and_cover_every_block(corpus, count):
    """Each block is held out or in exactly one shard; shard sizes differ by at most one block."""
    split = split_corpus(corpus, count)
    shards = [set(split.shard_blocks(i).tolist()) for i in range(count)]
    holdout = set(split.holdout_blocks.tolist())
    seen = [b for shard in shards for b in shard] + sorted(holdout)
    assert len(seen) == len(set(seen)) == split.block_count
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert len(holdout) == max(1, round(split.block_count * 0.05))


def test_shards_and_holdout_mix_blocks_from_all_over_the_corpus(book):
    """Shards are not contiguous runs: each holds blocks from both halves of the corpus."""
    split = split_corpus(book, 3)
    half = split.block_count // 2
    for index in range(3):
        blocks = split.shard_blocks(index)
        assert (blocks < half).any() and (blocks >= half).any()
    assert sorted(split.holdout_blocks.tolist()) != list(range(len(split.holdout_blocks)))


def test_dataset_holds_exactly_its_blocks_bytes(corpus):
    """ByteDataset's training and held-out arrays are its blocks' bytes, in stream order."""
    stream = stream_of(corpus)
    split = split_corpus(corpus, 3, seed=9)
    for index in range(3):
        dataset = ByteDataset(corpus, ShardSpec(index, 3), block_size=BLOCK, seed=9)
        assert dataset.train.tobytes() == expected_bytes(split, split.shard_blocks(index), stream)
        assert dataset.holdout.tobytes() == expected_bytes(split, split.holdout_blocks, stream)


def test_one_big_file_gives_three_disjoint_shards_and_a_holdout(book):
    """A folder with one 1.1 MB file trains 3 peers: non-empty disjoint shards plus a held-out set."""
    datasets = [ByteDataset(book, ShardSpec(i, 3), block_size=128) for i in range(3)]
    split = split_corpus(book, 3)
    stream = stream_of(book)
    sizes = [d.sizes() for d in datasets]
    assert all(s["corpus_bytes"] == 1_100_000 for s in sizes)
    assert all(s["shard_bytes"] > 300_000 and s["holdout_bytes"] > 40_000 for s in sizes)
    assert sum(s["shard_bytes"] for s in sizes) + sizes[0]["holdout_bytes"] == 1_100_000
    shard_sets = [set(split.shard_blocks(i).tolist()) for i in range(3)]
    assert not (
        shard_sets[0] & shard_sets[1] or shard_sets[0] & shard_sets[2] or shard_sets[1] & shard_sets[2]
    )
    assert not set().union(*shard_sets) & set(split.holdout_blocks.tolist())
    for index, dataset in enumerate(datasets):
        assert dataset.train.tobytes() == expected_bytes(split, split.shard_blocks(index), stream)


def test_two_files_and_three_peers_work(tmp_path):
    """Two files split among three peers: every shard is non-empty."""
    (tmp_path / "a.txt").write_text(english_like(40_000, seed=1))
    (tmp_path / "b.md").write_text(english_like(25_000, seed=2))
    datasets = [ByteDataset(tmp_path, ShardSpec(i, 3), block_size=64) for i in range(3)]
    assert all(len(d.train) > 64 for d in datasets)
    assert datasets[0].holdout.tobytes() == datasets[2].holdout.tobytes()


def test_a_single_file_path_is_a_corpus(book):
    """--data may name one file (any suffix): it splits like a folder holding it."""
    single = book / "book.txt"
    renamed = book.parent / "book.text"
    shutil.copy(single, renamed)
    from_file = ByteDataset(single, ShardSpec(1, 3), block_size=128)
    from_folder = ByteDataset(book, ShardSpec(1, 3), block_size=128)
    assert from_file.train.tobytes() == from_folder.train.tobytes()
    assert from_file.holdout.tobytes() == from_folder.holdout.tobytes()
    assert ByteDataset(renamed, ShardSpec(0, 1), block_size=128).sizes()["corpus_bytes"] == 1_100_000


class CountingFile:
    """A file object that counts the bytes read through it."""

    def __init__(self, handle, counter: list[int]) -> None:
        self.handle, self.counter = handle, counter

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def seek(self, offset: int) -> int:
        return self.handle.seek(offset)

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.counter[0] += len(data)
        return data

    def readinto(self, buffer) -> int:
        got = self.handle.readinto(buffer)
        self.counter[0] += got or 0
        return got


def test_a_big_file_is_read_in_bounded_memory(tmp_path, monkeypatch):
    """A 3 MB file: the dataset holds at most its caps and reads little more than that from disk."""
    (tmp_path / "big.txt").write_text(english_like(3_000_000, seed=3))
    counter = [0]
    real_open = pathlib.Path.open
    monkeypatch.setattr(
        pathlib.Path, "open", lambda self, *a, **k: CountingFile(real_open(self, *a, **k), counter)
    )
    shard_cap, holdout_cap = 64 << 10, 32 << 10
    dataset = ByteDataset(
        tmp_path, ShardSpec(0, 2), block_size=64, max_shard_bytes=shard_cap, max_holdout_bytes=holdout_cap
    )
    assert len(dataset.train) == shard_cap and len(dataset.holdout) == holdout_cap
    assert dataset.train.nbytes + dataset.holdout.nbytes <= shard_cap + holdout_cap
    assert dataset.shard_total_bytes > 1_000_000  # the shard itself is big; only the cap is held
    sniffed = 3 * 4096
    assert counter[0] <= shard_cap + holdout_cap + sniffed


def test_binary_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    """NUL bytes or mostly invalid UTF-8: skipped, and the warning names the file."""
    (tmp_path / "good.txt").write_text(english_like(5_000))
    (tmp_path / "nul.txt").write_bytes(b"abc\0def" * 100)
    (tmp_path / "latin.txt").write_bytes(bytes(random.Random(0).randrange(128, 256) for _ in range(2000)))
    (tmp_path / "cafe.txt").write_text("caf\xe9 " * 100, encoding="latin-1")  # one odd byte in 5: still text
    with caplog.at_level(logging.WARNING, logger="p2pfm.model.data"):
        names = [f.name for f in list_corpus_files(tmp_path)]
    assert names == ["cafe.txt", "good.txt"]
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "nul.txt" in warned and "NUL" in warned
    assert "latin.txt" in warned and "UTF-8" in warned
    assert "good.txt" not in warned


def test_missing_path_says_it_does_not_exist(tmp_path):
    """A data path that does not exist is refused, naming it."""
    with pytest.raises(ConfigError, match=r"^data: .*nowhere does not exist"):
        list_corpus_files(tmp_path / "nowhere")


def test_folder_without_text_says_what_counts_as_text(tmp_path):
    """Only non-text, empty or binary files: the error names the folder and what text means."""
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_bytes(b"\0" * 100)
    with pytest.raises(
        ConfigError,
        match=r"^data: no usable text under .*text means files ending in \.py.*UTF-8.*"
        r"1 files were skipped",
    ):
        ByteDataset(tmp_path, ShardSpec(0, 1), block_size=BLOCK)


def test_too_little_text_to_split_is_a_config_error(tmp_path):
    """A corpus of one block cannot be split into training and held-out blocks."""
    (tmp_path / "only.txt").write_text("text " * 20)
    with pytest.raises(ConfigError, match=r"^data: .*too little to split"):
        split_corpus(tmp_path, 1)


def test_more_shards_than_blocks_is_a_config_error(tmp_path):
    """A shard without blocks says what to do: fewer peers or more text."""
    (tmp_path / "f.txt").write_text("some text\n" * 100)  # 1000 bytes: 4 blocks of 256
    with pytest.raises(
        ConfigError, match=r"^data: shard 5 of 6 is empty.*fewer shards \(peers\) or add text"
    ):
        ByteDataset(tmp_path, ShardSpec(5, 6), block_size=BLOCK)


def test_too_small_shard_is_a_config_error(tmp_path):
    """A shard with fewer than block_size + 2 bytes is refused, naming the problem."""
    (tmp_path / "f.txt").write_text("some text\n" * 100)
    with pytest.raises(ConfigError, match=r"^data: the training shard .* fewer than block_size\+2"):
        ByteDataset(tmp_path, ShardSpec(0, 3), block_size=512)


@pytest.mark.parametrize("total", [1, 1000, 1_100_000, 32_000_000, 10**12])
def test_block_layout_covers_the_stream_with_bounded_block_count(total):
    """Blocks cover the stream exactly; there are at most ~a million of them, each at least 256 bytes."""
    block, count = block_layout(total)
    assert (count - 1) * block < total <= count * block
    assert count <= 1 << 20 and block >= 256


def test_max_shard_bytes_caps_the_training_bytes(corpus):
    """A peer keeps at most max_shard_bytes of text in memory."""
    dataset = ByteDataset(corpus, ShardSpec(0, 1), block_size=BLOCK, max_shard_bytes=1000)
    assert len(dataset.train) == 1000


def test_a_scanned_corpus_can_be_shared_between_datasets(corpus):
    """The simulator scans once and builds every peer's dataset from it: same bytes as scanning each time."""
    scanned = Corpus.scan(corpus)
    shared = ByteDataset(corpus, ShardSpec(1, 2), block_size=BLOCK, corpus=scanned)
    fresh = ByteDataset(corpus, ShardSpec(1, 2), block_size=BLOCK)
    assert shared.train.tobytes() == fresh.train.tobytes()


def test_batch_shapes_dtypes_and_shifted_targets(corpus):
    """batch() gives (B, T) int64 inputs and targets shifted by one byte."""
    dataset = ByteDataset(corpus, ShardSpec(0, 2), block_size=BLOCK)
    inputs, targets = dataset.batch(torch.Generator().manual_seed(0), 5)
    assert inputs.shape == targets.shape == (5, BLOCK)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert int(inputs.min()) >= 0 and int(inputs.max()) < 256


def test_batches_are_reproducible_with_a_seeded_generator(corpus):
    """Same seed, same batches; another seed, other batches."""
    dataset = ByteDataset(corpus, ShardSpec(0, 2), block_size=BLOCK)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return [dataset.batch(generator, 4) for _ in range(3)]

    first, second, other = draw(7), draw(7), draw(8)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_eval_batches_are_fixed_by_seed_and_come_from_holdout(corpus):
    """eval_batches(seed) is identical across datasets/peers and drawn from the held-out bytes."""
    a = ByteDataset(corpus, ShardSpec(0, 2), block_size=BLOCK)
    b = ByteDataset(corpus, ShardSpec(1, 2), block_size=BLOCK, seed=3)
    batches_a, batches_b = a.eval_batches(3, 4), b.eval_batches(3, 4)
    assert len(batches_a) == 3
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    holdout = a.holdout.tobytes()
    for x, y in batches_a:
        for row_x, row_y in zip(x, y, strict=True):
            window = bytes(row_x.tolist()) + bytes(row_y[-1:].tolist())
            assert window in holdout
    other = a.eval_batches(3, 4, seed=99)
    assert not torch.equal(other[0][0], batches_a[0][0])


@pytest.mark.parametrize(
    ("index", "count", "field_name"), [(0, 0, "num_shards"), (3, 3, "shard"), (-1, 2, "shard")]
)
def test_shard_spec_validation_names_the_field(index, count, field_name):
    """ShardSpec refuses an index outside [0, count) or a non-positive count."""
    with pytest.raises(ConfigError, match=rf"^{field_name}: "):
        ShardSpec(index, count)
