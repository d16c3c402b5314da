"""The state a peer serves to joiners, kept on disk: written once per round, read chunk by chunk.

Before, the snapshot was a ``bytes`` blob of the whole packed state (params, round, AdamW
moments: ~1.5 GB at 124M parameters) held in RAM for the whole round beside the live model,
and ``manifest_payload`` sliced it into a second full-size list of chunks for every upload.
Now :meth:`SnapshotStore.write` streams the packed state into a file in the work dir, hashing
the whole and every chunk as it goes (``p2pfm.core.transfer.write_state``), and the ``state``
handler reads one chunk at a time from it.

A transfer in progress keeps serving the snapshot its manifest described even after the
round moves on: the handler opens the file before it signs the manifest and reads through
that open descriptor; a newer snapshot replaces the file by name and the old one is unlinked
at once, so its bytes live exactly as long as the streams still reading them (at most the
two upload slots) and nobody can open it any more. Files left by a crash are removed at start.

Snapshots are written in a worker thread (the round driver does not block the event loop on
~1.5 GB at 124M) while handlers open them on the event loop: the store swaps files and opens
the latest one under one lock (:meth:`SnapshotStore.open_latest`), so a handler can never hold
a snapshot whose file a newer write has just unlinked (a race ``p2pfm bench fuzz`` found).

The file a newer snapshot replaced is kept as the next write's target when nobody reads it
(the store counts the descriptors it hands out until :meth:`SnapshotStore.release`): the next
snapshot overwrites its pages in place instead of filling a fresh file. At 124M a fresh 1.5 GB
file cost 1.3-5.5 s of page-cache allocation a round (the more the cache was full, the more),
rewriting the same pages ~0.3 s. A file a transfer still reads is unlinked as before and never
written again; the cost is a second 1.5 GB file on disk.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pfm.core.transfer import StateLayout

SUFFIX = ".state"


@dataclass(frozen=True)
class Snapshot:
    """The state we serve: exactly what our next announcement's hash covers."""

    hash: bytes = bytes(32)
    round: int = 0
    size: int = 0
    layout: StateLayout | None = None  # None until the first snapshot is written
    path: Path | None = None

    def open(self) -> int:
        """A read-only descriptor of this snapshot's file: it keeps the bytes even once a newer
        snapshot replaced the file. Only safe while no newer snapshot can be written meanwhile:
        servers use :meth:`SnapshotStore.open_latest`."""
        if self.path is None:
            raise FileNotFoundError("no snapshot written yet")
        return os.open(self.path, os.O_RDONLY)


def read_chunk(fd: int, layout: StateLayout, index: int) -> bytes:
    """Chunk ``index`` of the snapshot open as ``fd`` (``os.pread``: no shared file position)."""
    offset, length = layout.chunk_range(index)
    piece = os.pread(fd, length, offset)
    if len(piece) != length:
        raise OSError(f"snapshot file is short: chunk {index} has {len(piece)} of {length} bytes")
    return piece


