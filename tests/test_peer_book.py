"""The peer book: newest announcement per peer wins; tombstones, expiry and suspicion hide peers."""

from __future__ import annotations

import dataclasses

import pytest

from p2pfm.core.announce import Announcement, PeerBook

TTL = 15.0


def announcement(
    peer_id: str = "a",
    *,
    timestamp: float = 100.0,
    seq: int = 1,
    maddrs=("/ip4/1.2.3.4/tcp/1",),
    round: int = 0,
) -> Announcement:
    return Announcement(
        peer_id=peer_id,
        public_key=b"k" * 32,
        libp2p_id=f"12D3Koo{peer_id}",
        maddrs=tuple(maddrs),
        round=round,
        model_hash=b"h" * 32,
        device_class="cpu-host",
        power_w=15.0,
        state_bytes=1000,
        seq=seq,
        timestamp=timestamp,
    )


def book_with(*announcements: Announcement) -> PeerBook:
    book = PeerBook(ttl_s=TTL)
    for item in announcements:
        book.merge({item.peer_id: item})
    return book


def test_empty_book_has_no_live_peers():
    """Nothing merged, nobody live."""
    assert PeerBook(ttl_s=TTL).live(now=0.0) == {}


def test_merged_peer_is_live():
    """A fresh announcement with addresses makes its peer live."""
    item = announcement("a")
    assert book_with(item).live(now=101.0) == {"a": item}


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        ((100.0, 1), (101.0, 2), "second"),  # newer timestamp wins
        ((101.0, 2), (100.0, 1), "first"),  # an older lookup cannot roll back
        ((100.0, 1), (100.0, 2), "second"),  # same timestamp: higher seq wins
        ((100.0, 2), (100.0, 1), "first"),
        ((100.0, 9), (101.0, 1), "second"),  # timestamp first, then seq (restart resets seq)
        ((100.0, 1), (100.0, 1), "first"),  # an exact repeat keeps the first
    ],
)
def test_merge_keeps_newest_by_timestamp_then_seq(first, second, winner):
    """The announcement with the larger (timestamp, seq) is kept, whatever order lookups arrive in."""
    a = announcement("a", timestamp=first[0], seq=first[1], round=1)
    b = announcement("a", timestamp=second[0], seq=second[1], round=2)
    book = book_with(a, b)
    assert book.live(now=105.0)["a"] is (a if winner == "first" else b)


def test_partial_lookup_does_not_remove_known_peers():
    """A lookup that misses a peer keeps it (merging is monotone)."""
    book = book_with(announcement("a"), announcement("b"))
    book.merge({"c": announcement("c")})
    assert set(book.live(now=101.0)) == {"a", "b", "c"}


def test_merge_accepts_several_peers_at_once():
    """One lookup result with several peers adds them all."""
    book = PeerBook(ttl_s=TTL)
    book.merge({p: announcement(p) for p in ("x", "y", "z")})
    assert set(book.live(now=100.0)) == {"x", "y", "z"}


def test_tombstone_removes_peer_from_live():
    """A newer announcement without addresses (graceful leave) removes the peer."""
    book = book_with(announcement("a", seq=1), announcement("b"))
    book.merge({"a": announcement("a", timestamp=101.0, seq=2, maddrs=())})
    assert set(book.live(now=102.0)) == {"b"}


def test_older_tombstone_does_not_remove_a_newer_live_announcement():
    """A stale tombstone from a previous run cannot hide a peer that announced since."""
    book = book_with(announcement("a", timestamp=110.0, seq=1))
    book.merge({"a": announcement("a", timestamp=100.0, seq=5, maddrs=())})
    assert set(book.live(now=111.0)) == {"a"}


def test_peer_returns_after_tombstone_with_newer_announcement():
    """A peer that left and rejoined is live again."""
    book = book_with(announcement("a", timestamp=100.0), announcement("a", timestamp=101.0, seq=2, maddrs=()))
    assert book.live(now=101.0) == {}
    back = announcement("a", timestamp=120.0, seq=1)
    book.merge({"a": back})
    assert book.live(now=121.0) == {"a": back}


