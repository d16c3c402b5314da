"""Atomic checkpoints: temp file, fsync, rename, fsync of the directory.

A peer killed at any instant leaves either the previous checkpoint or the new one, never a
torn file. The format is :mod:`p2pfm.core.tensorfile` (no code runs on load).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.core.errors import Reject
from p2pfm.core.tensorfile import pack_arrays, unpack_arrays

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.p2pfm"


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
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


def save_checkpoint(work_dir: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    path = work_dir / CHECKPOINT_NAME
    atomic_write_bytes(path, pack_arrays(arrays, meta))
    return path


def load_checkpoint(work_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The last checkpoint, or None if there is none; a corrupt one is reported and set aside."""
    path = work_dir / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        return unpack_arrays(path.read_bytes())
    except (Reject, OSError) as exc:
        broken = path.with_suffix(".corrupt")
        log.error("checkpoint %s is unreadable (%s); moved to %s, starting without it", path, exc, broken)
        os.replace(path, broken)
        return None
