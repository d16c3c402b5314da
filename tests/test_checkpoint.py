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


def gpt_state(seed: int = 0):
    """A tiny GPT's named shapes and a checkpoint-like arrays dict for it."""
    import torch

    from p2pfm.daemon.trainer import ModelAdapter
    from p2pfm.model.config import GPT_PRESETS
    from p2pfm.model.gpt import build_model

    model = build_model(GPT_PRESETS["tiny"], seed)
    adapter = ModelAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1))
    flat = adapter.flat()
    arrays = {
        "params": flat,
        "momentum": np.full_like(flat, 0.5),
        "residual": np.zeros_like(flat),
        "round": np.array([7], np.int64),
        "opt.0.step": np.array([3.0], np.float32),
    }
    return model, adapter, arrays


def test_checkpoint_is_safetensors_with_named_parameters(tmp_path):
    """safetensors.torch.load_file opens it; model.<name> tensors have the parameters' shapes and values."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    model, adapter, arrays = gpt_state()
    path = save_checkpoint(tmp_path, arrays, {"round": 7}, adapter.parameter_shapes())
    assert path.name == "checkpoint.safetensors"
    tensors = load_file(path)
    named = dict(model.named_parameters())
    assert {k for k in tensors if k.startswith("model.")} == {f"model.{n}" for n in named}
    for name, param in named.items():
        assert torch.equal(tensors[f"model.{name}"], param.detach())
    assert int(tensors["round"][0]) == 7 and torch.equal(
        tensors["momentum"], torch.full_like(tensors["momentum"], 0.5)
    )
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format"] == "pt"
    # The model.* tensors are a state dict: a fresh model (other seed) loads them and matches exactly.
    other, _, _ = gpt_state(seed=9)
    missing, unexpected = other.load_state_dict(
        {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False
    )
    assert unexpected == [] and missing == ["head.weight"]  # tied to tok_emb.weight, saved once
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_named_checkpoint_round_trips_the_flat_vector_exactly(tmp_path):
    """Loading concatenates the model.* tensors in parameters() order: the same flat vector, bit for bit."""
    _, adapter, arrays = gpt_state()
    save_checkpoint(tmp_path, arrays, {"round": 7, "config": {"seed": 0}}, adapter.parameter_shapes())
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded[1] == {"round": 7, "config": {"seed": 0}}
    assert set(loaded[0]) == set(arrays)
    for name, array in arrays.items():
        assert loaded[0][name].dtype == array.dtype and np.array_equal(loaded[0][name], array)


def test_wrapper_prefix_is_dropped_from_parameter_names():
    """A module. wrapper (ours for HF models, DDP's) saves under the wrapped model's own names."""
    import torch

    inner = torch.nn.Sequential(torch.nn.Linear(3, 2))
    wrapper = torch.nn.Module()
    wrapper.module = inner
    from p2pfm.daemon.trainer import ModelAdapter

    shapes = ModelAdapter(wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.1)).parameter_shapes()
    assert shapes == [("0.weight", (2, 3)), ("0.bias", (2,))]


def test_inconsistent_parameter_list_is_set_aside(tmp_path):
    """Metadata naming tensors the file lacks is a corrupt checkpoint: moved aside, None."""
    from safetensors.numpy import save_file

    save_file(
        {"model.a": np.zeros(2, np.float32)},
        str(tmp_path / CHECKPOINT_NAME),
        metadata={"p2pfm.meta": "{}", "p2pfm.params": '["a", "b"]'},
    )
    assert load_checkpoint(tmp_path) is None
    assert (tmp_path / "checkpoint.corrupt").exists()


def test_legacy_checkpoint_is_read_once_then_replaced(tmp_path):
    """A checkpoint.p2pfm from before safetensors is read; the next save writes safetensors and removes it."""
    from p2pfm.core.tensorfile import pack_arrays

    arrays, meta = sample()
    legacy = tmp_path / checkpoint.LEGACY_CHECKPOINT_NAME
    legacy.write_bytes(pack_arrays(arrays, meta))
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded[1] == meta and np.array_equal(loaded[0]["params"], arrays["params"])
    save_checkpoint(tmp_path, loaded[0], loaded[1])
    assert not legacy.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    assert load_checkpoint(tmp_path)[1] == meta


def test_corrupt_legacy_checkpoint_is_set_aside(tmp_path):
    legacy = tmp_path / checkpoint.LEGACY_CHECKPOINT_NAME
    legacy.write_bytes(b"junk")
    assert load_checkpoint(tmp_path) is None
    assert not legacy.exists() and (tmp_path / "checkpoint.corrupt").read_bytes() == b"junk"
