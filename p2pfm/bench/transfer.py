"""State download throughput: our libp2p state stream against a plain TCP copy of the same bytes.

:func:`measure_download` builds a state of ``total_bytes`` from random arrays (params plus two
AdamW-moment-sized arrays, as ``pack_state`` lays out a 124M model's ~1.5 GB), serves it from a
donor's snapshot file with the daemon's own handler (``StreamHandlers.handle_state``) over a real
libp2p stream between two ``p2pd`` daemons on loopback, and downloads it with the daemon's own
client (``StreamClient.download_state``: signed manifest, every chunk hash-checked and written to
the partial file, whole-state hash and container checks on a memory map), twice: with the chunks
on the libp2p stream, and on the direct lane the manifest offers (sealed TCP, ``p2pfm.core.lane``). In the same run it
copies the same file over a loopback TCP socket with asyncio (no framing, no hashing, bytes
discarded): the raw rate the state stream is measured against; and over one bare libp2p stream
through the same daemons (read and discarded): the transport's own ceiling.

Only the parameter-count check of ``check_state`` is relaxed (the joiner's model is a tiny one;
the state's ``params`` are checked against their own size), so no 124M model is built. The
result also has the joiner's peak *anonymous* memory growth during the download (heap, not the
page cache of the files), which bounded-memory transfer keeps to a few chunks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.core.announce import Announcement
from p2pfm.core.envelope import EnvelopeLimits
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import PeerProtocol, PeerSetup
from p2pfm.core.tensorfile import Buffer, LazyArray
from p2pfm.core.transfer import Manifest, check_state_buffer, write_state
from p2pfm.daemon.config import NetConfig, PeerConfig

RUN = "bench-transfer"


class _AnyModelSize(PeerProtocol):
    """A joiner whose model size is the downloaded state's: spares building a 124M model."""

    def open_state_buffer(self, manifest: Manifest, blob: Buffer, chunks_checked: bool = False):  # type: ignore[override]
        from p2pfm.core.tensorfile import unpack_arrays

        numel = unpack_arrays(blob, max_bytes=self.setup.max_state_bytes, copy=False)[0]["params"].size
        return check_state_buffer(
            manifest, blob, numel=numel, max_state_bytes=self.setup.max_state_bytes, copy=False,
            chunks_checked=chunks_checked,
        )  # fmt: skip


def _anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class _PeakAnon:
    """Samples RssAnon every 50 ms in a thread: the heap's peak over a block."""

    def __enter__(self) -> _PeakAnon:
        self.base = self.peak = _anon_kib()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, _anon_kib())

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, _anon_kib())

    @property
    def growth_bytes(self) -> int:
        return (self.peak - self.base) * 1024


def _runtime(
    work_dir: Path,
    net: NetConfig,
    protocol_class: type[PeerProtocol] = PeerProtocol,
    *,
    open_swarm: bool = False,
):
    """A peer runtime with a tiny model whose network is a bare ``hivemind.P2P`` (set later).

    ``open_swarm``: the config allows listening beyond loopback with no authority (the shaped
    benchmark's hosts, :mod:`p2pfm.bench.transfer_node`); nothing else changes."""
    import torch

    from p2pfm.daemon.config import AdmissionConfig
    from p2pfm.daemon.metrics import MetricsLog
    from p2pfm.daemon.net import PeerNetwork
    from p2pfm.daemon.runtime import PeerRuntime
    from p2pfm.daemon.trainer import ModelAdapter

    config = PeerConfig(
        run_id=RUN, work_dir=work_dir, key=work_dir / "peer.key", net=net,
        admission=AdmissionConfig(open=open_swarm),
    )  # fmt: skip
    model = torch.nn.Linear(2, 2)
    trainer = ModelAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1))
    identity = Identity.generate()
    setup = PeerSetup(
        identity=identity, run_id=RUN, gossip=config.gossip, limits=EnvelopeLimits(),
        max_state_bytes=net.max_state_bytes,
    )  # fmt: skip
    return PeerRuntime(
        config=config, protocol=protocol_class(setup, trainer.flat()), trainer=trainer,
        net=PeerNetwork(net, identity, RUN), metrics=MetricsLog(work_dir), shard_index=0,
        rng=np.random.default_rng(0),
    )  # fmt: skip


