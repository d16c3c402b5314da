"""DHT records under the swarm's key: foreign or malformed ones are refused by reason, counted,
and each offender is logged at most once a minute; the ``sees`` list travels in announcements."""

from __future__ import annotations

import logging

import pytest

from p2pfm.core.envelope import seal
from p2pfm.core.errors import Reject
from p2pfm.core.identity import Identity
from p2pfm.daemon.config import NetConfig
from p2pfm.daemon.net import ForeignRecord, IgnoredRecords, PeerNetwork

RUN = "dht-test"
NOW = 1_000_000.0


def announce_payload(**extra) -> dict:
    return {
        "libp2p_id": "12D3KooA",
        "maddrs": ["/ip4/127.0.0.1/tcp/1"],
        "round": 3,
        "model_hash": b"h" * 32,
        "device_class": "cpu-host",
        "power_w": 15.0,
        "state_bytes": 10,
        **extra,
    }


@pytest.fixture
def net() -> PeerNetwork:
    return PeerNetwork(NetConfig(), Identity.generate(), RUN)


def test_announcement_with_sees_is_parsed(net):
    """The libp2p ids an announcement lists come out in ``Announcement.sees``."""
    sender = Identity.generate()
    record = seal(
        sender,
        kind="announce",
        run_id=RUN,
        round=3,
        seq=1,
        timestamp=NOW,
        payload=announce_payload(sees=["12D3KooB", "12D3KooC"]),
    )
    parsed = net.parse_announcement(sender.peer_id, record, NOW)
    assert parsed.sees == ("12D3KooB", "12D3KooC") and parsed.round == 3


def test_announcement_without_sees_is_still_accepted(net):
    """``sees`` is optional: announcements that omit it parse with an empty list."""
    sender = Identity.generate()
    record = seal(
        sender, kind="announce", run_id=RUN, round=3, seq=1, timestamp=NOW, payload=announce_payload()
    )
    assert net.parse_announcement(sender.peer_id, record, NOW).sees == ()


@pytest.mark.parametrize("label", ["malformed", "wrong_kind", "subkey_mismatch"])
def test_foreign_records_are_refused_with_their_reason(net, label):
    """Not bytes, another kind, or signed by someone other than the subkey: each has its own typed reason."""
    sender = Identity.generate()
    if label == "malformed":
        subkey, record = sender.peer_id, {"junk": 1}
    elif label == "wrong_kind":
        subkey = sender.peer_id
        record = seal(
            sender,
            kind="state_request",
            run_id=RUN,
            round=0,
            seq=1,
            timestamp=NOW,
            payload={"round": 0, "nonce": b"n" * 16},
        )
    else:
        subkey = Identity.generate().peer_id
        record = seal(
            sender, kind="announce", run_id=RUN, round=3, seq=1, timestamp=NOW, payload=announce_payload()
        )
    with pytest.raises(Reject) as refused:
        net.parse_announcement(subkey, record, NOW)
    assert refused.value.reason.value == label


