"""State transfer at scale: want ranges, content-addressed resume, the file-backed snapshot.

Pure rules (``p2pfm.core.transfer``), the joiner's partial file
(``p2pfm.daemon.statestream.PartialState``), the donor's handler over in-memory streams, and a
whole download between two in-process peers over real sockets whose first donor's stream is cut
mid-transfer: the second donor (same state) is asked only for the chunks still missing.
The same over real libp2p peers: ``tests/integration/test_state_resume.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from p2pfm.core.announce import Announcement
from p2pfm.core.envelope import PROTOCOL_VERSION, EnvelopeLimits, pack_body, pack_wire, signing_bytes
from p2pfm.core.errors import BadIndex, HashMismatch, SchemaViolation
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import PeerProtocol, PeerSetup
from p2pfm.core.transfer import (
    MAX_CHUNK_BYTES,
    MAX_WANT_RANGES,
    ChunkHasher,
    Donor,
    Manifest,
    check_state,
    check_state_buffer,
    manifest_payload,
    pack_state,
    reusable,
    state_hash,
    state_root,
    want_ranges,
    wanted_chunks,
    write_state,
)
from p2pfm.daemon.config import NetConfig, PeerConfig
from p2pfm.daemon.handlers import StreamClient, StreamHandlers
from p2pfm.daemon.metrics import MetricsLog
from p2pfm.daemon.net import FRAME_HEADER, FrameTooLarge, PeerNetwork
from p2pfm.daemon.runtime import PeerRuntime
from p2pfm.daemon.statestream import PartialState, Progress, receive_chunks, widen_reader
from p2pfm.daemon.trainer import ModelAdapter

RUN = "transfer-test"
CHUNK = 1024


# --- pure rules ------------------------------------------------------------------------------
def layout_of(data: bytes, chunk: int = CHUNK):
    hasher = ChunkHasher(chunk)
    hasher.update(data)
    return hasher.layout()


def test_write_state_streams_the_same_bytes_and_manifest_as_pack_state():
    rng = np.random.default_rng(1)
    params, moments = (
        rng.standard_normal(5000).astype(np.float32),
        rng.standard_normal(5000).astype(np.float32),
    )
    out = bytearray()
    layout = write_state(out.extend, params, 7, {"opt.0.exp_avg": moments}, CHUNK)
    packed = pack_state(params, 7, {"opt.0.exp_avg": moments})
    assert bytes(out) == packed
    payload, chunks = manifest_payload(packed, 7, CHUNK)
    assert (layout.model_hash, layout.total_bytes, list(layout.chunk_hashes)) == (
        payload["model_hash"], payload["total_bytes"], payload["chunk_hashes"],
    )  # fmt: skip
    assert [layout.chunk_range(i)[1] for i in range(len(chunks))] == [len(c) for c in chunks]


def test_check_state_buffer_applies_check_states_rules_without_copying():
    params = np.arange(300, dtype=np.float32)
    packed = pack_state(params, 3, {})
    layout = layout_of(packed, 256)
    manifest = Manifest(3, layout.model_hash, layout.total_bytes, 256, layout.chunk_hashes)
    buffer = bytearray(packed)
    arrays, round_ = check_state_buffer(manifest, buffer, numel=300, max_state_bytes=1 << 20, copy=False)
    assert round_ == 3 and np.array_equal(arrays["params"], params)
    buffer[-1] ^= 1  # a view: the array sees the buffer's bytes, no copy was made
    assert arrays["params"].base is not None
    with pytest.raises(HashMismatch):
        check_state_buffer(manifest, buffer, numel=300, max_state_bytes=1 << 20)
    pieces = [packed[i : i + 256] for i in range(0, len(packed), 256)]
    assert check_state(manifest, pieces, numel=300, max_state_bytes=1 << 20)[1] == 3


def test_wanted_chunks_serves_the_ranges_of_our_state_and_refuses_bad_ones():
    layout = layout_of(bytes(range(256)) * 40)  # 10 chunks
    assert wanted_chunks(None, layout) == list(range(10))
    ours = {"model_hash": layout.model_hash, "ranges": [[0, 2], [5, 6], [8, 10]]}
    assert wanted_chunks(ours, layout) == [0, 1, 5, 8, 9]
    assert wanted_chunks({**ours, "ranges": []}, layout) == []
    other = {"model_hash": bytes(32), "ranges": [[0, 1]]}
    assert wanted_chunks(other, layout) == list(range(10))  # a want about another state: everything
    for bad in ([[0, 11]], [[3, 3]], [[4, 2]], [[0, 5], [4, 6]], [[5, 6], [0, 1]], [[-1, 2]], [[1, 2, 3]]):
        with pytest.raises(BadIndex):
            wanted_chunks({**ours, "ranges": bad}, layout)


def forged_request(identity: Identity, want: dict, seq: int) -> bytes:
    """A state_request signed without seal's own schema check (a hostile peer's)."""
    body = pack_body({
        "v": PROTOCOL_VERSION, "kind": "state_request", "run": RUN, "sender": identity.public_key_bytes,
        "round": 0, "seq": seq, "ts": 1000.0, "payload": {"round": 0, "nonce": bytes(16), "want": want},
    })  # fmt: skip
    return pack_wire(body, identity.sign(signing_bytes("state_request", RUN, body)))


def test_a_state_request_with_too_many_ranges_or_a_bad_want_fails_its_schema():
    asker = PeerProtocol(
        PeerSetup(identity=Identity.generate(), run_id=RUN, gossip=PeerConfig().gossip),
        np.zeros(4, np.float32),
    )
    reader = PeerProtocol(
        PeerSetup(identity=Identity.generate(), run_id=RUN, gossip=PeerConfig().gossip),
        np.zeros(4, np.float32),
    )
    asker.seq = 100  # its own requests come after the forged ones
    many = [[2 * i, 2 * i + 1] for i in range(MAX_WANT_RANGES + 1)]
    for seq, want in enumerate((
        {"model_hash": bytes(32), "ranges": many},
        {"model_hash": b"short", "ranges": []},
        {"ranges": []},
        {"model_hash": bytes(32), "ranges": [[0, "9"]]},
    ), start=1):  # fmt: skip
        with pytest.raises(SchemaViolation):
            reader.open(forged_request(asker.identity, want, seq), 1000.0, stream="state")
    fits = {"model_hash": bytes(32), "ranges": many[:MAX_WANT_RANGES]}
    assert (
        reader.open(asker.state_request(bytes(16), 1000.0, fits), 1000.0, stream="state").payload["want"]
        == fits
    )


def test_want_ranges_coalesce_runs_and_close_the_smallest_gaps_to_fit_the_bound():
    assert want_ranges([]) == []
    assert want_ranges([0, 1, 2, 5, 7, 8]) == [[0, 3], [5, 6], [7, 9]]
    assert want_ranges([0, 2, 3, 9], max_ranges=2) == [[0, 4], [9, 10]]
    scattered = list(range(0, 4000, 2))
    ranges = want_ranges(scattered)
    assert len(ranges) <= MAX_WANT_RANGES
    covered = {i for start, stop in ranges for i in range(start, stop)}
    assert set(scattered) <= covered


def test_reusable_finds_held_chunks_at_any_index():
    hashes = [bytes([i]) * 32 for i in range(5)]
    assert reusable(hashes, {hashes[3]: 0, hashes[0]: 4, b"x" * 32: 1}) == [0, 3]


def test_a_manifest_whose_chunks_exceed_the_bound_is_refused_before_any_chunk():
    from p2pfm.core.errors import Oversize

    donor = PeerProtocol(
        PeerSetup(identity=Identity.generate(), run_id=RUN, gossip=PeerConfig().gossip),
        np.zeros(4, np.float32),
    )
    joiner = PeerProtocol(
        PeerSetup(
            identity=Identity.generate(), run_id=RUN, gossip=PeerConfig().gossip, max_state_bytes=1 << 30
        ),
        np.zeros(4, np.float32),
    )
    size = MAX_CHUNK_BYTES + 1
    payload = {"round": 0, "model_hash": bytes(32), "total_bytes": size, "chunk_size": size,
               "chunk_hashes": [bytes(32)]}  # fmt: skip
    message = donor.seal("state_manifest", payload, 1000.0)
    claim = Donor(donor.identity.public_key_bytes, 0, bytes(32))
    with pytest.raises(Oversize):
        joiner.open_manifest(message, claim, 1000.0)


# --- the joiner's partial file ------------------------------------------------------------------
def manifest_of(data: bytes, round_: int = 0, chunk: int = CHUNK) -> Manifest:
    layout = layout_of(data, chunk)
    return Manifest(round_, layout.model_hash, layout.total_bytes, chunk, layout.chunk_hashes)


def chunks_of(data: bytes, chunk: int = CHUNK) -> list[bytes]:
    return [data[i : i + chunk] for i in range(0, len(data), chunk)]


def test_partial_state_keeps_verified_chunks_by_content_at_any_index(tmp_path):
    rng = np.random.default_rng(2)
    blocks = [rng.bytes(CHUNK) for _ in range(6)]
    first = b"".join(blocks)
    partial = PartialState(tmp_path / "transfer")
    assert partial.take_manifest(manifest_of(first)) == 0
    for index in (0, 1, 4):
        partial.write_chunk(index, blocks[index])
    assert partial.missing() == [2, 3, 5] and partial.verified_bytes() == 3 * CHUNK
    assert partial.want_for(manifest_of(first).model_hash) == {
        "model_hash": manifest_of(first).model_hash, "ranges": [[2, 4], [5, 6]],
    }  # fmt: skip
    # Another state sharing two of those chunks, at other indexes (and one new chunk).
    second = b"".join([rng.bytes(CHUNK), blocks[4], blocks[0], blocks[3]])
    assert partial.take_manifest(manifest_of(second)) == 2 * CHUNK
    assert sorted(partial.verified) == [1, 2] and partial.missing() == [0, 3]
    data = partial.path.read_bytes()
    assert data[CHUNK : 3 * CHUNK] == blocks[4] + blocks[0]


def test_partial_state_refuses_a_chunk_that_is_not_the_manifests_and_writes_nothing(tmp_path):
    data = np.random.default_rng(3).bytes(3 * CHUNK)
    partial = PartialState(tmp_path / "transfer")
    partial.take_manifest(manifest_of(data))
    with pytest.raises(HashMismatch):
        partial.write_chunk(1, data[:CHUNK])  # chunk 0's bytes offered as chunk 1
    assert partial.verified == {} and partial.path.read_bytes() == bytes(3 * CHUNK)


def test_a_lying_manifest_reusing_our_hash_cannot_slip_in_unverified_chunks(tmp_path):
    """A manifest claiming the hash of the state we hold part of, with other chunk hashes: only
    chunks whose bytes hash to its entries are kept, and the whole must still hash to its
    model_hash's root, so the forged file is refused (and discarded), never unpacked."""
    state = np.random.default_rng(4).bytes(3 * CHUNK)
    honest = manifest_of(state)
    partial = PartialState(tmp_path / "transfer")
    partial.take_manifest(honest)
    for index, piece in enumerate(chunks_of(state)[:2]):
        partial.write_chunk(index, piece)
    forged = Manifest(0, honest.model_hash, honest.total_bytes, CHUNK, (honest.chunk_hashes[1],) * 3)
    assert partial.take_manifest(forged) == 3 * CHUNK  # chunk 1's bytes, re-checked, at every index
    assert partial.missing() == []
    unpacked = []
    with pytest.raises(HashMismatch):
        partial.open_state(
            lambda m, b, checked: unpacked.append(
                check_state_buffer(m, b, numel=1, max_state_bytes=1 << 20, chunks_checked=checked)
            )
        )
    assert unpacked == [] and not partial.path.exists() and partial.manifest is None