def _write_big_snapshot(rt, total_bytes: int, chunk_bytes: int, seed: int) -> None:
    """The donor's snapshot: params and two moments of total_bytes / 12 floats each, streamed."""
    numel = max(1, total_bytes // 12)
    rng = np.random.default_rng(seed)

    def random_floats() -> np.ndarray:
        return rng.random(numel, dtype=np.float32)

    params = random_floats()
    moments = {
        f"opt.0.{name}": LazyArray(np.dtype(np.float32), (numel,), random_floats)
        for name in ("exp_avg", "exp_avg_sq")
    }
    rt.snapshot = rt.snapshots.write(lambda write: write_state(write, params, 0, moments, chunk_bytes), 0)


# The figures' names: the median seconds of run ``runs_s[key]`` go under ``{stem}_s`` and
# ``{stem}_MBps``, and its share of the TCP copy under ``{ratio}_vs_tcp``.
FIGURE_NAMES = {
    "stream": ("libp2p_stream", "stream"),  # manifest and chunks, each verified and written
    "download": ("libp2p_download", "download"),  # request to checked arrays
    "libp2p_raw": ("libp2p_raw", "libp2p_raw"),  # the transport alone: our ceiling
    "lane": ("lane", "lane"),  # the same on the direct lane (sealed TCP, p2pfm.core.lane)
    "lane_download": ("lane_download", "lane_download"),
}


def rate_figures(size: int, runs: dict[str, list[float]]) -> dict[str, float]:
    """Medians (to the microsecond: ratios of ms-rounded times of a small transfer were off by 2 %),
    MB/s and ratios to the TCP copy (``runs["tcp"]``) of every run of ``runs`` that
    :data:`FIGURE_NAMES` names."""
    tcp_s = float(np.median(runs["tcp"]))
    figures = {"tcp_copy_s": round(tcp_s, 6), "tcp_copy_MBps": round(size / tcp_s / 1e6, 1)}
    for key, (stem, ratio) in FIGURE_NAMES.items():
        if key in runs:
            seconds = float(np.median(runs[key]))
            figures[f"{stem}_s"] = round(seconds, 6)
            figures[f"{stem}_MBps"] = round(size / seconds / 1e6, 1)
            figures[f"{ratio}_vs_tcp"] = round(tcp_s / seconds, 3)
    return figures


def donor_claim(
    peer_id: str, public_key: bytes, libp2p_id: str, maddrs: list[str], model_hash: bytes, state_bytes: int
) -> Announcement:
    """What a joiner would have read in the DHT of the benchmark's donor (round 0, announced now)."""
    return Announcement(
        peer_id=peer_id, public_key=public_key, libp2p_id=libp2p_id, maddrs=tuple(maddrs), round=0,
        model_hash=model_hash, device_class="cpu", power_w=0.0, state_bytes=state_bytes, seq=1,
        timestamp=time.time(),
    )  # fmt: skip


async def _send_pieces(
    writer: asyncio.StreamWriter, size: int, piece: Callable[[int, int], bytes], piece_bytes: int
) -> None:
    """Write ``size`` bytes, ``piece(offset, length)`` at a time, then close the writer."""
    try:
        for offset in range(0, size, piece_bytes):
            writer.write(piece(offset, min(piece_bytes, size - offset)))
            await writer.drain()
    finally:
        writer.close()


async def _read_all(reader: asyncio.StreamReader, size: int, piece_bytes: int, what: str) -> None:
    """Read and discard ``size`` bytes; a short stream is an error naming ``what``."""
    received = 0
    while received < size:
        data = await reader.read(piece_bytes)
        if not data:
            break
        received += len(data)
    if received != size:
        raise RuntimeError(f"{what} read {received} of {size} bytes")


def file_pieces(path: Path) -> tuple[int, Callable[[int, int], bytes], Callable[[], None]]:
    """``path``'s size, a ``piece(offset, length)`` reader over it, and the close of its descriptor."""
    fd = os.open(path, os.O_RDONLY)
    return path.stat().st_size, lambda offset, length: os.pread(fd, length, offset), lambda: os.close(fd)


async def tcp_copy(size: int, piece: Callable[[int, int], bytes], piece_bytes: int = 4 << 20) -> float:
    """Seconds to send ``size`` bytes (``piece(offset, length)``) over a loopback TCP socket and read them
    all on the other side: the plain-TCP baseline of ``measure_download`` and ``p2pfm bench scale``."""
    done = asyncio.Event()

    async def send(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _send_pieces(writer, size, piece, piece_bytes)
        finally:
            done.set()

    server = await asyncio.start_server(send, "127.0.0.1", 0, family=socket.AF_INET)
    port = server.sockets[0].getsockname()[1]
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _read_all(reader, size, piece_bytes, "TCP copy")
        seconds = time.perf_counter() - started
    finally:
        writer.close()
        await done.wait()
        server.close()
        await server.wait_closed()
    return seconds


async def _tcp_copy(path: Path, piece_bytes: int = 4 << 20) -> float:
    """Seconds to send ``path`` over a loopback TCP socket and read it all on the other side."""
    size, piece, close = file_pieces(path)
    try:
        return await tcp_copy(size, piece, piece_bytes)
    finally:
        close()


async def _libp2p_copy(donor_p2p, joiner_p2p, path: Path, piece_bytes: int) -> float:
    """Seconds to send ``path`` over one libp2p stream, read and discarded: the transport's ceiling
    (no framing, hashing or writing), through the same two ``p2pd`` daemons."""
    size, piece, close = file_pieces(path)

    async def send(_info, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _send_pieces(writer, size, piece, piece_bytes)

    await donor_p2p.add_binary_stream_handler("/p2pfm-bench/raw/1", send)
    try:
        started = time.perf_counter()
        _, reader, writer = await joiner_p2p.call_binary_stream_handler(
            donor_p2p.peer_id, "/p2pfm-bench/raw/1"
        )
        try:
            await _read_all(reader, size, piece_bytes, "libp2p copy")
            return time.perf_counter() - started
        finally:
            writer.close()
    finally:
        await donor_p2p.remove_binary_stream_handler("/p2pfm-bench/raw/1")
        close()


async def _measure(total_bytes: int, chunk_bytes: int, work: Path, seed: int, repeats: int) -> dict[str, Any]:
    from hivemind.p2p import P2P

    from p2pfm.daemon.handlers import StreamClient, StreamHandlers

    net = NetConfig(state_chunk_bytes=chunk_bytes, max_state_bytes=max(4096, total_bytes + (1 << 20)))
    donor = _runtime(work / "donor", net)
    joiner = _runtime(work / "joiner", net, _AnyModelSize)  # takes the direct lane (p2pfm.core.lane)
    # the same joiner's protocol with no lane: the chunks over the libp2p stream
    stream_joiner = _runtime(
        work / "joiner-stream", dataclasses.replace(net, state_lane_port=-1), _AnyModelSize
    )
    started = time.perf_counter()
    _write_big_snapshot(donor, total_bytes, chunk_bytes, seed)
    write_seconds = time.perf_counter() - started
    assert donor.snapshot.path is not None

    donor_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    joiner_p2p = None
    handlers = StreamHandlers(donor)
    try:
        donor.net.p2p = donor_p2p
        await handlers.install()
        assert donor.lanes is not None, "the donor's state lane did not start"
        maddrs = [str(m) for m in await donor_p2p.get_visible_maddrs()]
        joiner_p2p = await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        joiner.net.p2p = stream_joiner.net.p2p = joiner_p2p
        claim = donor_claim(
            donor.peer_id, donor.protocol.identity.public_key_bytes, donor_p2p.peer_id.to_base58(),
            maddrs, donor.snapshot.hash, donor.snapshot.size,
        )  # fmt: skip
        lane_client, stream_client = StreamClient(joiner), StreamClient(stream_joiner)
        runs: dict[str, list[float]] = {
            key: [] for key in ("tcp", "libp2p_raw", "stream", "download", "lane", "lane_download")
        }
        peak = 0

        async def download(client: StreamClient, via: str, chunks_key: str, whole_key: str) -> None:
            nonlocal peak
            with _PeakAnon() as memory:
                started = time.perf_counter()
                arrays, _ = await client.download_state(claim)
                runs[whole_key].append(time.perf_counter() - started)
            progress = client.last_download
            assert progress is not None and progress.fetched == donor.snapshot.size and progress.reused == 0
            assert progress.via == via, f"the download came by {progress.via}, not {via}"
            runs[chunks_key].append(progress.seconds)
            peak = max(peak, memory.growth_bytes)
            del arrays
            client.partial().discard()

        for _ in range(repeats):  # alternated: the machine's load drifts, all see the same drift
            runs["tcp"].append(await _tcp_copy(donor.snapshot.path, chunk_bytes))
            runs["libp2p_raw"].append(
                await _libp2p_copy(donor_p2p, joiner_p2p, donor.snapshot.path, chunk_bytes)
            )
            await download(stream_client, "stream", "stream", "download")
            await download(lane_client, "lane", "lane", "lane_download")
    finally:
        await handlers.close()
        if joiner_p2p is not None:
            await joiner_p2p.shutdown()
        await donor_p2p.shutdown()
    size = donor.snapshot.size
    return {
        "total_bytes": size,
        "chunk_bytes": chunk_bytes,
        "chunks": len(donor.snapshot.layout.chunk_hashes) if donor.snapshot.layout else 0,
        "repeats": repeats,
        "snapshot_write_s": round(write_seconds, 6),
        **rate_figures(size, runs),
        "joiner_peak_heap_growth_bytes": peak,  # donor and joiner share this process here
        "runs_s": runs,
    }


def measure_download(
    total_bytes: int,
    *,
    chunk_bytes: int = 4 << 20,
    work_dir: Path | None = None,
    seed: int = 0,
    repeats: int = 3,
) -> dict[str, Any]:
    """Download a ``total_bytes`` state over libp2p on loopback and copy it over plain TCP; the figures.

    Needs about ``2 * total_bytes`` of free disk in ``work_dir`` (a temporary folder by default:
    the donor's snapshot and the joiner's partial file) and ~``total_bytes / 3`` of memory (the
    random params while the snapshot is written). Starts two ``p2pd`` daemons; all on 127.0.0.1.
    """
    own = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="p2pfm-bench-transfer-")) if work_dir is None else work_dir
    try:
        return asyncio.run(_measure(total_bytes, chunk_bytes, work, seed, max(1, repeats)))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