def test_ignored_records_are_counted_by_reason_and_logged_once_a_minute(caplog):
    """Every sighting is counted; one offender's line appears once per minute, not per lookup."""
    ignored = IgnoredRecords()
    with caplog.at_level(logging.INFO, logger="p2pfm.daemon.net"):
        for second in range(0, 30, 4):  # lookups every 4 s for 30 s
            ignored.note("junk-key", ForeignRecord("wrong_kind", "x"), NOW + second)
        ignored.note("other-key", ForeignRecord("malformed", "y"), NOW + 30)
        ignored.note("junk-key", ForeignRecord("wrong_kind", "x"), NOW + 61)
    assert ignored.by_reason == {"wrong_kind": 9, "malformed": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert sum("'junk-key'" in line for line in lines) == 2
    assert sum("'other-key'" in line for line in lines) == 1


def test_ignored_records_remember_a_bounded_number_of_offenders():
    """5,000 junk subkeys cannot grow the rate limiter without bound."""
    ignored = IgnoredRecords(max_offenders=100)
    for i in range(5000):
        ignored.note(f"junk-{i}", ForeignRecord("malformed", "z"), NOW)
    assert ignored.by_reason["malformed"] == 5000
    assert len(ignored._last_logged) == 100


def test_the_dht_validator_stores_only_announcements_signed_by_their_subkey():
    """Honest DHT nodes refuse junk, overwrites of another peer's subkey, plain values over the
    swarm's key and expirations longer than the signer's own; other keys pass untouched."""
    import time

    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    from p2pfm.core.envelope import EnvelopeLimits
    from p2pfm.daemon.dht_validator import AnnouncementValidator

    ttl = 15.0
    validator = AnnouncementValidator(RUN, f"p2pfm/{RUN}/peers", ttl, EnvelopeLimits(max_bytes=64 * 1024))
    key = DHTID.generate(source=f"p2pfm/{RUN}/peers").to_bytes()
    dumps = DHTProtocol.serializer.dumps
    sender, stranger = Identity.generate(), Identity.generate()
    now = time.time()
    record = seal(
        sender, kind="announce", run_id=RUN, round=3, seq=1, timestamp=now, payload=announce_payload()
    )

    def stored(subkey, value, expiration=now + ttl, on_key=key) -> bool:
        return validator.validate(DHTRecord(on_key, dumps(subkey), dumps(value), expiration))

    assert stored(sender.peer_id, record)
    assert not stored(stranger.peer_id, record)  # someone else's subkey: an overwrite
    assert not stored(sender.peer_id, b"junk")
    assert not stored(sender.peer_id, {"not": "bytes"})
    assert not stored(sender.peer_id, record, expiration=now + 3600)  # kept alive past its signer's TTL
    assert not validator.validate(DHTRecord(key, DHTProtocol.IS_REGULAR_VALUE, dumps(b"x"), now + 10))
    assert not validator.validate(DHTRecord(key, b"\xc1", b"\xc1", now + 10))  # undecodable msgpack
    other_key = DHTID.generate(source="someone-else").to_bytes()
    assert stored(sender.peer_id, b"junk", on_key=other_key)


def test_an_admitted_swarms_validator_refuses_sybils_and_foreign_revocations():
    """With an authority, honest nodes store only announcements whose certificate admits their
    signer (200 fresh identities used to be stored in seconds), and under the revocation key only
    the authority's lists, under their serial."""
    import time

    from hivemind.dht.protocol import DHTProtocol
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    from p2pfm.core.admission import Admission, issue_certificate, issue_revocations
    from p2pfm.core.envelope import EnvelopeLimits
    from p2pfm.daemon.dht_validator import AnnouncementValidator

    authority, member, sybil = Identity.generate(), Identity.generate(), Identity.generate()
    admission = Admission(RUN, authority.peer_id)
    validator = AnnouncementValidator(
        RUN,
        f"p2pfm/{RUN}/peers",
        15.0,
        EnvelopeLimits(max_bytes=64 * 1024),
        admission,
        f"p2pfm/{RUN}/revoked",
    )
    dumps = DHTProtocol.serializer.dumps
    peers_key = DHTID.generate(source=f"p2pfm/{RUN}/peers").to_bytes()
    revoked_key = DHTID.generate(source=f"p2pfm/{RUN}/revoked").to_bytes()
    now = time.time()

    def announce(identity: Identity, cert: bytes | None) -> bool:
        payload = announce_payload(**({"cert": cert} if cert else {}))
        record = seal(identity, kind="announce", run_id=RUN, round=3, seq=1, timestamp=now, payload=payload)
        return validator.validate(DHTRecord(peers_key, dumps(identity.peer_id), dumps(record), now + 10))

    assert announce(member, issue_certificate(authority, RUN, member.peer_id, issued=now))
    assert not announce(sybil, None)
    assert not announce(sybil, issue_certificate(sybil, RUN, sybil.peer_id, issued=now))  # self-signed
    assert not announce(sybil, issue_certificate(authority, RUN, member.peer_id, issued=now))  # borrowed
    listed = issue_revocations(authority, RUN, [sybil.peer_id], serial=7, issued=now)
    forged = issue_revocations(sybil, RUN, [member.peer_id], serial=8, issued=now)
    assert validator.validate(DHTRecord(revoked_key, dumps("7"), dumps(listed), now + 60))
    assert not validator.validate(DHTRecord(revoked_key, dumps("8"), dumps(forged), now + 60))
    assert not validator.validate(DHTRecord(revoked_key, dumps("9"), dumps(listed), now + 60))  # wrong serial
    assert not validator.validate(
        DHTRecord(revoked_key, DHTProtocol.IS_REGULAR_VALUE, dumps(listed), now + 60)
    )