def test_the_state_hash_is_the_root_of_its_chunk_hashes_and_nobody_hashes_the_whole(tmp_path):
    """``model_hash`` is ``state_root`` of the chunk hashes (with the sizes): the joiner's file,
    whose chunks were all checked on arrival in any order, is opened with ``chunks_checked``."""
    rng = np.random.default_rng(5)
    blocks = [rng.bytes(CHUNK) for _ in range(5)] + [rng.bytes(CHUNK // 3)]
    state = b"".join(blocks)
    manifest = manifest_of(state)
    hashes = [hashlib.sha256(block).digest() for block in blocks]
    assert manifest.chunk_hashes == tuple(hashes)
    assert (
        manifest.model_hash
        == hashlib.sha256(
            b"p2pfm/state-root/v1\x00"
            + len(state).to_bytes(8, "big")
            + CHUNK.to_bytes(8, "big")
            + b"".join(hashes)
        ).digest()
        == state_root(len(state), CHUNK, hashes)
        == state_hash(state, CHUNK)
    )
    assert state_hash(state, CHUNK * 2) != manifest.model_hash  # the chunking is part of it
    assert manifest.model_hash != hashlib.sha256(state).digest()
    partial = PartialState(tmp_path / "transfer")
    partial.take_manifest(manifest)
    for index in (0, 1, 4, 3, 5, 2):
        partial.write_chunk(index, blocks[index])
    seen = []
    partial.open_state(lambda m, b, checked: seen.append((m.model_hash, bytes(b), checked)))
    assert seen == [(manifest.model_hash, state, True)]


def test_a_root_that_is_not_the_manifests_is_refused_even_if_every_chunk_matches():
    """``chunks_checked`` spares the pass over the buffer, never the rules: the root must be the
    manifest's, and without it every chunk is hashed again."""
    state = pack_state(np.ones(3, np.float32), 0, {})
    manifest = manifest_of(state, chunk=64)
    assert check_state_buffer(manifest, state, numel=3, max_state_bytes=1 << 20, chunks_checked=True)
    assert check_state_buffer(manifest, state, numel=3, max_state_bytes=1 << 20)
    lying = dataclasses.replace(manifest, model_hash=bytes(32))
    for checked in (True, False):
        with pytest.raises(HashMismatch):
            check_state_buffer(lying, state, numel=3, max_state_bytes=1 << 20, chunks_checked=checked)
    changed = bytearray(state)
    changed[-1] ^= 1  # inside the last chunk: caught by its hash when the caller did not check
    with pytest.raises(HashMismatch, match="chunk"):
        check_state_buffer(manifest, bytes(changed), numel=3, max_state_bytes=1 << 20)


def test_the_joiners_reader_buffers_up_to_two_chunks_and_no_more():
    async def limits() -> list[int]:
        reader = asyncio.StreamReader()  # the default limit: 64 KiB
        widen_reader(reader, 4 << 20)
        seen = [reader._limit]  # paused beyond 2 x limit: two chunks
        widen_reader(reader, 1024)  # never narrowed
        seen.append(reader._limit)
        widen_reader(reader, 64 << 20)  # a donor's huge chunks get no more read-ahead
        return [*seen, reader._limit]

    assert asyncio.run(limits()) == [4 << 20, 4 << 20, 4 << 20]


# --- the donor's handler and a whole download, in process ----------------------------------------
def peer_runtime(tmp_path: Path, name: str, seed: int, stall_s: float = 10.0) -> PeerRuntime:
    """A peer's runtime (not online) with a 4,160-parameter model: 17 chunks of 1 KiB."""
    net = NetConfig(state_chunk_bytes=CHUNK, state_stall_s=stall_s)
    config = PeerConfig(run_id=RUN, work_dir=tmp_path / name, key=tmp_path / name / "peer.key", net=net)
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 64)
    trainer = ModelAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1))
    identity = Identity.generate()
    setup = PeerSetup(identity=identity, run_id=RUN, gossip=config.gossip, limits=EnvelopeLimits())
    rt = PeerRuntime(
        config=config, protocol=PeerProtocol(setup, trainer.flat()), trainer=trainer,
        net=PeerNetwork(config.net, identity, RUN), metrics=MetricsLog(config.work_dir), shard_index=0,
        rng=np.random.default_rng(0),
    )  # fmt: skip
    rt.refresh_snapshot()
    return rt


