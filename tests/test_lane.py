"""The state download's direct lane: the offer and seal (``p2pfm.core.lane``), the donor's listener
and both sides' sockets (``p2pfm.daemon.lanes``) over real loopback TCP, in process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest

from p2pfm.core.envelope import (
    PROTOCOL_VERSION,
    EnvelopeLimits,
    open_envelope,
    pack_body,
    pack_wire,
    signing_bytes,
)
from p2pfm.core.errors import HashMismatch, Malformed, SchemaViolation
from p2pfm.core.gossip import GossipConfig
from p2pfm.core.identity import Identity
from p2pfm.core.lane import (
    MAX_LANE_HOSTS,
    SEAL_BYTES,
    TICKET_BYTES,
    LaneCipher,
    LaneOffer,
    LaneSealBroken,
    lane_hosts,
    lane_key,
    lane_ticket,
    parse_via,
    via_frame,
)
from p2pfm.core.protocol import PeerProtocol, PeerSetup
from p2pfm.core.transfer import ChunkHasher, Donor, Manifest
from p2pfm.daemon import lanes
from p2pfm.daemon.lanes import LaneServer, open_lane, receive_sealed, send_sealed
from p2pfm.daemon.statestream import PartialState, Progress

CHUNK = 1024
RUN = "lane-test"


# --- the seal ----------------------------------------------------------------------------------
def test_a_sealed_chunk_opens_only_under_its_secret_and_index_and_unchanged():
    secret = os.urandom(32)
    cipher = LaneCipher(secret)
    piece = os.urandom(5000)
    sealed = cipher.seal_chunk(7, piece)
    assert len(sealed) == len(piece) + SEAL_BYTES and piece not in sealed
    assert cipher.open_chunk(7, bytearray(sealed)) == piece
    with pytest.raises(LaneSealBroken, match="chunk 8"):
        cipher.open_chunk(8, sealed)  # another chunk's place: a replayed or reordered chunk
    tampered = bytearray(sealed)
    tampered[100] ^= 1
    with pytest.raises(LaneSealBroken, match="chunk 7"):
        cipher.open_chunk(7, tampered)
    with pytest.raises(LaneSealBroken):
        LaneCipher(os.urandom(32)).open_chunk(7, sealed)  # another transfer's key
    with pytest.raises(LaneSealBroken):
        cipher.open_chunk(7, sealed[:-1])
    assert isinstance(LaneSealBroken("x"), ConnectionError)  # the path's failure, not the donor's


def test_the_ticket_and_the_key_are_distinct_hashes_of_the_secret():
    secret = bytes(range(32))
    assert len(lane_ticket(secret)) == TICKET_BYTES and len(lane_key(secret)) == 32
    assert lane_ticket(secret) != lane_key(secret) and secret not in (lane_ticket(secret), lane_key(secret))
    assert lane_ticket(secret) == hashlib.sha256(b"p2pfm/lane/ticket\x00" + secret).digest()
    assert lane_key(secret) == hashlib.sha256(b"p2pfm/lane/key\x00" + secret).digest()


def test_lane_hosts_are_the_announced_ip_literals_in_order_without_relays_or_repeats():
    maddrs = (
        "/ip4/10.0.0.2/tcp/31337/p2p/12D3KooWabc",
        "/ip4/10.0.0.2/tcp/31338",  # the same host twice
        "/ip4/0.0.0.0/tcp/1",  # unspecified: nobody to connect to
        "/ip4/224.0.0.1/tcp/1",  # multicast
        "/dns4/peer1/tcp/1",  # a name: not followed
        "/ip4/10.0.0.3/tcp/1/p2p/12D3KooWrelay/p2p-circuit/p2p/12D3KooWabc",  # relayed: no direct path
        "/ip4/10.0.0.4/udp/1/quic",  # not TCP
        "/ip4/not-an-ip/tcp/1",
        "/ip6/::1/tcp/4001",
        "/ip6/10.0.0.9/tcp/1",  # an ip4 literal under ip6
        "/ip4/fe80::1/tcp/1",  # and the reverse
        "",
        "/ip4/127.0.0.1",
    )
    assert lane_hosts(maddrs) == ["10.0.0.2", "::1"]
    many = tuple(f"/ip4/10.1.0.{i}/tcp/1" for i in range(20))
    assert lane_hosts(many) == [f"10.1.0.{i}" for i in range(MAX_LANE_HOSTS)]
    assert lane_hosts(()) == [] and lane_hosts([None, 3]) == []  # type: ignore[list-item]


def test_the_joiners_choice_is_one_strict_frame():
    assert parse_via(via_frame("lane")) == "lane" and parse_via(via_frame("stream")) == "stream"
    for bad in (
        b"\xc1",  # never valid msgpack
        msgpack.packb({"via": "both"}),
        msgpack.packb({"via": "lane", "also": 1}),
        msgpack.packb(["lane"]),
        msgpack.packb({1: "lane"}),
        msgpack.packb({"via": b"lane"}),
        b"",
    ):
        with pytest.raises(Malformed):
            parse_via(bad)


# --- the offer in the signed messages ----------------------------------------------------------
def protocol() -> PeerProtocol:
    setup = PeerSetup(
        identity=Identity.generate(), run_id=RUN, gossip=GossipConfig(), limits=EnvelopeLimits()
    )
    return PeerProtocol(setup, np.zeros(8, np.float32))


def layout_of(data: bytes):
    hasher = ChunkHasher(CHUNK)
    hasher.update(data)
    return hasher.layout()


def test_a_donor_offers_its_lane_only_to_a_request_that_asked_and_the_offer_is_signed():
    donor, joiner = protocol(), protocol()
    data = os.urandom(3 * CHUNK + 5)
    layout = layout_of(data)
    claim = Donor(public_key=donor.identity.public_key_bytes, round=0, model_hash=layout.model_hash)
    offer = LaneOffer(port=4242, secret=os.urandom(32))
    opened = {}
    for asked in (False, True):
        request = donor.open_request(
            "joiner", joiner.state_request(os.urandom(16), 0.0, lane=asked), 0.0, stream="state"
        )
        assert request.payload.get("lane", False) is asked
        data_, indexes, offered = donor.serve_layout(request, layout, 0, 0.0, lane=offer)
        assert indexes == [0, 1, 2, 3] and offered == (offer if asked else None)
        opened[asked] = joiner.open_manifest(data_, claim, 0.0)
    assert opened[False].lane is None and opened[True].lane == offer
    assert opened[False] == opened[True]  # how chunks travel is not what they are: resume keys on it
    # no lane served: nothing offered, whatever was asked
    request = donor.open_request(
        "joiner", joiner.state_request(os.urandom(16), 0.0, lane=True), 0.0, stream="state"
    )
    assert donor.serve_layout(request, layout, 0, 0.0)[2] is None


def forged(identity: Identity, kind: str, payload: dict) -> bytes:
    """``kind`` signed without seal's own schema check (a hostile peer's)."""
    body = pack_body({
        "v": PROTOCOL_VERSION, "kind": kind, "run": RUN, "sender": identity.public_key_bytes,
        "round": 0, "seq": 1, "ts": 1000.0, "payload": payload,
    })  # fmt: skip
    return pack_wire(body, identity.sign(signing_bytes(kind, RUN, body)))


def test_a_lane_offer_or_ask_off_schema_is_refused():
    identity = Identity.generate()
    layout = layout_of(os.urandom(2 * CHUNK))
    manifest = {
        "round": 0, "model_hash": layout.model_hash, "total_bytes": layout.total_bytes,
        "chunk_size": CHUNK, "chunk_hashes": list(layout.chunk_hashes),
    }  # fmt: skip
    limits = EnvelopeLimits()
    good = {"port": 1, "secret": b"\0" * 32}
    assert open_envelope(
        forged(identity, "state_manifest", {**manifest, "lane": good}), run_id=RUN, now=1000.0, limits=limits
    )
    for lane in ({"port": 0, "secret": b"\0" * 32}, {"port": 65536, "secret": b"\0" * 32},
                 {"port": 1, "secret": b"\0" * 31}, {"port": 1}, {**good, "x": 1}, True):  # fmt: skip
        with pytest.raises(SchemaViolation):
            open_envelope(
                forged(identity, "state_manifest", {**manifest, "lane": lane}),
                run_id=RUN,
                now=1000.0,
                limits=limits,
            )
    for ask in (1, "yes", None):  # a bool, nothing else
        with pytest.raises(SchemaViolation):
            open_envelope(forged(identity, "state_request", {"round": 0, "nonce": bytes(16), "lane": ask}),
                          run_id=RUN, now=1000.0, limits=limits)  # fmt: skip


# --- the sockets -------------------------------------------------------------------------------
async def connect(port: int, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    if payload:
        sock.sendall(payload)
    return sock


async def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the other side closed ``sock`` (EOF or reset) within ``timeout``."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, 1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def test_the_lane_hands_a_connection_to_its_offer_once_and_refuses_and_counts_the_rest():
    async def scenario() -> Counter:
        counters: Counter = Counter()
        server = LaneServer(("/ip4/127.0.0.1/tcp/0",), 0, 5.0, counters)
        assert await server.start() and server.port > 0
        try:
            offer, waiter = server.offer()
            assert offer.port == server.port and len(offer.secret) == 32
            # a stranger's ticket and garbage are closed unread
            assert await closed_by_peer(await connect(server.port, os.urandom(TICKET_BYTES)))
            assert await closed_by_peer(await connect(server.port, b"GET / HTTP/1.1\r\n\r\n" + b"x" * 40))
            good = await connect(server.port, lane_ticket(offer.secret))
            handed = await asyncio.wait_for(waiter, 10)
            handed.sendall(b"hello")
            assert good.recv(5) == b"hello"
            handed.close()
            good.close()
            # the ticket opened its transfer once: a second use is a stranger's
            assert await closed_by_peer(await connect(server.port, lane_ticket(offer.secret)))
            # a withdrawn offer opens nothing either
            offer2, waiter2 = server.offer()
            server.withdraw(offer2, waiter2)
            assert waiter2.cancelled()
            assert await closed_by_peer(await connect(server.port, lane_ticket(offer2.secret)))
            # half a ticket, then EOF
            half = await connect(server.port, lane_ticket(offer.secret)[:10])
            half.shutdown(socket.SHUT_WR)
            assert await closed_by_peer(half)
        finally:
            await server.close()
        return counters

    assert asyncio.run(scenario())["lane_refused"] == 5


def test_a_flood_of_silent_connections_is_bounded_and_each_is_closed_at_the_ticket_deadline(monkeypatch):
    monkeypatch.setattr(lanes, "MAX_GREETINGS", 4)

    async def scenario() -> tuple[Counter, int]:
        counters: Counter = Counter()
        server = LaneServer(("/ip4/127.0.0.1/tcp/0",), 0, 1.0, counters)
        assert await server.start()
        try:
            silent = [await connect(server.port) for _ in range(10)]
            closed = await asyncio.gather(*(closed_by_peer(s) for s in silent))
            # and the server still takes a real ticket afterwards
            offer, waiter = server.offer()
            sock = await connect(server.port, lane_ticket(offer.secret))
            (await asyncio.wait_for(waiter, 10)).close()
            sock.close()
        finally:
            await server.close()
        return counters, sum(closed)

    counters, closed = asyncio.run(scenario())
    assert closed == 10 and counters["lane_refused"] == 10


def test_the_lane_listens_only_where_libp2p_does():
    assert lanes._listen_hosts(("/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0", "/ip4/127.0.0.1/tcp/5", "/dns4/x/tcp/1")) == [
        "127.0.0.1", "::1",
    ]  # fmt: skip


def test_open_lane_tries_each_host_and_gives_up_quietly_when_none_answers():
    async def scenario() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # nothing listens there now
        offer = LaneOffer(port=port, secret=os.urandom(32))
        assert await open_lane(["127.0.0.1"], offer, 2.0) is None
        assert await open_lane([], offer, 2.0) is None

    asyncio.run(scenario())


# --- a whole transfer --------------------------------------------------------------------------
def manifest_of(data: bytes) -> Manifest:
    layout = layout_of(data)
    return Manifest(0, layout.model_hash, layout.total_bytes, CHUNK, layout.chunk_hashes)


def transfer(
    tmp_path: Path, data: bytes, *, path_filter=None, indexes=None, stall_s: float = 10.0, hold: bool = False
) -> tuple[PartialState, Progress, BaseException | None]:
    """Serve ``data`` over a real lane to a fresh partial file; ``path_filter(sealed_stream_bytes)``
    stands between the sockets when given (a hostile path)."""
    manifest = manifest_of(data)
    source = tmp_path / "snapshot"
    source.write_bytes(data)
    partial = PartialState(tmp_path / "joiner")
    partial.take_manifest(manifest)
    wanted = list(range(len(manifest.chunk_hashes))) if indexes is None else indexes
    progress = Progress(donor="donor")

    async def scenario() -> BaseException | None:
        server = LaneServer(("/ip4/127.0.0.1/tcp/0",), 0, 5.0, Counter())
        assert await server.start()
        offer, waiter = server.offer()
        fd = os.open(source, os.O_RDONLY)
        relay: list[asyncio.Task] = []
        try:
            port = server.port
            if path_filter is not None:  # a man in the middle that rewrites the sealed bytes
                port = await _middle(server.port, path_filter, relay, hold)
            sock = await open_lane(["127.0.0.1"], LaneOffer(port, offer.secret), 5.0)
            assert sock is not None
            donor_sock = await asyncio.wait_for(waiter, 10)
            sending = asyncio.create_task(
                send_sealed(donor_sock, fd, manifest.layout, wanted, offer, stall_s=stall_s)
            )
            failure: BaseException | None = None
            try:
                await receive_sealed(sock, partial, wanted, progress, offer, stall_s=stall_s)
            except (ConnectionError, TimeoutError, HashMismatch) as exc:
                failure = exc
            await asyncio.gather(sending, return_exceptions=True)
            return failure
        finally:
            for task in relay:
                task.cancel()
            await asyncio.gather(*relay, return_exceptions=True)
            os.close(fd)
            await server.close()

    return partial, progress, asyncio.run(scenario())


async def _middle(port: int, rewrite, tasks: list[asyncio.Task], hold: bool) -> int:
    """A TCP relay to ``port`` that passes the joiner's ticket on and ``rewrite``s what comes back
    (``hold``: and keeps the joiner's side open once the donor is done, saying nothing)."""

    async def pipe(reader, writer, func) -> None:
        offset = 0
        try:
            while data := await reader.read(65536):
                writer.write(func(offset, data))
                offset += len(data)
                await writer.drain()
            if hold:
                await asyncio.Event().wait()  # until the test cancels the relay
        finally:
            writer.close()

    async def handle(reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        tasks.append(asyncio.create_task(pipe(reader, up_writer, lambda _o, d: d)))
        tasks.append(asyncio.create_task(pipe(up_reader, writer, rewrite)))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    tasks.append(asyncio.create_task(server.serve_forever()))
    return server.sockets[0].getsockname()[1]


def test_a_whole_state_crosses_the_lane_sealed_and_lands_verified(tmp_path):
    data = os.urandom(20 * CHUNK + 17)
    partial, progress, failure = transfer(tmp_path, data)
    assert failure is None and not partial.missing()
    assert progress.fetched == len(data) and partial.path.read_bytes() == data
    assert sorted(partial.verified) == list(range(21))


def test_a_want_crosses_only_its_chunks(tmp_path):
    data = os.urandom(10 * CHUNK)
    partial, progress, failure = transfer(tmp_path, data, indexes=[2, 3, 7])
    assert failure is None and sorted(partial.verified) == [2, 3, 7] and progress.fetched == 3 * CHUNK


def test_a_byte_changed_on_the_path_breaks_the_seal_and_keeps_the_chunks_before_it(tmp_path):
    data = os.urandom(12 * CHUNK)
    sealed_chunk = CHUNK + SEAL_BYTES
    target = 6 * sealed_chunk + 100  # a byte of chunk 6

    def flip(offset: int, data_: bytes) -> bytes:
        if offset <= target < offset + len(data_):
            changed = bytearray(data_)
            changed[target - offset] ^= 0x80
            return bytes(changed)
        return data_

    partial, progress, failure = transfer(tmp_path, data, path_filter=flip)
    assert isinstance(failure, LaneSealBroken) and "chunk 6" in str(failure)
    assert set(range(5)) <= set(partial.verified) and 6 not in partial.verified
    assert all(
        partial.verified[i] == hashlib.sha256(data[i * CHUNK : (i + 1) * CHUNK]).digest()
        for i in partial.verified
    )


def test_a_donor_that_seals_a_wrong_chunk_is_caught_by_the_manifest_hash(tmp_path, monkeypatch):
    """The seal proves the path, not the donor: a chunk it sealed itself is still checked."""
    data = os.urandom(8 * CHUNK)
    real_seal = LaneCipher.seal_chunk

    def lying_seal(self, index: int, piece: bytes) -> bytes:
        return real_seal(self, index, b"\0" * len(piece) if index == 3 else piece)

    monkeypatch.setattr(LaneCipher, "seal_chunk", lying_seal)
    partial, _, failure = transfer(tmp_path, data)
    assert isinstance(failure, HashMismatch) and 3 not in partial.verified


def test_a_lane_that_stalls_ends_at_the_stall_deadline_keeping_what_arrived(tmp_path, monkeypatch):
    data = os.urandom(6 * CHUNK)
    cut = 3 * (CHUNK + SEAL_BYTES) + 10

    def stall_after_cut(offset: int, data_: bytes) -> bytes:
        return data_[: max(0, cut - offset)]  # nothing past the cut ever arrives

    partial, _, failure = transfer(tmp_path, data, path_filter=stall_after_cut, stall_s=1.0, hold=True)
    assert isinstance(failure, TimeoutError) and sorted(partial.verified) == [0, 1, 2]


def test_a_connection_its_transfer_never_took_is_closed_when_the_offer_is_withdrawn():
    async def scenario() -> bool:
        server = LaneServer(("/ip4/127.0.0.1/tcp/0",), 0, 5.0, Counter())
        assert await server.start()
        try:
            offer, waiter = server.offer()
            client = await connect(server.port, lane_ticket(offer.secret))
            await asyncio.wait_for(asyncio.shield(waiter), 10)  # arrived; the transfer ended before taking it
            server.withdraw(offer, waiter)
            return await closed_by_peer(client)
        finally:
            await server.close()

    assert asyncio.run(scenario())
