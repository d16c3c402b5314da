"""The daemon's stream handlers with in-memory streams: every refusal is answered with its reason.

Unit tests (in-process fakes for the stream, no hivemind): the integration suite checks the
same over real libp2p (``tests/integration/test_swarm_training.py``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from p2pfm.core.envelope import EnvelopeLimits
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import LocalWork, PeerProtocol, PeerSetup
from p2pfm.core.tensorfile import unpack_arrays
from p2pfm.daemon.config import PeerConfig
from p2pfm.daemon.handlers import StreamHandlers
from p2pfm.daemon.metrics import MetricsLog
from p2pfm.daemon.net import FRAME_HEADER, PeerNetwork
from p2pfm.daemon.runtime import PeerRuntime
from p2pfm.daemon.trainer import ModelAdapter

RUN = "handler-test"


class MemoryWriter:
    """Collects what a handler writes, frame by frame."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def frames(self) -> list[bytes]:
        out, offset = [], 0
        while offset < len(self.data):
            length = int.from_bytes(self.data[offset : offset + FRAME_HEADER], "big")
            out.append(bytes(self.data[offset + FRAME_HEADER : offset + FRAME_HEADER + length]))
            offset += FRAME_HEADER + length
        return out


def reader_of(*frames: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for frame in frames:
        reader.feed_data(len(frame).to_bytes(FRAME_HEADER, "big") + frame)
    reader.feed_eof()
    return reader


def runtime(tmp_path: Path) -> PeerRuntime:
    config = PeerConfig(run_id=RUN, work_dir=tmp_path / "peer", key=tmp_path / "peer" / "peer.key")
    model = torch.nn.Linear(4, 2)
    trainer = ModelAdapter(model, torch.optim.SGD(model.parameters(), lr=0.1))
    identity = Identity.generate()
    protocol = PeerProtocol(
        PeerSetup(
            identity=identity,
            run_id=RUN,
            gossip=config.gossip,
            limits=EnvelopeLimits(max_bytes=config.net.max_message_bytes),
        ),
        trainer.flat(),
    )
    rt = PeerRuntime(
        config=config,
        protocol=protocol,
        trainer=trainer,
        net=PeerNetwork(config.net, identity, RUN),
        metrics=MetricsLog(config.work_dir),
        shard_index=0,
        rng=np.random.default_rng(0),
    )
    rt.refresh_snapshot()
    return rt


def stranger(numel: int) -> PeerProtocol:
    return PeerProtocol(
        PeerSetup(identity=Identity.generate(), run_id=RUN, gossip=PeerConfig().gossip),
        np.zeros(numel, np.float32),
    )


def call(handler, remote: str, *frames: bytes) -> list[bytes]:
    writer = MemoryWriter()

    async def serve() -> None:
        await handler(remote, reader_of(*frames), writer)

    asyncio.run(serve())
    return writer.frames()


def refusal(frames: list[bytes]) -> str:
    assert len(frames) == 1
    answer = msgpack.unpackb(frames[0])
    assert answer["ok"] is False
    return answer["reason"]


@pytest.mark.parametrize("stream", ["state", "params"])
def test_a_non_request_kind_on_the_state_streams_gets_a_typed_refusal(tmp_path, stream):
    """An update (a valid, signed message of another kind) on state/params: wrong_kind, counted."""
    rt = runtime(tmp_path)
    handlers = StreamHandlers(rt)
    other = stranger(rt.protocol.learner.numel)
    update = other.seal("update", other.make_update(other.params - 0.1, LocalWork(8, 1, 1.0)), rt.started)
    handler = handlers.handle_state if stream == "state" else handlers.handle_params
    assert refusal(call(handler, "remote-1", update)) == "wrong_kind"
    assert rt.protocol.scores.rejected == {"wrong_kind": 1}
    assert refusal(call(handler, "remote-1", b"\x01junk")) == "malformed"


def test_a_state_request_gets_the_manifest_and_the_snapshot(tmp_path):
    """A proper request is served: a manifest the asker can check, then the chunks."""
    rt = runtime(tmp_path)
    asker = stranger(rt.protocol.learner.numel)
    frames = call(StreamHandlers(rt).handle_state, "remote-2", asker.state_request(b"n" * 16, rt.started))
    from p2pfm.core.transfer import Donor

    claim = Donor(public_key=rt.protocol.identity.public_key_bytes, round=0, model_hash=rt.snapshot.hash)
    manifest = asker.open_manifest(frames[0], claim, rt.started)
    arrays, round_ = asker.open_state(manifest, frames[1:])
    assert round_ == 0 and np.array_equal(arrays["params"], rt.protocol.params)
    assert rt.snapshot.path is not None  # the snapshot we serve lives in a file, not in memory
    assert unpack_arrays(rt.snapshot.path.read_bytes())[0]["params"].shape == rt.protocol.params.shape


def test_a_banned_sender_is_answered_banned_on_every_stream_without_being_read(tmp_path):
    """After 50 rejections a sender's requests get ``banned`` at once, on gossip, state and params."""
    rt = runtime(tmp_path)
    handlers = StreamHandlers(rt)
    for _ in range(50):
        assert refusal(call(handlers.handle_gossip, "liar", b"\x01junk")) == "malformed"
    for handler in (handlers.handle_gossip, handlers.handle_state, handlers.handle_params):
        assert refusal(call(handler, "liar", b"unread")) == "banned"
    assert rt.protocol.scores.ignored == {"banned": 3}
    assert rt.protocol.scores.rejected == {"malformed": 50}