def announcement(rt: PeerRuntime, libp2p_id: str) -> Announcement:
    return Announcement(
        peer_id=rt.peer_id, public_key=rt.protocol.identity.public_key_bytes, libp2p_id=libp2p_id, maddrs=(),
        round=rt.protocol.round, model_hash=rt.snapshot.hash, device_class="cpu", power_w=0.0,
        state_bytes=rt.snapshot.size, seq=1, timestamp=rt.started,
    )  # fmt: skip


def frames_of(data: bytes | bytearray) -> list[bytes]:
    out, offset = [], 0
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + FRAME_HEADER], "big")
        out.append(bytes(data[offset + FRAME_HEADER : offset + FRAME_HEADER + length]))
        offset += FRAME_HEADER + length
    return out


class GatedWriter:
    """Collects frames; its ``drain`` number ``gate_after`` waits until ``gate`` is set."""

    def __init__(self, gate_after: int) -> None:
        self.data = bytearray()
        self.drains, self.gate_after = 0, gate_after
        self.reached, self.gate = asyncio.Event(), asyncio.Event()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        self.drains += 1
        if self.drains == self.gate_after:
            self.reached.set()
            await self.gate.wait()


def reader_of(*frames: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for frame in frames:
        reader.feed_data(len(frame).to_bytes(FRAME_HEADER, "big") + frame)
    reader.feed_eof()
    return reader


def test_a_transfer_in_progress_keeps_its_snapshot_when_the_round_moves_on(tmp_path):
    donor = peer_runtime(tmp_path, "donor", seed=0)
    joiner = peer_runtime(tmp_path, "joiner", seed=1)
    old_hash, old_params, old_path = donor.snapshot.hash, donor.protocol.params.copy(), donor.snapshot.path
    assert old_path is not None and len(donor.snapshot.layout.chunk_hashes) == 17

    async def scenario() -> GatedWriter:
        writer = GatedWriter(gate_after=3)  # the manifest and two chunks are out
        request = joiner.protocol.state_request(bytes(16), donor.started)
        task = asyncio.create_task(StreamHandlers(donor).handle_state("joiner", reader_of(request), writer))
        await writer.reached.wait()
        donor.protocol.adopt(old_params + 1.0, 1)  # the round moves on: a new snapshot replaces the file
        donor.refresh_snapshot()
        assert donor.snapshot.hash != old_hash and not old_path.exists()
        writer.gate.set()
        await task
        return writer

    frames = frames_of(asyncio.run(scenario()).data)
    manifest = joiner.protocol.open_manifest(
        frames[0], Donor(donor.protocol.identity.public_key_bytes, 0, old_hash), time.time()
    )
    arrays, round_ = joiner.protocol.open_state(manifest, frames[1:])
    assert manifest.model_hash == old_hash and round_ == 0 and np.array_equal(arrays["params"], old_params)
    assert [p.name for p in (tmp_path / "donor" / "snapshots").iterdir()] == [donor.snapshot.path.name]


def test_a_want_gets_only_its_chunks_and_a_bad_want_a_typed_refusal(tmp_path):
    donor = peer_runtime(tmp_path, "donor", seed=0)
    joiner = peer_runtime(tmp_path, "joiner", seed=1)
    layout = donor.snapshot.layout
    want = {"model_hash": donor.snapshot.hash, "ranges": [[1, 3], [16, 17]]}

    def serve(request: bytes) -> list[bytes]:
        writer = GatedWriter(gate_after=0)

        async def run() -> None:
            await StreamHandlers(donor).handle_state("joiner", reader_of(request), writer)

        asyncio.run(run())
        return frames_of(writer.data)

    frames = serve(joiner.protocol.state_request(bytes(16), donor.started, want))
    sent = [layout.chunk_hashes.index(hashlib.sha256(f).digest()) for f in frames[1:]]
    assert sent == [1, 2, 16]
    assert donor.counters["state_bytes_served"] == sum(len(f) for f in frames[1:])
    bad = joiner.protocol.state_request(bytes(16), donor.started, {**want, "ranges": [[3, 18]]})
    refusal = msgpack.unpackb(serve(bad)[0])
    assert refusal == {"ok": False, "reason": "bad_index"}


class CutWriter:
    """A socket's writer that closes the stream after ``frames`` frames (a donor dying mid-transfer)."""

    def __init__(self, writer: asyncio.StreamWriter, frames: int | None) -> None:
        self.writer, self.frames, self.drains = writer, frames, 0

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()
        self.drains += 1
        if self.frames is not None and self.drains >= self.frames:
            self.writer.close()
            raise ConnectionResetError("donor died")

    def close(self) -> None:
        self.writer.close()


def test_an_interrupted_download_resumes_from_another_donor_keeping_its_verified_chunks(tmp_path):
    """Donor 0 dies after the manifest and 5 chunks; donor 1 (the same state, another key) is
    asked for the 12 missing chunks only; the joiner's state is the donors' and no chunk came twice."""
    donors = [peer_runtime(tmp_path, f"donor{i}", seed=0) for i in range(2)]
    joiner = peer_runtime(tmp_path, "joiner", seed=1)
    assert donors[0].snapshot.hash == donors[1].snapshot.hash
    total = donors[0].snapshot.size
    cut = {"donor0": 1 + 5, "donor1": None}
    handlers = {"donor0": StreamHandlers(donors[0]), "donor1": StreamHandlers(donors[1])}

    async def scenario():
        served: list[asyncio.Task] = []

        async def open_stream(libp2p_id: str, name: str):
            ours, theirs = socket.socketpair()
            donor_reader, donor_writer = await asyncio.open_connection(sock=theirs)
            writer = CutWriter(donor_writer, cut[libp2p_id])

            async def serve() -> None:
                try:
                    await handlers[libp2p_id].handle_state("joiner", donor_reader, writer)
                except ConnectionResetError:
                    pass

            served.append(asyncio.create_task(serve()))
            return await asyncio.open_connection(sock=ours)

        joiner.net.open_stream = open_stream
        client = StreamClient(joiner)
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await client.download_state(announcement(donors[0], "donor0"))
        first = client.last_download
        assert sorted(client.partial().verified) == [0, 1, 2, 3, 4]
        arrays, round_ = await client.download_state(announcement(donors[1], "donor1"))
        await asyncio.gather(*served)
        return first, client.last_download, arrays, round_

    first, second, arrays, round_ = asyncio.run(scenario())
    assert first.fetched == 5 * CHUNK
    assert (second.reused, second.fetched) == (5 * CHUNK, total - 5 * CHUNK)
    assert donors[1].counters["state_bytes_served"] == total - 5 * CHUNK
    assert round_ == 0 and np.array_equal(arrays["params"], donors[0].protocol.params)
    assert joiner.counters["state_bytes_downloaded"] == total


def test_a_donor_of_another_state_is_asked_again_for_the_chunks_we_lack(tmp_path):
    """Chunks are kept by content: a donor whose state differs (another round) but shares chunks
    with what we hold is asked a second time, naming its own state, for the rest only."""
    donors = [peer_runtime(tmp_path, f"donor{i}", seed=0) for i in range(2)]
    params = donors[1].protocol.params.copy()
    params[-64:] += 1.0  # only the last chunks of params differ
    donors[1].protocol.adopt(params, 0)
    donors[1].refresh_snapshot()
    shared = set(donors[0].snapshot.layout.chunk_hashes) & set(donors[1].snapshot.layout.chunk_hashes)
    assert 0 < len(shared) < 17
    joiner = peer_runtime(tmp_path, "joiner", seed=1)
    cut = {"donor0": 1 + 17, "donor1": None}  # donor 0 dies after its last chunk, before we check the whole
    handlers = {"donor0": StreamHandlers(donors[0]), "donor1": StreamHandlers(donors[1])}

    async def scenario():
        async def open_stream(libp2p_id: str, name: str):
            ours, theirs = socket.socketpair()
            donor_reader, donor_writer = await asyncio.open_connection(sock=theirs)
            asyncio.create_task(
                handlers[libp2p_id].handle_state(
                    "joiner", donor_reader, CutWriter(donor_writer, cut[libp2p_id])
                )
            )
            return await asyncio.open_connection(sock=ours)

        joiner.net.open_stream = open_stream
        client = StreamClient(joiner)
        client.partial().take_manifest(
            Manifest(
                0,
                donors[0].snapshot.hash,
                donors[0].snapshot.size,
                CHUNK,
                donors[0].snapshot.layout.chunk_hashes,
            )
        )
        for index in range(17):  # as if donor 0 had sent everything
            client.partial().write_chunk(
                index,
                (tmp_path / "donor0" / "snapshots" / donors[0].snapshot.path.name).read_bytes()[
                    index * CHUNK : (index + 1) * CHUNK
                ],
            )
        arrays, _ = await client.download_state(announcement(donors[1], "donor1"))
        return client.last_download, arrays

    progress, arrays = asyncio.run(scenario())
    assert progress.attempts == 2 and progress.reused > 0
    assert progress.fetched == donors[1].snapshot.size - progress.reused
    assert donors[1].counters["state_bytes_served"] == progress.fetched
    assert np.array_equal(arrays["params"], params)


class StallWriter(CutWriter):
    """A donor that stops sending after ``frames`` frames without closing (hung, not dead)."""

    async def drain(self) -> None:
        await self.writer.drain()
        self.drains += 1
        if self.frames is not None and self.drains >= self.frames:
            await asyncio.Event().wait()  # never set: only the joiner's stall deadline ends this


def test_a_stalled_donor_is_left_after_the_stall_deadline_and_its_chunks_kept(tmp_path):
    """No chunk for ``state_stall_s``: the joiner gives up on that donor (not after a deadline
    tuned for the whole state) and the next donor sends only what is missing."""
    donors = [peer_runtime(tmp_path, f"donor{i}", seed=0) for i in range(2)]
    joiner = peer_runtime(tmp_path, "joiner", seed=1, stall_s=0.5)
    writers = {"donor0": lambda w: StallWriter(w, 1 + 3), "donor1": lambda w: CutWriter(w, None)}
    handlers = {"donor0": StreamHandlers(donors[0]), "donor1": StreamHandlers(donors[1])}

    async def scenario():
        served: list[asyncio.Task] = []

        async def open_stream(libp2p_id: str, name: str):
            ours, theirs = socket.socketpair()
            donor_reader, donor_writer = await asyncio.open_connection(sock=theirs)
            writer = writers[libp2p_id](donor_writer)
            served.append(
                asyncio.create_task(handlers[libp2p_id].handle_state("joiner", donor_reader, writer))
            )
            return await asyncio.open_connection(sock=ours)

        joiner.net.open_stream = open_stream
        client = StreamClient(joiner)
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            await client.download_state(announcement(donors[0], "donor0"))
        waited = time.perf_counter() - started
        arrays, _ = await client.download_state(announcement(donors[1], "donor1"))
        for task in served:
            task.cancel()
        await asyncio.gather(*served, return_exceptions=True)
        return waited, client.last_download, arrays

    waited, progress, arrays = asyncio.run(scenario())
    assert 0.5 <= waited < 5.0
    assert progress.reused == 3 * CHUNK and progress.fetched == donors[1].snapshot.size - 3 * CHUNK
    assert np.array_equal(arrays["params"], donors[0].protocol.params)


def test_deadlines_scale_with_the_state_size():
    """Nothing tuned for a 1M-parameter state fires for a 124M one: the whole deadline grows with
    total_bytes at the floor rate (default 1 MB/s) on top of the fixed part."""
    net = NetConfig()
    assert net.state_deadline_s(12_000_000) == pytest.approx(72.0)  # ~1M parameters with AdamW moments
    assert net.state_deadline_s(1_500_000_000) == pytest.approx(1560.0)  # ~124M: 26 minutes at worst
    assert net.state_stall_s == 30.0 and net.state_chunk_bytes == 4 << 20


def test_a_hostile_chunk_mid_stream_is_refused_and_no_write_outlives_the_stream(tmp_path):
    """Chunks are checked two at a time: a wrong or short chunk raises HASH_MISMATCH once the chunk
    already in flight beside it is settled (kept: it is the manifest's); an oversized frame is
    refused by its exact length before its body is read. Nothing is written as verified that
    does not hash to its entry, and nothing is counted as fetched that was not verified."""
    state = np.random.default_rng(6).bytes(8 * CHUNK)
    pieces = chunks_of(state)

    def run(*frames: bytes) -> tuple[PartialState, Progress, BaseException]:
        partial = PartialState(tmp_path / f"transfer{len(frames)}-{len(frames[-1])}")
        partial.take_manifest(manifest_of(state))
        progress = Progress(donor="d")

        async def scenario() -> BaseException:
            with pytest.raises(Exception) as caught:
                await receive_chunks(reader_of(*frames), partial, list(range(8)), progress, stall_s=5.0)
            return caught.value

        return partial, progress, asyncio.run(scenario())

    bad = bytes(CHUNK)
    partial, progress, error = run(*pieces[:3], bad, *pieces[4:])
    assert isinstance(error, HashMismatch)
    assert 3 not in partial.verified and {0, 1, 2} <= set(partial.verified)
    assert progress.fetched == len(partial.verified) * CHUNK  # counted only once verified
    assert partial.path.read_bytes()[3 * CHUNK : 4 * CHUNK] == bytes(CHUNK)
    partial, _, error = run(*pieces[:2], pieces[2] + b"x")
    assert isinstance(error, FrameTooLarge) and sorted(partial.verified) == [0, 1]
    partial, _, error = run(*pieces[:5], pieces[5][:-1])  # a short chunk: not the manifest's
    assert isinstance(error, HashMismatch) and sorted(partial.verified) == [0, 1, 2, 3, 4]
