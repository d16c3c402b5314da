"""Atomic checkpoints: readers see the old file or the new one, whole; corrupt ones are set aside."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from p2pfm.daemon import checkpoint
from p2pfm.daemon.checkpoint import CHECKPOINT_NAME, atomic_write_bytes, load_checkpoint, save_checkpoint


def leftovers(directory) -> list[str]:
    """Temp files atomic_write_bytes may have left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def sample() -> tuple[dict[str, np.ndarray], dict]:
    arrays = {
        "params": np.linspace(-1, 1, 50, dtype=np.float32),
        "momentum": np.zeros(50, np.float32),
        "round": np.array([4], np.int64),
    }
    return arrays, {"round": 4, "config": {"seed": 0}}


def test_atomic_write_creates_file_with_content_and_no_temp_files(tmp_path):
    """The file has exactly the data and no temp file remains beside it."""
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    assert leftovers(tmp_path) == []


def test_atomic_write_replaces_existing_file(tmp_path):
    """A second write replaces the first (a new inode, renamed over the old name)."""
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"first version, longer")
    old_inode = path.stat().st_ino
    with path.open("rb") as reader:  # a reader holding the old file keeps seeing it whole
        atomic_write_bytes(path, b"second")
        assert reader.read() == b"first version, longer"
    assert path.read_bytes() == b"second"
    assert path.stat().st_ino != old_inode
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_atomic_write_sets_the_given_mode(tmp_path, mode):
    """The file gets exactly the requested permission bits."""
    path = tmp_path / "secret.bin"
    atomic_write_bytes(path, b"x", mode=mode)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_atomic_write_creates_missing_parent_directories(tmp_path):
    """Parent directories are created as needed."""
    path = tmp_path / "a" / "b" / "out.bin"
    atomic_write_bytes(path, b"deep")
    assert path.read_bytes() == b"deep"


def test_atomic_write_failure_before_rename_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    """If the rename fails (a crash mid-write), the old file is intact and the temp file is gone."""
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"old")

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_atomic_write_interrupted_by_keyboard_interrupt_cleans_up(tmp_path, monkeypatch):
    """Even a BaseException (Ctrl-C) during the write removes the temp file and propagates."""
    path = tmp_path / "out.bin"

    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new")
    assert not path.exists()
    assert leftovers(tmp_path) == []


def test_save_and_load_round_trip(tmp_path):
    """save_checkpoint then load_checkpoint returns the same arrays and meta."""
    arrays, meta = sample()
    path = save_checkpoint(tmp_path, arrays, meta)
    assert path == tmp_path / CHECKPOINT_NAME
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    loaded_arrays, loaded_meta = loaded
    assert loaded_meta == meta
    assert set(loaded_arrays) == set(arrays)
    for name, array in arrays.items():
        assert np.array_equal(loaded_arrays[name], array)
        assert loaded_arrays[name].dtype == array.dtype
    assert leftovers(tmp_path) == []


def test_load_without_checkpoint_returns_none(tmp_path):
    """A fresh work dir has no checkpoint: None, nothing created."""
    assert load_checkpoint(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # torn write
        lambda data: b"garbage" + data[7:],  # bad magic
        lambda data: data + b"\x00",  # trailing byte
        lambda data: b"",  # empty file
    ],
    ids=["truncated", "bad-magic", "trailing", "empty"],
)
def test_corrupt_checkpoint_is_moved_aside_and_load_returns_none(tmp_path, damage):
    """A checkpoint that fails validation is renamed to .corrupt and load returns None."""
    arrays, meta = sample()
    path = save_checkpoint(tmp_path, arrays, meta)
    broken = damage(path.read_bytes())
    path.write_bytes(broken)
    assert load_checkpoint(tmp_path) is None
    assert not path.exists()
    aside = path.with_suffix(".corrupt")
    assert aside.read_bytes() == broken  # kept for inspection, not deleted
    # the next save starts clean
    save_checkpoint(tmp_path, arrays, meta)
    assert load_checkpoint(tmp_path) is not None


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A crash between writing and renaming leaves the previous checkpoint loadable, no temp file."""
    arrays, meta = sample()
    save_checkpoint(tmp_path, arrays, meta)
    newer = {name: array + 1 for name, array in arrays.items()}

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, newer, {"round": 5})
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded[1] == meta
    assert np.array_equal(loaded[0]["params"], arrays["params"])
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
