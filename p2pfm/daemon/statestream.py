"""Moving a state download's bytes: the donor's chunk loop and the joiner's partial file.

Both sides hold a few chunks in memory at a time, never the state (~1.5 GB at 124M parameters):

- the donor reads each chunk from its snapshot file (:mod:`p2pfm.daemon.snapshots`) just
  before sending it, the next one read in a worker thread while the current one is written;
- the joiner checks each chunk's hash (in a worker thread: ``hashlib`` releases the GIL, so
  the next frame is read meanwhile) and only then writes it into :class:`PartialState`'s file
  at its offset. The container's checks run on an ``mmap`` of the finished file
  (``PeerProtocol.open_state_buffer``), and the arrays handed back are views of it. No pass
  over the whole: the state's ``model_hash`` is the root of its chunk hashes
  (``p2pfm.core.transfer.state_root``, checked with the manifest), and every chunk in the file
  was checked against them (a SHA-256 of the whole used to cost ~1.1 s of CPU at 124M).

Resume: chunks are content-addressed. :class:`PartialState` remembers the hash of every chunk
it verified; a download from another donor (or the same one, back from a restart) keeps every
verified chunk whose hash the new manifest lists, at any index, and asks only for the rest
(``want`` in the ``state_request``; ``p2pfm.core.transfer.wanted_chunks``). A chunk is
reused only if its bytes hash to the new manifest's entry for that index (checked again as it is
moved), and the new manifest's ``model_hash`` must be the root of its chunk hashes, so reuse
never admits a byte the new manifest does not vouch for.

Deadlines: no chunk for ``stall_s`` ends a transfer on either side; so does the whole
deadline, which scales with the state's size (``NetConfig.state_deadline_s``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2pfm.core.errors import HashMismatch
from p2pfm.core.transfer import Manifest, StateLayout, check_chunk, want_ranges
from p2pfm.daemon.net import read_frame, write_frame
from p2pfm.daemon.snapshots import read_chunk

log = logging.getLogger("p2pfm.peer")

PROGRESS_EVERY_S = 2.0  # the joiner logs its progress at most this often (and after the first chunk)
# Chunks checked and written at once on the joiner: one chunk's hash runs beside the previous one's
# write (on two cores a single worker was the bottleneck).
WRITES_IN_FLIGHT = 2
READ_AHEAD_CHUNK = 4 << 20  # the joiner's stream reads ahead up to two such chunks (widen_reader)


# --- the donor's side --------------------------------------------------------------------------
async def send_chunks(
    writer: asyncio.StreamWriter,
    fd: int,
    layout: StateLayout,
    indexes: list[int],
    *,
    stall_s: float,
    rate_bps: float = 0.0,
) -> int:
    """Write chunks ``indexes`` of the snapshot open as ``fd``, one frame each; returns the bytes.

    Each frame must leave within ``stall_s`` (a joiner that stopped reading frees the upload
    slot); ``rate_bps`` > 0 caps the upload (sleeping between chunks). The caller bounds the
    whole transfer with ``NetConfig.state_deadline_s``.
    """
    loop = asyncio.get_running_loop()
    sent, started = 0, loop.time()
    upcoming = loop.run_in_executor(None, read_chunk, fd, layout, indexes[0]) if indexes else None
    try:
        for position in range(len(indexes)):
            assert upcoming is not None
            piece = await upcoming
            upcoming = (
                loop.run_in_executor(None, read_chunk, fd, layout, indexes[position + 1])
                if position + 1 < len(indexes)
                else None
            )
            await asyncio.wait_for(write_frame(writer, piece), stall_s)
            sent += len(piece)
            if rate_bps > 0:
                ahead = started + sent / rate_bps - loop.time()
                if ahead > 0:
                    await asyncio.sleep(ahead)
    finally:
        # A stalled or cut transfer leaves one read ahead; the caller closes ``fd`` next, so that
        # read may fail: cancelling its future drops the outcome (no "exception never retrieved").
        if upcoming is not None:
            upcoming.cancel()
    return sent


# --- the joiner's side -------------------------------------------------------------------------
class PartialState:
    """A state download on disk: ``partial.state`` laid out as one manifest, and which of its
    chunks are verified (index -> hash). Lives as long as the peer, across donors and attempts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "partial.state"
        self.manifest: Manifest | None = None
        self.verified: dict[int, bytes] = {}
        # Worker threads write chunks; a write left running by a cancelled transfer must not
        # interleave with the next manifest's layout (it is checked against whichever it finds).
        self.lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # a previous life's file: its record is gone with it

    def verified_bytes(self) -> int:
        manifest = self.manifest
        return 0 if manifest is None else sum(manifest.chunk_length(i) for i in self.verified)

    def missing(self) -> list[int]:
        count = 0 if self.manifest is None else len(self.manifest.chunk_hashes)
        return [i for i in range(count) if i not in self.verified]

    def want_for(self, model_hash: bytes) -> dict | None:
        """The ``want`` of a request to a donor announcing ``model_hash``: the chunks still missing
        if it is the state we are part-way through, else None (the manifest decides; see
        :meth:`take_manifest`)."""
        if self.manifest is None or self.manifest.model_hash != model_hash or not self.verified:
            return None
        return {"model_hash": model_hash, "ranges": want_ranges(self.missing())}

    def take_manifest(self, manifest: Manifest) -> int:
        """Lay the file out as ``manifest``, keeping every verified chunk whose hash it lists (at
        any index); returns the bytes kept. Blocking file I/O: run it in a worker thread."""
        with self.lock:
            return self._take_manifest(manifest)

    def _take_manifest(self, manifest: Manifest) -> int:
        old, held = self.manifest, dict(self.verified)
        if old == manifest:
            return self.verified_bytes()
        sources: dict[bytes, int] = {}
        for index, chunk_hash in held.items():
            sources.setdefault(chunk_hash, index)
        moves = {i: sources[h] for i, h in enumerate(manifest.chunk_hashes) if h in sources}
        target = self.path.with_suffix(".next")
        kept: dict[int, bytes] = {}
        with open(target, "wb") as out:
            out.truncate(manifest.total_bytes)
            if moves and old is not None:
                with open(self.path, "rb") as source:
                    for new_index, old_index in moves.items():
                        start, length = old.layout.chunk_range(old_index)
                        if length != manifest.chunk_length(new_index):
                            continue
                        piece = os.pread(source.fileno(), length, start)
                        # checked again as it moves: the new manifest vouches for exactly these bytes
                        if hashlib.sha256(piece).digest() != manifest.chunk_hashes[new_index]:
                            continue
                        os.pwrite(out.fileno(), piece, manifest.layout.chunk_range(new_index)[0])
                        kept[new_index] = manifest.chunk_hashes[new_index]
        os.replace(target, self.path)
        self.manifest, self.verified = manifest, kept
        return self.verified_bytes()

    def write_chunk(self, index: int, piece: bytes) -> None:
        """Check chunk ``index`` against the manifest (HASH_MISMATCH), then write it in place. Two
        calls may run at once (different chunks): the checks in parallel, the writes one at a time."""
        manifest = self.manifest
        assert manifest is not None
        check_chunk(manifest, index, piece)
        with self.lock:
            if self.manifest is not manifest:  # a cancelled transfer's chunk, after a new manifest
                return
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, piece, manifest.layout.chunk_range(index)[0])
            finally:
                os.close(fd)
            self.verified[index] = manifest.chunk_hashes[index]

    def open_state(self, check: Callable[[Manifest, mmap.mmap, bool], tuple[dict[str, np.ndarray], int]]):
        """``check(manifest, buffer, chunks_checked=True)`` on a private ``mmap`` of the finished
        file (writable views, copy-on-write: nothing the caller does reaches the file): every chunk
        in it was checked against ``manifest`` on its way in. A refused state is discarded."""
        manifest = self.manifest
        assert manifest is not None and not self.missing()
        with open(self.path, "rb") as source:
            buffer = (
                mmap.mmap(source.fileno(), manifest.total_bytes, access=mmap.ACCESS_COPY)
                if manifest.total_bytes
                else mmap.mmap(-1, 1)
            )
        try:
            return check(manifest, buffer, True)
        except HashMismatch:
            self.discard()
            raise

    def discard(self) -> None:
        """Forget the download (adopted, or its whole failed its hash): the file goes, mappings stay valid."""
        with self.lock:
            self.path.unlink(missing_ok=True)
            self.manifest, self.verified = None, {}


