"""One end of the shaped-link transfer benchmark (:mod:`p2pfm.bench.transfer_shaped`), run in
its own network namespace by the orchestrator::

    python -m p2pfm.bench.transfer_node donor  --address A --bytes N --work DIR --ready FILE
    python -m p2pfm.bench.transfer_node joiner --address B --ready FILE --work DIR --out FILE

``donor`` writes a snapshot of ``--bytes`` (as :func:`p2pfm.bench.transfer.measure_download`
does), serves it with the daemon's own handlers (libp2p stream and direct lane, both on its
address) and, as the baseline, a plain TCP server that sends the snapshot file's bytes to
whoever connects; then writes the ready file (JSON: addresses, ids, hash, size, TCP port) and
serves until SIGTERM/SIGINT.

``joiner`` reads the ready file and, ``--repeats`` times, alternates: a TCP copy from the donor's
TCP port (read and discarded), the daemon's download with the chunks on the libp2p stream, and
the same download on the direct lane; writes the medians and every run as JSON to ``--out``.
Both downloads are the daemon's own (signed manifest, every chunk hash-checked and written,
whole-state checks); the partial file is discarded between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.bench.transfer import (
    _AnyModelSize,
    _PeakAnon,
    _read_all,
    _runtime,
    _send_pieces,
    _write_big_snapshot,
    donor_claim,
    file_pieces,
    rate_figures,
)
from p2pfm.daemon.config import NetConfig

PIECE_BYTES = 4 << 20  # TCP copy's read/write size: the state's chunk, as in measure_download


def _net(address: str, total_bytes: int, chunk_bytes: int) -> NetConfig:
    """Both ends' network config: libp2p and the lane on ``address`` (the namespace's own)."""
    return NetConfig(
        listen=(f"/ip4/{address}/tcp/0",), state_chunk_bytes=chunk_bytes,
        max_state_bytes=max(4096, total_bytes + (1 << 20)),
    )  # fmt: skip


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` whole or not at all (the orchestrator polls for the file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


async def donor(args: argparse.Namespace) -> None:
    from hivemind.p2p import P2P

    from p2pfm.daemon.handlers import StreamHandlers

    rt = _runtime(args.work, _net(args.address, args.bytes, args.chunk_bytes), open_swarm=True)
    started = time.perf_counter()
    _write_big_snapshot(rt, args.bytes, args.chunk_bytes, args.seed)
    write_seconds = time.perf_counter() - started
    assert rt.snapshot.path is not None
    size, piece, close_file = file_pieces(rt.snapshot.path)

    async def send_file(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _send_pieces(writer, size, piece, PIECE_BYTES)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    p2p = await P2P.create(host_maddrs=[f"/ip4/{args.address}/tcp/0"])
    handlers = StreamHandlers(rt)
    tcp_server = None
    try:
        rt.net.p2p = p2p
        await handlers.install()
        if rt.lanes is None:
            raise RuntimeError(f"the donor's state lane did not start on {args.address}")
        tcp_server = await asyncio.start_server(send_file, args.address, 0)
        _write_json(
            args.ready,
            {
                "maddrs": [str(m) for m in await p2p.get_visible_maddrs()],
                "peer_id": rt.peer_id,
                "public_key": rt.protocol.identity.public_key_bytes.hex(),
                "libp2p_id": p2p.peer_id.to_base58(),
                "model_hash": rt.snapshot.hash.hex(),
                "state_bytes": rt.snapshot.size,
                "chunks": len(rt.snapshot.layout.chunk_hashes) if rt.snapshot.layout else 0,
                "tcp_host": args.address,
                "tcp_port": tcp_server.sockets[0].getsockname()[1],
                "lane_port": rt.lanes.port,
                "snapshot_write_s": round(write_seconds, 6),
            },
        )
        print(f"donor ready on {args.address}: {rt.snapshot.size} bytes", flush=True)
        await stop.wait()
    finally:
        if tcp_server is not None:
            tcp_server.close()
        await handlers.close()
        await p2p.shutdown()
        close_file()


async def _tcp_copy_from(host: str, port: int, size: int) -> float:
    """Seconds from connecting to the donor's TCP server to having read all ``size`` bytes."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _read_all(reader, size, PIECE_BYTES, "TCP copy")
        return time.perf_counter() - started
    finally:
        writer.close()


