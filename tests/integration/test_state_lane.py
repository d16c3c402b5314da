"""A state download's chunks on the direct lane (``p2pfm.core.lane``), with the manifest over a real
libp2p stream between two ``p2pd`` daemons: the daemon's own handler and client, in one process
(the path between them is what the test attacks)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from p2pfm.bench.transfer import _AnyModelSize, _runtime, _write_big_snapshot, donor_claim
from p2pfm.core.lane import LaneCipher
from p2pfm.daemon.config import NetConfig
from p2pfm.daemon.handlers import StreamClient, StreamHandlers

pytestmark = pytest.mark.integration

CHUNK = 64 << 10


async def _download(tmp_path: Path, joiner_net: NetConfig | None = None):
    """Serve a ~2 MB state from a donor runtime; download it with a joiner runtime; return the
    joiner's figures, both runtimes and the arrays' params."""
    from hivemind.p2p import P2P

    net = NetConfig(state_chunk_bytes=CHUNK, max_state_bytes=8 << 20, state_stall_s=20.0)
    donor = _runtime(tmp_path / "donor", net)
    joiner = _runtime(tmp_path / "joiner", joiner_net or net, _AnyModelSize)
    _write_big_snapshot(donor, 2_000_000, CHUNK, seed=3)
    donor_p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    joiner_p2p = None
    handlers = StreamHandlers(donor)
    try:
        donor.net.p2p = donor_p2p
        await handlers.install()
        maddrs = [str(m) for m in await donor_p2p.get_visible_maddrs()]
        joiner_p2p = await P2P.create(initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        joiner.net.p2p = joiner_p2p
        claim = donor_claim(
            donor.peer_id, donor.protocol.identity.public_key_bytes, donor_p2p.peer_id.to_base58(),
            maddrs, donor.snapshot.hash, donor.snapshot.size,
        )  # fmt: skip
        client = StreamClient(joiner)
        arrays, _ = await client.download_state(claim)
        return client.last_download, donor, joiner, np.array(arrays["params"])
    finally:
        await handlers.close()
        if joiner_p2p is not None:
            await joiner_p2p.shutdown()
        await donor_p2p.shutdown()


def test_the_chunks_take_the_lane_and_the_state_is_the_donors(tmp_path):
    progress, donor, joiner, params = asyncio.run(_download(tmp_path))
    assert progress is not None and progress.via == "lane"
    assert progress.fetched == donor.snapshot.size and progress.reused == 0
    assert (
        donor.counters["state_lane_uploads"] == 1
        and donor.counters["state_bytes_served"] == donor.snapshot.size
    )
    assert params.size == (2_000_000 // 12)
    assert joiner.counters["state_lane_failures"] == 0


def test_a_joiner_with_the_lane_off_takes_the_chunks_over_the_stream(tmp_path):
    off = NetConfig(state_chunk_bytes=CHUNK, max_state_bytes=8 << 20, state_lane_port=-1)
    progress, donor, _, _ = asyncio.run(_download(tmp_path, off))
    assert progress is not None and progress.via == "stream" and progress.fetched == donor.snapshot.size
    assert donor.counters["state_lane_uploads"] == 0


def test_a_seal_broken_on_the_path_falls_back_to_the_stream_keeping_the_verified_chunks(
    tmp_path, monkeypatch
):
    """Chunk 10's seal fails (as if a byte changed on the path): the joiner keeps chunks 0-9, asks
    the same donor for the rest over the stream, and does not hold the path against the donor."""
    real_seal = LaneCipher.seal_chunk

    def broken_on_the_path(self, index: int, piece: bytes) -> bytes:
        sealed = bytearray(real_seal(self, index, piece))
        if index == 10:
            sealed[5] ^= 1
        return bytes(sealed)

    monkeypatch.setattr(LaneCipher, "seal_chunk", broken_on_the_path)
    progress, donor, joiner, params = asyncio.run(_download(tmp_path))
    assert progress is not None and progress.via == "lane+stream", progress
    assert progress.fetched == donor.snapshot.size  # every byte once: 10 chunks on the lane, the rest after
    assert joiner.counters["state_lane_seal_broken"] == 1 and joiner.counters["state_lane_failures"] == 1
    assert progress.attempts == 2
    assert (
        joiner.protocol.scores.score(donor.peer_id, time.time()) == 0
    )  # maybe the path's fault: not held against the donor


def test_a_lane_nobody_reaches_costs_a_connect_then_the_stream(tmp_path, monkeypatch):
    """The donor announces only an address where nothing listens for its lane (a firewall)."""
    import p2pfm.daemon.handlers as handlers

    monkeypatch.setattr(handlers, "lane_hosts", lambda _maddrs: ["127.0.0.2"])  # nothing listens there
    progress, donor, joiner, _ = asyncio.run(_download(tmp_path))
    assert progress is not None and progress.via == "stream" and progress.fetched == donor.snapshot.size
    assert joiner.counters["state_lane_unreachable"] == 1 and donor.counters["state_lane_uploads"] == 0