class SnapshotStore:
    """One served snapshot file in ``directory`` at a time (plus unlinked ones still being read)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written = 0
        self.current: Path | None = None
        self.latest = Snapshot()  # what open_latest serves; Snapshot() until the first write
        self.spare: Path | None = None  # a replaced snapshot's file nobody reads: the next write's target
        self.reused = 0  # writes that overwrote a spare file in place (status, tests)
        self._readers: dict[int, Path] = {}  # descriptors open_latest handed out, until release
        self._swap = threading.Lock()  # write's swap+unlink vs open_latest's read+open
        if directory.is_dir():  # files of a previous life of this peer: nobody reads them
            for stale in directory.iterdir():
                if stale.name.startswith("snapshot-"):
                    stale.unlink(missing_ok=True)

    def write(self, produce: Callable[[Callable[[memoryview], object]], StateLayout], round: int) -> Snapshot:
        """Stream a new snapshot (``produce(write) -> layout``) into the spare file (overwritten in
        place) or a fresh one; the last one becomes the spare, or is unlinked if a transfer reads it.

        No fsync: a snapshot is re-made from the live state after any restart, never read back.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.written += 1
        path = self.directory / f"snapshot-{os.getpid()}-{self.written}{SUFFIX}"
        with self._swap:
            spare, self.spare = self.spare, None
        reuse = False
        if spare is not None:
            try:
                os.replace(spare, path)  # a new name (nobody opens the old one again): same pages
                reuse = True
            except OSError:
                spare.unlink(missing_ok=True)
        try:
            with open(path, "r+b" if reuse else "wb", buffering=1 << 20) as out:
                layout = produce(out.write)
                out.truncate()  # a longer snapshot's tail goes
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self.reused += reuse
        snapshot = Snapshot(
            hash=layout.model_hash, round=round, size=layout.total_bytes, layout=layout, path=path
        )
        with self._swap:
            previous, self.current, self.latest = self.current, path, snapshot
            if previous is not None:
                if previous in self._readers.values():
                    previous.unlink(missing_ok=True)  # streams reading it hold their descriptors
                else:
                    self.spare = previous  # nobody reads it, and nobody can open it any more
        return snapshot

    def open_latest(self) -> tuple[Snapshot, int]:
        """The newest snapshot and a read-only descriptor of its file, taken together: safe from
        any thread while another writes (the descriptor keeps the bytes once the file is replaced).
        ``FileNotFoundError`` before the first snapshot is written. Give the descriptor back with
        :meth:`release` (until then its file is never rewritten)."""
        with self._swap:
            snapshot = self.latest
            fd = snapshot.open()
            assert snapshot.path is not None
            self._readers[fd] = snapshot.path
            return snapshot, fd

    def release(self, fd: int) -> None:
        """Close a descriptor :meth:`open_latest` gave: its file may be rewritten once replaced."""
        with self._swap:
            self._readers.pop(fd, None)
        os.close(fd)


def map_initial_params(directory: Path, initial: np.ndarray) -> np.ndarray:
    """The run's initial parameters as a read-only memory map of a file written once per start.

    Every peer keeps them for its whole life (syncs are encoded against them, states are
    compared with them) but reads them only every few rounds: a full-size copy in the heap
    (~0.5 GB at 124M parameters) becomes file-backed pages the kernel may drop and re-read.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "initial-params.f32"
    flat = np.ascontiguousarray(initial, dtype=np.float32).reshape(-1)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "wb") as out:
        out.write(flat.data)
    os.replace(tmp, path)
    if flat.size == 0:
        return np.zeros(0, np.float32)
    with open(path, "rb") as source:  # the mapping outlives the descriptor
        mapping = mmap.mmap(source.fileno(), flat.nbytes, access=mmap.ACCESS_READ)
    return np.frombuffer(mapping, dtype=np.float32)  # read-only, like the file


def mapping_of(array: object) -> mmap.mmap | None:
    """The file mapping behind ``array`` (one of :func:`map_initial_params`, or a view of it), if any."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def drop_mapped_pages(array: object, start: int = 0, end: int | None = None) -> None:
    """Take a mapped array's pages out of this process's resident set (they stay in the page cache).

    ``start``/``end``: only the pages under elements ``[start, end)`` of a 1-D ``array`` (widened
    to whole pages: a neighbour's page dropped early is only read again). Readers that walk the
    array block by block drop each block behind them, so the mapping never adds more than a block.

    The initial parameters are read every few rounds (a params answer, a state check, a sync) and
    each read pages in all 0.5 GB at 124M parameters, which then count in RSS until the kernel
    needs the memory: 0.5 GB of the peak a joiner's params pull used to leave behind. On a
    read-only file mapping ``MADV_DONTNEED`` only unmaps the pages; the next read maps them again
    from the cache (or the file). Safe while another thread reads the array. No-op elsewhere.
    """
    mapping = mapping_of(array)
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if start == 0 and end is None:
        mapping.madvise(mmap.MADV_DONTNEED)
        return
    assert isinstance(array, np.ndarray) and array.ndim == 1
    origin = array.__array_interface__["data"][0] - _address_of(mapping)  # a view's offset in the mapping
    stop = array.size if end is None else min(end, array.size)
    if stop <= start:
        return
    first = origin + start * array.itemsize
    last = origin + stop * array.itemsize
    first -= first % mmap.PAGESIZE
    last = min(len(mapping), -(-last // mmap.PAGESIZE) * mmap.PAGESIZE)
    mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def _address_of(mapping: mmap.mmap) -> int:
    """Where ``mapping`` starts in our address space (a zero-copy numpy view tells us)."""
    return np.frombuffer(mapping, np.uint8, count=1).__array_interface__["data"][0] if len(mapping) else 0