async def joiner(args: argparse.Namespace) -> None:
    from hivemind.p2p import P2P

    from p2pfm.daemon.handlers import StreamClient

    ready = json.loads(args.ready.read_text())
    size = int(ready["state_bytes"])
    net = _net(args.address, size, args.chunk_bytes)
    lane_rt = _runtime(args.work / "lane", net, _AnyModelSize, open_swarm=True)
    stream_rt = _runtime(
        args.work / "stream", dataclasses.replace(net, state_lane_port=-1), _AnyModelSize, open_swarm=True
    )
    claim = donor_claim(
        ready["peer_id"], bytes.fromhex(ready["public_key"]), ready["libp2p_id"], ready["maddrs"],
        bytes.fromhex(ready["model_hash"]), size,
    )  # fmt: skip
    p2p = await P2P.create(initial_peers=ready["maddrs"], host_maddrs=[f"/ip4/{args.address}/tcp/0"])
    runs: dict[str, list[float]] = {key: [] for key in ("tcp", "stream", "download", "lane", "lane_download")}
    cpu: dict[str, list[float]] = {key: [] for key in ("tcp", "stream", "lane")}
    peak = 0

    async def download(client: StreamClient, via: str, chunks_key: str, whole_key: str) -> None:
        nonlocal peak
        with _PeakAnon() as memory:
            cpu_started, started = time.process_time(), time.perf_counter()
            arrays, _ = await client.download_state(claim)
            runs[whole_key].append(time.perf_counter() - started)
            cpu[chunks_key].append(time.process_time() - cpu_started)
        progress = client.last_download
        assert progress is not None and progress.fetched == size and progress.reused == 0
        if progress.via != via:
            raise RuntimeError(f"the download came by {progress.via}, not {via}")
        runs[chunks_key].append(progress.seconds)
        peak = max(peak, memory.growth_bytes)
        del arrays
        client.partial().discard()

    try:
        lane_rt.net.p2p = stream_rt.net.p2p = p2p
        lane_client, stream_client = StreamClient(lane_rt), StreamClient(stream_rt)
        for repeat in range(args.repeats):  # alternated: the machine's load drifts, all see the same drift
            cpu_started = time.process_time()
            runs["tcp"].append(await _tcp_copy_from(ready["tcp_host"], ready["tcp_port"], size))
            cpu["tcp"].append(time.process_time() - cpu_started)
            await download(stream_client, "stream", "stream", "download")
            await download(lane_client, "lane", "lane", "lane_download")
            print(
                f"repeat {repeat + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items())
            )
    finally:
        await p2p.shutdown()
    _write_json(args.out, _result(ready, runs, cpu, peak, args.repeats))


def _result(
    ready: dict[str, Any], runs: dict[str, list[float]], cpu: dict[str, list[float]], peak: int, repeats: int
) -> dict[str, Any]:
    """Medians, rates and ratios to the TCP copy (the same key names as ``measure_download``'s, where
    they mean the same)."""
    size = int(ready["state_bytes"])
    return {
        "total_bytes": size,
        "chunks": ready["chunks"],
        "repeats": repeats,
        "snapshot_write_s": ready["snapshot_write_s"],
        # medians; tcp: connect to last byte read (the rest as in measure_download)
        **rate_figures(size, runs),
        # the joiner's Python process only (its p2pd, and the donor, are other processes)
        "joiner_cpu_s": {key: round(float(np.median(v)), 3) for key, v in cpu.items()},
        "joiner_peak_heap_growth_bytes": peak,
        "runs_s": {key: [round(v, 6) for v in values] for key, values in runs.items()},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m p2pfm.bench.transfer_node", description=__doc__.split("\n\n")[0]
    )
    roles = parser.add_subparsers(dest="role", required=True)
    for role in ("donor", "joiner"):
        sub = roles.add_parser(role)
        sub.add_argument("--address", required=True, help="this host's IPv4 address (libp2p, lane, TCP)")
        sub.add_argument("--ready", type=Path, required=True, help="the donor's ready file (JSON)")
        sub.add_argument(
            "--work", type=Path, required=True, help="this end's folder (snapshot, partial files)"
        )
        sub.add_argument("--chunk-bytes", type=int, default=4 << 20, help="state chunk (default 4 MiB)")
    donor_parser, joiner_parser = roles.choices["donor"], roles.choices["joiner"]
    donor_parser.add_argument("--bytes", type=int, required=True, help="state size to serve")
    donor_parser.add_argument("--seed", type=int, default=0, help="seed of the random state")
    joiner_parser.add_argument("--repeats", type=int, default=2, help="alternated rounds of the three copies")
    joiner_parser.add_argument("--out", type=Path, required=True, help="write the result JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(donor(args) if args.role == "donor" else joiner(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