def test_announcement_expires_after_ttl():
    """A peer whose newest announcement is older than the TTL is gone."""
    book = book_with(announcement("a", timestamp=100.0), announcement("b", timestamp=110.0))
    assert set(book.live(now=100.0 + TTL)) == {"a", "b"}  # exactly at the TTL: still live
    assert set(book.live(now=100.0 + TTL + 0.01)) == {"b"}
    assert set(book.live(now=110.0 + TTL + 0.01)) == set()


def test_expired_peer_is_forgotten_so_an_older_record_can_return():
    """Expiry deletes the record: a later merge of any announcement is taken as new."""
    book = book_with(announcement("a", timestamp=100.0, seq=3))
    assert book.live(now=200.0) == {}
    old = announcement("a", timestamp=195.0, seq=1)
    book.merge({"a": old})
    assert book.live(now=200.0) == {"a": old}


def test_heartbeats_keep_a_peer_live():
    """Refreshed announcements keep a peer live past the first record's TTL."""
    book = PeerBook(ttl_s=TTL)
    for beat in range(10):
        book.merge({"a": announcement("a", timestamp=100.0 + 4 * beat, seq=beat + 1)})
        assert "a" in book.live(now=100.0 + 4 * beat + 1)


def test_suspect_hides_peer_until_newer_announcement():
    """After a failed call the peer is hidden; its next heartbeat brings it back."""
    book = book_with(announcement("a", timestamp=100.0, seq=1), announcement("b"))
    book.suspect("a")
    assert set(book.live(now=101.0)) == {"b"}
    # the same (or an older) announcement merged again does not clear the suspicion
    book.merge({"a": announcement("a", timestamp=100.0, seq=1)})
    book.merge({"a": announcement("a", timestamp=99.0, seq=7)})
    assert set(book.live(now=101.0)) == {"b"}
    # a newer one does
    fresh = announcement("a", timestamp=104.0, seq=2)
    book.merge({"a": fresh})
    assert book.live(now=105.0)["a"] is fresh


def test_suspect_with_same_timestamp_cleared_by_higher_seq():
    """A re-announcement in the same second (higher seq) clears suspicion."""
    book = book_with(announcement("a", timestamp=100.0, seq=1))
    book.suspect("a")
    book.merge({"a": announcement("a", timestamp=100.0, seq=2)})
    assert "a" in book.live(now=100.5)


def test_suspect_unknown_peer_is_harmless():
    """Suspecting a peer we never heard of changes nothing, and it is live once it announces."""
    book = PeerBook(ttl_s=TTL)
    book.suspect("ghost")
    item = announcement("ghost")
    book.merge({"ghost": item})
    assert book.live(now=100.0) == {"ghost": item}


def test_suspicion_is_dropped_with_expiry():
    """An expired suspect is forgotten entirely; a later (even older-stamped) record is live again."""
    book = book_with(announcement("a", timestamp=100.0, seq=5))
    book.suspect("a")
    assert book.live(now=200.0) == {}
    again = announcement("a", timestamp=190.0, seq=1)
    book.merge({"a": again})
    assert book.live(now=200.0) == {"a": again}


def test_live_returns_a_copy():
    """Mutating the returned dict does not change the book."""
    book = book_with(announcement("a"))
    book.live(now=100.0).clear()
    assert "a" in book.live(now=100.0)


def test_announcements_are_frozen():
    """Announcement is immutable: merged records cannot be altered behind the book's back."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        announcement("a").round = 5  # type: ignore[misc]


def test_first_seen_orders_peers_by_when_we_met_them():
    """A peer met in a later lookup is newer; a heartbeat of a known peer does not renew it."""
    book = book_with(announcement("a", timestamp=100.0))
    book.merge({"b": announcement("b", timestamp=101.0)})
    book.merge({"a": announcement("a", timestamp=102.0, seq=2)})
    seen = book.first_seen()
    assert seen["b"] > seen["a"]


def test_first_seen_renews_for_a_restarted_peer():
    """A newer announcement with another libp2p id is a new process of the peer: met anew."""
    book = book_with(announcement("a", timestamp=100.0), announcement("b", timestamp=100.0))
    restarted = dataclasses.replace(announcement("a", timestamp=105.0, seq=1), libp2p_id="12D3KooNEW")
    book.merge({"a": restarted})
    seen = book.first_seen()
    assert seen["a"] > seen["b"]


def test_announcement_sees_defaults_to_empty():
    """Announcements from peers that list nobody (or older peers) carry an empty ``sees``."""
    assert announcement("a").sees == ()
