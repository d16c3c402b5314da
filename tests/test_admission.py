"""Admission (issue 12): certificates of the swarm's authority, revocation lists, and who counts.

A signature proves who sent a message, not that the sender belongs: in an admitted swarm only
holders of a valid, unexpired, unrevoked certificate count, and nothing is served to others.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from p2pfm.core.admission import (
    Admission,
    issue_certificate,
    issue_revocations,
    read_certificate,
)
from p2pfm.core.codecs import CodecSpec, encode
from p2pfm.core.envelope import seal
from p2pfm.core.errors import NotAdmitted, UnknownSender
from p2pfm.core.gossip import GossipConfig
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import PeerProtocol, PeerSetup

RUN = "admitted"
NOW = 1_700_000_000.0
AUTHORITY = Identity.from_private_bytes(b"\x07" * 32)
PEER = Identity.from_private_bytes(b"\x08" * 32)
STRANGER = Identity.from_private_bytes(b"\x09" * 32)


def cert(peer: Identity = PEER, **changes) -> bytes:
    fields = {"issued": NOW - 10, "expires": 0.0, "serial": 1, **changes}
    authority = fields.pop("authority", AUTHORITY)
    run_id = fields.pop("run_id", RUN)
    return issue_certificate(authority, run_id, peer.peer_id, **fields)


def policy() -> Admission:
    return Admission(RUN, AUTHORITY.peer_id)


def test_a_certificate_of_our_authority_admits_its_peer():
    checked = policy().check(PEER.peer_id, cert(), NOW)
    assert (
        checked is not None and checked.peer_id == PEER.peer_id and checked.authority_id == AUTHORITY.peer_id
    )
    assert Admission(RUN).check(STRANGER.peer_id, None, NOW) is None  # open swarm: everyone, nothing checked


@pytest.mark.parametrize(
    ("peer_id", "certificate", "why"),
    [
        (PEER.peer_id, None, "presented no certificate"),
        (STRANGER.peer_id, cert(), "presented by"),  # someone else's certificate
        (PEER.peer_id, cert(authority=STRANGER), "not our authority"),  # self-signed
        (PEER.peer_id, cert(run_id="other-swarm"), "for swarm"),
        (PEER.peer_id, cert(issued=NOW - 100, expires=NOW - 1), "expired"),
        (PEER.peer_id, b"\x92\xc4\x01x\xc4\x02yy", "malformed"),
        (PEER.peer_id, b"junk", "malformed"),
        (PEER.peer_id, "not bytes", "not bytes"),
        (PEER.peer_id, b"x" * 600, "not bytes of at most"),
    ],
)
def test_anything_else_is_not_admitted_and_says_why(peer_id, certificate, why):
    with pytest.raises(NotAdmitted, match=why):
        policy().check(peer_id, certificate, NOW)


def test_a_tampered_certificate_does_not_verify():
    """Flip each byte of the signed body in turn: every variant is refused, none admits anybody."""
    good = cert()
    packed, signature = msgpack.unpackb(good)
    for i in range(len(packed)):
        body = packed[:i] + bytes([packed[i] ^ 0x01]) + packed[i + 1 :]
        with pytest.raises(NotAdmitted):
            policy().check(PEER.peer_id, msgpack.packb([body, signature]), NOW)


def test_random_bytes_never_admit_and_never_raise_anything_else():
    rng = np.random.default_rng(0)
    good = cert()
    for _ in range(2000):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
        try:
            policy().check(PEER.peer_id, bytes(data[: int(rng.integers(1, len(data) + 1))]), NOW)
        except NotAdmitted:
            continue
        raise AssertionError("a mutated certificate admitted its peer")


def test_revocation_lists_newest_wins_and_are_complete():
    admission = policy()
    first = issue_revocations(AUTHORITY, RUN, [PEER.peer_id], serial=5, issued=NOW)
    assert admission.revoke(first)
    with pytest.raises(NotAdmitted, match="revoked"):
        admission.check(PEER.peer_id, cert(), NOW)
    assert not admission.revoke(issue_revocations(AUTHORITY, RUN, [], serial=4, issued=NOW))  # older: ignored
    assert admission.is_revoked(PEER.peer_id)
    assert admission.revoke(issue_revocations(AUTHORITY, RUN, [], serial=6, issued=NOW))  # newer, empty
    assert admission.check(PEER.peer_id, cert(), NOW) is not None
    with pytest.raises(NotAdmitted):  # a stranger cannot revoke anybody
        admission.revoke(issue_revocations(STRANGER, RUN, [PEER.peer_id], serial=99, issued=NOW))
    assert not admission.is_revoked(PEER.peer_id)


def test_certificates_read_back_exactly():
    parsed = read_certificate(cert(expires=NOW + 3600, serial=42))
    assert (parsed.run_id, parsed.peer_id, parsed.expires, parsed.serial) == (
        RUN,
        PEER.peer_id,
        NOW + 3600,
        42,
    )


# --- the protocol: only members count, nothing is served to others ----------------------------------
def update_from(identity: Identity, numel: int, seq: int) -> bytes:
    wire = encode(np.ones(numel, np.float32) * 1e-3, CodecSpec())
    payload = {"tensor": wire, "weight": 1.0, "inner_steps": 1, "train_loss": 0.0, "model_hash": bytes(32)}
    return seal(identity, kind="update", run_id=RUN, round=0, seq=seq, timestamp=NOW, payload=payload)


def receiver() -> PeerProtocol:
    setup = PeerSetup(identity=Identity.generate(), run_id=RUN, gossip=GossipConfig(), admission=policy())
    return PeerProtocol(setup, np.zeros(100, np.float32))


def test_in_an_admitted_swarm_a_stranger_gets_nothing_counted_or_served():
    peer = receiver()
    peer.know({PEER.peer_id: "libp2p-peer"})  # the driver's book: only announced, admitted peers
    peer.receive_update("libp2p-peer", update_from(PEER, 100, 1), NOW)
    for seq in range(2, 50):
        with pytest.raises(UnknownSender):
            peer.receive_update("libp2p-stranger", update_from(STRANGER, 100, seq), NOW)
    assert peer.accepted == 1 and peer.scores.ignored == {"unknown_sender": 48}
    for seq, stream in enumerate(("state", "params"), start=99):
        request = seal(STRANGER, kind="state_request", run_id=RUN, round=0, seq=seq, timestamp=NOW,
                       payload={"round": 0, "nonce": b"n" * 16})  # fmt: skip
        with pytest.raises(NotAdmitted):
            peer.open_request("libp2p-stranger", request, NOW + 1, stream=stream)
    # An admitted key on another transport than it announced is no member either.
    with pytest.raises(UnknownSender):
        peer.receive_update("libp2p-other", update_from(PEER, 100, 100), NOW)


def test_requests_from_members_are_rate_limited():
    peer = receiver()
    peer.know({PEER.peer_id: "libp2p-peer"})
    served = refused = 0
    for seq in range(10):
        request = seal(PEER, kind="state_request", run_id=RUN, round=0, seq=seq + 1, timestamp=NOW,
                       payload={"round": 0, "nonce": bytes([seq]) * 16})  # fmt: skip
        try:
            peer.open_request("libp2p-peer", request, NOW, stream="state")
            served += 1
        except Exception as exc:
            assert exc.reason.value == "rate_limited"
            refused += 1
    assert (served, refused) == (8, 2)  # the burst, then nothing within the same second


def test_scores_decay_and_bans_end_and_grow():
    from p2pfm.core.errors import BadSignature
    from p2pfm.core.scoring import Scoreboard

    board = Scoreboard()
    bad = BadSignature("x")
    for _ in range(49):
        board.note("k", bad, NOW)
    assert not board.is_banned("k", NOW)
    assert board.score("k", NOW + 600) == pytest.approx(24.5)  # one half-life later
    assert board.note("k", bad, NOW)  # the 50th: banned
    assert board.is_banned("k", NOW + 599) and not board.is_banned("k", NOW + 601)
    assert board.take_decisions() == [("k", "bad_signature", 600.0)] and board.take_decisions() == []
    for _ in range(30):  # restarted at 25: banned again sooner, and for longer
        if board.note("k", bad, NOW + 601):
            break
    assert board.is_banned("k", NOW + 601 + 1199)


def test_a_joiner_not_yet_in_the_book_is_served_on_its_certificate():
    """The donor may not have read a joiner's announcement yet: the certificate in the request
    admits it; someone else's certificate does not, and an open swarm serves anyone."""
    peer = receiver()
    peer.know({})  # nobody in the book yet

    def request(identity: Identity, seq: int, certificate: bytes | None) -> bytes:
        payload = {"round": 0, "nonce": bytes([seq]) * 16, **({"cert": certificate} if certificate else {})}
        return seal(
            identity, kind="state_request", run_id=RUN, round=0, seq=seq, timestamp=NOW, payload=payload
        )

    assert peer.open_request("t1", request(PEER, 1, cert()), NOW, stream="state").sender_id == PEER.peer_id
    with pytest.raises(NotAdmitted, match="presented by"):
        peer.open_request("t2", request(STRANGER, 2, cert()), NOW, stream="state")
    with pytest.raises(NotAdmitted, match="no certificate"):
        peer.open_request("t2", request(STRANGER, 3, None), NOW, stream="params")
    setup = PeerSetup(identity=Identity.generate(), run_id=RUN, gossip=GossipConfig())
    open_peer = PeerProtocol(setup, np.zeros(100, np.float32))
    open_peer.know({})
    assert open_peer.open_request("t3", request(STRANGER, 4, None), NOW, stream="state").sender_id