@dataclass
class Progress:
    """One state download's figures: logged, put in the ``state_download`` record."""

    donor: str
    total_bytes: int = 0
    model_hash: bytes = b""  # the manifest's (the last one, if donors moved on)
    fetched: int = 0  # chunk bytes that came over the network and verified
    reused: int = 0  # verified bytes kept from earlier attempts (not fetched again)
    seconds: float = 0.0
    attempts: int = 0
    via: str = "stream"  # how the chunks came: "stream" (libp2p), "lane" (p2pfm.core.lane), "lane+stream"

    @property
    def rate_bps(self) -> float:
        return self.fetched / self.seconds if self.seconds > 0 else 0.0


def widen_reader(reader: asyncio.StreamReader, chunk_bytes: int) -> None:
    """Let ``reader`` read ahead up to two chunks (of at most ``READ_AHEAD_CHUNK`` bytes) before it
    stops reading the socket.

    asyncio's default limit (64 KiB) pauses the transport after every 256 KiB read once its
    buffer holds more than 128 KiB (twice the limit): while the loop waited for the chunks in
    the workers, the socket stood still. With the limit at the chunk size the next frames keep
    coming meanwhile; the read-ahead stays bounded (a donor's 64 MiB chunks get no more of it
    than 4 MiB ones). ``_limit`` is ``StreamReader``'s own (private, unchanged since Python 3.7);
    a reader without it is left as it is.
    """
    limit = min(chunk_bytes, READ_AHEAD_CHUNK)
    if limit > getattr(reader, "_limit", limit):
        reader._limit = limit  # type: ignore[attr-defined]


