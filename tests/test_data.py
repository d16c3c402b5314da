"""The corpus: a deterministic split into held-out and per-peer shards, and seeded batches."""

from __future__ import annotations

import shutil

import pytest
import torch

from p2pfm.config import ConfigError
from p2pfm.model.data import (
    HOLDOUT_EVERY,
    ByteDataset,
    ShardSpec,
    list_corpus_files,
    split_corpus,
)

FILES = 60
BLOCK = 16


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


def relative(root, files) -> list[str]:
    return [f.relative_to(root).as_posix() for f in files]


def test_lists_only_nonempty_text_files_sorted(corpus):
    """Only non-empty text files outside site-packages are listed, in sorted relative-path order."""
    names = relative(corpus, list_corpus_files(corpus))
    assert len(names) == FILES
    assert names == sorted(names)
    assert "empty.txt" not in names and "image.png" not in names
    assert not any("site-packages" in n for n in names)


def test_split_is_deterministic(corpus):
    """Every call (every peer) computes the same split."""
    first, second = split_corpus(corpus), split_corpus(corpus)
    assert first == second
    assert relative(corpus, first.train_files) == relative(corpus, second.train_files)


def test_split_does_not_depend_on_the_absolute_location(corpus, tmp_path):
    """A copy of the corpus elsewhere splits the same way (ranks use relative paths)."""
    copy = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(corpus, copy)
    a, b = split_corpus(corpus), split_corpus(copy)
    assert relative(corpus, a.train_files) == relative(copy, b.train_files)
    assert relative(corpus, a.holdout_files) == relative(copy, b.holdout_files)


def test_holdout_is_disjoint_from_train_and_together_they_cover_all(corpus):
    """Held-out files are never trained on; train + holdout is every corpus file."""
    split = split_corpus(corpus)
    assert not set(split.train_files) & set(split.holdout_files)
    assert set(split.train_files) | set(split.holdout_files) == set(list_corpus_files(corpus))
    assert len(split.holdout_files) == -(-FILES // HOLDOUT_EVERY)


def test_holdout_mixes_folders_instead_of_taking_a_run(corpus):
    """Files are ranked by hash, so the held-out set is not simply the first files in order."""
    split = split_corpus(corpus)
    ordered = list_corpus_files(corpus)
    assert list(split.holdout_files) != ordered[: len(split.holdout_files)]


@pytest.mark.parametrize("count", [1, 3, 8])
def test_shards_are_disjoint_and_cover_the_training_files(corpus, count):
    """Each training file lands in exactly one shard of `count`."""
    split = split_corpus(corpus)
    shards = [
        [f for i, f in enumerate(split.train_files) if i % count == index] for index in range(count)
    ]
    seen = [f for shard in shards for f in shard]
    assert len(seen) == len(set(seen)) == len(split.train_files)
    # and ByteDataset reads exactly its shard's bytes
    for index in range(count):
        dataset = ByteDataset(corpus, ShardSpec(index, count), block_size=BLOCK)
        expected = b"\n".join(f.read_bytes() for f in shards[index])
        assert dataset.train.tobytes() == expected


def test_shard_bytes_are_disjoint_between_peers(corpus):
    """Two peers on different shards train on different files' text."""
    a = ByteDataset(corpus, ShardSpec(0, 2), block_size=BLOCK).train.tobytes()
    b = ByteDataset(corpus, ShardSpec(1, 2), block_size=BLOCK).train.tobytes()
    files_a = {line for line in a.split(b"\n") if line.startswith(b"# file")}
    files_b = {line for line in b.split(b"\n") if line.startswith(b"# file")}
    assert files_a and files_b and not files_a & files_b


def test_holdout_bytes_are_the_same_for_every_shard(corpus):
    """Every peer evaluates on the same held-out bytes."""
    a = ByteDataset(corpus, ShardSpec(0, 3), block_size=BLOCK)
    b = ByteDataset(corpus, ShardSpec(2, 3), block_size=BLOCK)
    assert a.holdout.tobytes() == b.holdout.tobytes()


def test_max_shard_bytes_caps_the_training_bytes(corpus):
    """A peer keeps at most max_shard_bytes of text in memory."""
    dataset = ByteDataset(corpus, ShardSpec(0, 1), block_size=BLOCK, max_shard_bytes=1000)
    assert len(dataset.train) == 1000


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
    b = ByteDataset(corpus, ShardSpec(1, 2), block_size=BLOCK)
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


def test_missing_directory_is_a_config_error(tmp_path):
    """A data path that does not exist is refused naming it."""
    with pytest.raises(ConfigError, match=r"^data: directory .*nowhere does not exist"):
        list_corpus_files(tmp_path / "nowhere")


def test_file_instead_of_directory_is_a_config_error(tmp_path):
    """A data path that is a file is refused."""
    path = tmp_path / "file.txt"
    path.write_text("hello")
    with pytest.raises(ConfigError, match=r"^data: .*is not a directory"):
        list_corpus_files(path)


def test_empty_directory_is_a_config_error(tmp_path):
    """An empty folder has no text files."""
    with pytest.raises(ConfigError, match=r"^data: no text files"):
        split_corpus(tmp_path)


def test_directory_without_text_files_is_a_config_error(tmp_path):
    """Only non-text (or empty) files is the same as no files."""
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ConfigError, match=r"^data: no text files"):
        ByteDataset(tmp_path, ShardSpec(0, 1), block_size=BLOCK)


def test_single_file_corpus_has_no_training_files(tmp_path):
    """One file becomes the held-out set: too few to train on."""
    (tmp_path / "only.txt").write_text("text " * 100)
    with pytest.raises(ConfigError, match=r"^data: .*too few files"):
        split_corpus(tmp_path)


def test_shard_without_files_is_a_config_error(tmp_path):
    """More shards than training files leaves some shard empty."""
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text("some text\n" * 10)
    with pytest.raises(ConfigError, match=r"^data: shard 5 of 6 is empty"):
        ByteDataset(tmp_path, ShardSpec(5, 6), block_size=BLOCK)


def test_too_small_shard_is_a_config_error(tmp_path):
    """A shard with fewer than block_size + 2 bytes is refused, naming the problem."""
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text("tiny")
    with pytest.raises(ConfigError, match=r"^data: the training shard .* fewer than block_size\+2"):
        ByteDataset(tmp_path, ShardSpec(0, 1), block_size=64)


@pytest.mark.parametrize(("index", "count", "field_name"), [(0, 0, "num_shards"), (3, 3, "shard"), (-1, 2, "shard")])
def test_shard_spec_validation_names_the_field(index, count, field_name):
    """ShardSpec refuses an index outside [0, count) or a non-positive count."""
    with pytest.raises(ConfigError, match=rf"^{field_name}: "):
        ShardSpec(index, count)
