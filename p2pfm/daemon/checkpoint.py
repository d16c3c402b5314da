"""Atomic checkpoints in safetensors: temp file, fsync, rename, fsync of the directory.

A peer killed at any instant leaves either the previous checkpoint or the new one, never a
torn file. The format is safetensors, the ecosystem's format that runs no code on load, so a
peer's ``WORK_DIR/checkpoint.safetensors`` opens in any tool (``safetensors.torch.load_file``):

* ``model.<name>``: each parameter under its own name and shape (``model.named_parameters()``,
  a wrapper's ``module.`` prefix dropped), so the file's ``model.*`` tensors are a state dict
  that loads into the model (tied weights appear once, under their first name);
* ``momentum``, ``residual``, ``round``: the gossip state, flat vectors in parameter order;
* ``opt.<index>.<key>``: the inner optimizer's state (``ModelAdapter.optimizer_arrays``);
* metadata (strings): ``p2pfm.meta``, the run's meta dict as JSON, and ``p2pfm.params``, the
  parameter names in ``model.parameters()`` order, from which the flat vector is rebuilt exactly.

The network's state transfers keep their own strict format (:mod:`p2pfm.core.tensorfile`); a
checkpoint is a local file, yet it is still validated on load and a bad one is set aside. A
``checkpoint.p2pfm`` (tensorfile) written by an earlier p2pfm is read once, when no safetensors
checkpoint exists, and removed after the first safetensors checkpoint is written.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from p2pfm.core.errors import Reject
from p2pfm.core.tensorfile import unpack_arrays

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
LEGACY_CHECKPOINT_NAME = "checkpoint.p2pfm"  # tensorfile, before safetensors: read once, then replaced
PARAM_PREFIX = "model."
META_KEY = "p2pfm.meta"
PARAMS_KEY = "p2pfm.params"


class CheckpointError(ValueError):
    """A checkpoint file that is not one we wrote: unreadable, inconsistent or of the wrong types."""


def _atomic_write(path: Path, write: Callable[[str], None], mode: int) -> None:
    """Let ``write`` fill a temp file beside ``path``, fsync it, rename it over ``path``, fsync the dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole."""
    _atomic_write(path, lambda name: Path(name).write_bytes(data), mode)


def checkpoint_tensors(
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    param_shapes: Sequence[tuple[str, tuple[int, ...]]] = (),
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a checkpoint file; ``params`` split by ``param_shapes`` if given."""
    tensors = {}
    for name, array in arrays.items():
        if name.startswith(PARAM_PREFIX) or not isinstance(array, np.ndarray):
            raise ValueError(
                f"checkpoint array {name!r}: names starting with {PARAM_PREFIX!r} are the parameters'"
            )
        tensors[name] = np.ascontiguousarray(array)
    metadata = {"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)}
    if param_shapes and "params" in tensors:
        flat = tensors.pop("params")
        sizes = [int(np.prod(shape)) for _, shape in param_shapes]
        if sum(sizes) != flat.size:
            raise ValueError(f"params has {flat.size} entries, the named parameters {sum(sizes)}")
        offset = 0
        for (name, shape), size in zip(param_shapes, sizes, strict=True):
            tensors[PARAM_PREFIX + name] = flat[offset : offset + size].reshape(shape)
            offset += size
        metadata[PARAMS_KEY] = json.dumps([name for name, _ in param_shapes])
    return tensors, metadata


def save_checkpoint(
    work_dir: Path,
    arrays: dict[str, np.ndarray],
    meta: dict[str, Any],
    param_shapes: Sequence[tuple[str, tuple[int, ...]]] = (),
) -> Path:
    """Write ``work_dir/checkpoint.safetensors`` atomically; ``param_shapes`` names and shapes the
    flat ``params`` (``ModelAdapter.parameter_shapes()``; without it, ``params`` stays one flat tensor)."""
    path = work_dir / CHECKPOINT_NAME
    tensors, metadata = checkpoint_tensors(arrays, meta, param_shapes)
    _atomic_write(path, lambda name: save_file(tensors, name, metadata=metadata), 0o644)
    (work_dir / LEGACY_CHECKPOINT_NAME).unlink(missing_ok=True)  # migrated: the new file supersedes it
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays (``params`` flat again) and meta of a checkpoint file; CheckpointError if it is not one."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"not a safetensors file: {exc}") from None
    try:
        meta = json.loads(metadata.get(META_KEY, "{}"))
        names = json.loads(metadata[PARAMS_KEY]) if PARAMS_KEY in metadata else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"metadata is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError("metadata p2pfm.meta is not a JSON object")
    stored = sorted(n[len(PARAM_PREFIX) :] for n in tensors if n.startswith(PARAM_PREFIX))
    if names is None:
        if stored:
            raise CheckpointError(f"model.* tensors without their order ({PARAMS_KEY} metadata)")
        return tensors, meta
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)) or sorted(names) != stored:
        raise CheckpointError(f"{PARAMS_KEY} does not list the file's model.* tensors")
    if "params" in tensors:
        raise CheckpointError("both a flat params tensor and model.* tensors")
    parts = [tensors.pop(PARAM_PREFIX + name) for name in names]
    if any(part.dtype != np.float32 for part in parts):
        raise CheckpointError("parameters must be float32")
    tensors["params"] = np.concatenate([part.ravel() for part in parts]) if parts else np.empty(0, np.float32)
    return tensors, meta


def _set_aside(path: Path, exc: Exception) -> None:
    broken = path.with_suffix(".corrupt")
    log.error("checkpoint %s is unreadable (%s); moved to %s, starting without it", path, exc, broken)
    os.replace(path, broken)


def load_checkpoint(work_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The last checkpoint, or None if there is none; a corrupt one is reported and set aside.

    Reads ``checkpoint.safetensors``; without one, a legacy ``checkpoint.p2pfm`` (migrated: the
    next :func:`save_checkpoint` writes safetensors and removes it).
    """
    path = work_dir / CHECKPOINT_NAME
    if path.exists():
        try:
            return read_checkpoint(path)
        except (CheckpointError, OSError) as exc:
            _set_aside(path, exc)
            return None
    legacy = work_dir / LEGACY_CHECKPOINT_NAME
    if not legacy.exists():
        return None
    try:
        found = unpack_arrays(legacy.read_bytes())
    except (Reject, OSError) as exc:
        _set_aside(legacy, exc)
        return None
    log.warning(
        "read %s (the format before safetensors); the next checkpoint replaces it with %s", legacy, path.name
    )
    return found