async def receive_chunks(
    reader: asyncio.StreamReader,
    partial: PartialState,
    indexes: list[int],
    progress: Progress,
    *,
    stall_s: float,
) -> None:
    """Read chunks ``indexes`` (in order) from the libp2p stream into ``partial``: each frame bounded
    by its exact length, within ``stall_s`` (:func:`receive_pieces` checks and writes them)."""
    manifest = partial.manifest
    assert manifest is not None
    widen_reader(reader, max((manifest.chunk_length(i) for i in indexes[:1]), default=0))

    async def next_piece(index: int) -> bytes:
        return await asyncio.wait_for(read_frame(reader, manifest.chunk_length(index)), stall_s)

    await receive_pieces(next_piece, partial.write_chunk, partial, indexes, progress)


async def receive_pieces(
    next_piece: Callable[[int], Awaitable[bytes | bytearray]],
    write: Callable[[int, bytes | bytearray], None],
    partial: PartialState,
    indexes: list[int],
    progress: Progress,
) -> None:
    """Take chunks ``indexes`` in order (``await next_piece(index)``, from the stream or the lane),
    each verified and written by ``write(index, piece)`` in a worker thread while the next ones
    are read (``WRITES_IN_FLIGHT`` at most: the joiner holds a few chunks, never the state)."""
    manifest = partial.manifest
    assert manifest is not None
    loop = asyncio.get_running_loop()
    pending: deque[tuple[asyncio.Future, int]] = deque()  # (job, bytes), oldest first
    started, last_log = time.perf_counter(), float("-inf")

    async def settle(keep: int) -> None:  # the oldest jobs: verified and written, or refused
        while len(pending) > keep:
            job, length = pending[0]
            try:
                await job
            finally:
                pending.popleft()
            progress.fetched += length

    try:
        for index in indexes:
            piece = await next_piece(index)
            await settle(WRITES_IN_FLIGHT - 1)
            pending.append((loop.run_in_executor(None, write, index, piece), manifest.chunk_length(index)))
            now = time.perf_counter()
            if progress.fetched and now - last_log >= PROGRESS_EVERY_S:
                last_log = now
                log.info(
                    "state download from %s: %d of %d chunks verified (%.1f MB/s)",
                    progress.donor, len(partial.verified), len(manifest.chunk_hashes),
                    progress.fetched / max(now - started, 1e-9) / 1e6,
                )  # fmt: skip
    finally:
        # Chunks that arrived before the stream broke are kept; no job outlives this call (the
        # first refusal among them is raised once all are done).
        failure: BaseException | None = None
        while pending:
            try:
                await settle(len(pending) - 1)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the rest
                failure = failure or exc
        if failure is not None:
            raise failure
