"""The served snapshot's file under a round that writes the next one in a worker thread.

``p2pfm bench fuzz`` once caught the state handler opening a snapshot whose file a newer write
(in the round driver's worker thread) had just unlinked: ``FileNotFoundError`` escaped the
handler and a valid state request got no answer. ``SnapshotStore.open_latest`` swaps and opens
under one lock; these tests hammer that window.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from p2pfm.core.transfer import write_state
from p2pfm.daemon.snapshots import SnapshotStore, read_chunk

CHUNK = 4096


def _write(store: SnapshotStore, round_: int) -> None:
    params = np.full(3000, float(round_), np.float32)  # 12 kB: a few chunks, content names the round
    store.write(lambda write: write_state(write, params, round_, {}, CHUNK), round_)


def test_open_latest_before_any_write_is_a_named_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no snapshot written yet"):
        SnapshotStore(tmp_path).open_latest()


def test_open_latest_never_misses_a_file_while_another_thread_writes_snapshots(tmp_path: Path):
    store = SnapshotStore(tmp_path)
    _write(store, 0)
    stop, failures = threading.Event(), []

    def rounds() -> None:
        round_ = 1
        while not stop.is_set():
            _write(store, round_)
            round_ += 1

    writer = threading.Thread(target=rounds)
    writer.start()
    try:
        for _ in range(3000):
            try:
                snapshot, fd = store.open_latest()
            except FileNotFoundError as exc:  # the race: the old file unlinked under us
                failures.append(exc)
                continue
            try:
                assert snapshot.layout is not None
                for index in range(len(snapshot.layout.chunk_hashes)):
                    # the descriptor still has every byte, and they are this snapshot's
                    check_chunk(snapshot.layout, index, read_chunk(fd, snapshot.layout, index))
            finally:
                store.release(fd)
    finally:
        stop.set()
        writer.join()
    assert failures == []
    assert len(list(tmp_path.glob("snapshot-*"))) <= 2  # the current one and a spare; older files unlinked
    assert store.reused > 0  # replaced files nobody read were rewritten in place


def check_chunk(layout, index: int, piece: bytes) -> None:
    import hashlib

    assert hashlib.sha256(piece).digest() == layout.chunk_hashes[index], f"chunk {index} was overwritten"


def test_a_file_a_transfer_reads_is_never_rewritten_and_one_nobody_reads_is(tmp_path: Path):
    """The replaced snapshot's file becomes the next write's target only if no descriptor of it is
    out: a transfer reading round 0's snapshot keeps round 0's bytes through two more writes."""
    store = SnapshotStore(tmp_path)
    _write(store, 0)
    snapshot, fd = store.open_latest()  # a transfer of round 0 starts
    first_inode = os.fstat(fd).st_ino
    try:
        _write(store, 1)  # round 0's file is read: unlinked, not kept
        assert store.spare is None
        _write(store, 2)  # round 1's file nobody read: the spare
        assert store.spare is not None and store.reused == 0
        spare_inode = os.stat(store.spare).st_ino
        _write(store, 3)  # written into round 1's file, in place
        assert store.reused == 1 and os.stat(store.current).st_ino == spare_inode != first_inode
        assert snapshot.layout is not None
        for index in range(len(snapshot.layout.chunk_hashes)):
            check_chunk(snapshot.layout, index, read_chunk(fd, snapshot.layout, index))
    finally:
        store.release(fd)
    latest, fd = store.open_latest()
    try:
        assert latest.round == 3 and os.fstat(fd).st_size == latest.size
        for index in range(len(latest.layout.chunk_hashes)):
            check_chunk(latest.layout, index, read_chunk(fd, latest.layout, index))
    finally:
        store.release(fd)


def test_a_shorter_snapshot_written_over_a_longer_one_leaves_no_tail(tmp_path: Path):
    store = SnapshotStore(tmp_path)
    big = np.ones(5000, np.float32)
    store.write(lambda write: write_state(write, big, 0, {}, CHUNK), 0)
    store.write(lambda write: write_state(write, big, 1, {}, CHUNK), 1)  # round 0's file: the spare
    small = store.write(lambda write: write_state(write, np.ones(10, np.float32), 2, {}, CHUNK), 2)
    assert store.reused == 1 and small.path is not None and small.path.stat().st_size == small.size


def test_a_cut_upload_leaves_no_orphaned_read_to_fail_after_its_file_is_closed(tmp_path: Path):
    """``send_chunks`` reads one chunk ahead; when the joiner goes away mid-transfer the handler
    closes the descriptor while that read may still run: its failure must not surface as an
    unretrieved future's error (the fuzz bench counts ERROR lines as crashes)."""
    import asyncio
    import gc

    from p2pfm.daemon.statestream import send_chunks

    store = SnapshotStore(tmp_path)
    _write(store, 1)
    snapshot, fd = store.open_latest()
    assert snapshot.layout is not None
    reported: list[dict] = []

    class GoneJoiner:  # the transport a joiner closed: every write fails
        def write(self, data: bytes) -> None:
            raise ConnectionResetError("joiner went away")

        async def drain(self) -> None:
            return None

    async def serve() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        try:
            await send_chunks(GoneJoiner(), fd, snapshot.layout, [0, 1, 2], stall_s=5.0)  # type: ignore[arg-type]
        except ConnectionResetError:
            pass
        finally:
            store.release(fd)
        await asyncio.get_running_loop().shutdown_default_executor()  # the read-ahead has finished
        gc.collect()

    asyncio.run(serve())
    assert reported == []


def test_a_large_frame_reaches_the_reader_whole_without_a_second_copy_in_the_transport():
    """write_frame hands a big frame to the transport a slice at a time: asyncio (3.11) copied the
    part the socket did not take into its buffer, a second 126 MB for a 124M params answer."""
    import asyncio
    import socket

    from p2pfm.daemon.net import WRITE_SLICE, read_frame, write_frame

    data = bytes(range(256)) * ((8 << 20) // 256)  # 8 MiB

    async def exchange() -> tuple[bytes, int]:
        left, right = socket.socketpair()
        reader, reader_side = await asyncio.open_connection(sock=left)  # both ends kept: a
        writer_side, writer = await asyncio.open_connection(sock=right)  # collected one closes
        buffered = [0]

        async def watch() -> None:  # what the transport holds while the reader is slow
            while True:
                buffered[0] = max(buffered[0], writer.transport.get_write_buffer_size())
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        sending = asyncio.create_task(write_frame(writer, data))
        received = await read_frame(reader, len(data))
        await sending
        watcher.cancel()
        writer.close()
        reader_side.close()
        assert writer_side is not None
        return received, buffered[0]

    received, buffered = asyncio.run(exchange())
    assert received == data
    assert buffered <= WRITE_SLICE + (1 << 16), buffered
