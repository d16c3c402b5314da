"""Announcements: what a peer tells the swarm about itself, how a reader checks it, and the book
of live peers merged from them.

A peer stores one signed ``announce`` envelope under the run's DHT key, with its peer id as
subkey, refreshed every heartbeat. :func:`check_announcement` is the reader's rule (tagged
in ``protocols/wire.md`` section 6.5); :class:`PeerBook` turns many lookups into one monotone
view of who is live. Both are pure: the driver passes records and clocks in.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfm.core.envelope import EnvelopeLimits, open_envelope
from p2pfm.core.errors import BadRound, Malformed, SubkeyMismatch, WrongKind
from p2pfm.core.gossip import MAX_ROUND


@dataclass(frozen=True)
class Announcement:
    """A verified announcement of a live peer, as read from the DHT."""

    peer_id: str
    public_key: bytes
    libp2p_id: str
    maddrs: tuple[str, ...]
    round: int
    model_hash: bytes
    device_class: str  # energy profile name (laptop, phone...), not a torch device
    power_w: float
    state_bytes: int
    seq: int
    timestamp: float
    sees: tuple[str, ...] = ()  # libp2p ids the sender sees (the start-up quorum's handshake)
    cert: bytes | None = None  # the swarm authority's certificate for the sender (admitted swarms)
    paused: str | None = None  # why its energy policy paused it; None = training

    @property
    def training(self) -> bool:
        """Not paused: a candidate partner, donor and quorum member."""
        return self.paused is None

    # Energy totals since the sender's process started (p2pfm.energy.report builds swarm reports).
    energy_wh: float | None = None
    marginal_wh: float | None = None
    tokens: int | None = None
    energy_source: str | None = None
    grid_g_per_kwh: float | None = None


def announcement_limits(limits: EnvelopeLimits, ttl_s: float) -> EnvelopeLimits:
    """Records are re-read for up to a TTL after signing: allow that age on top of the clock skew."""
    return EnvelopeLimits(
        max_bytes=limits.max_bytes,
        max_clock_skew_s=limits.max_clock_skew_s + ttl_s,
        replay_window_s=max(limits.replay_window_s, limits.max_clock_skew_s + ttl_s),
    )


def check_announcement(
    subkey: object, record: object, *, run_id: str, now: float, limits: EnvelopeLimits
) -> Announcement:
    """A DHT record under the swarm's key, checked; raises a Reject subclass naming the problem.

    Rules (``protocols/wire.md`` section 6.5):
    [REJECT] MALFORMED if the record is not bytes; then every envelope rule (no replay guard:
    records are re-read on every lookup); [REJECT] WRONG_KIND unless the kind is ``announce``;
    [REJECT] SUBKEY_MISMATCH unless the subkey is the signer's peer id (nobody can speak for
    another peer); [REJECT] BAD_ROUND if the announced round exceeds ``MAX_ROUND``. ``limits`` should come from :func:`announcement_limits`.
    """
    if not isinstance(record, bytes):
        raise Malformed(f"announcement record is {type(record).__name__}, not bytes")
    envelope = open_envelope(record, run_id=run_id, now=now, limits=limits)
    if envelope.kind != "announce":
        raise WrongKind(f"record of kind {envelope.kind!r} where an announcement belongs")
    if subkey != envelope.sender_id:
        raise SubkeyMismatch(f"record under subkey {subkey!r} is signed by {envelope.sender_id}")
    p = envelope.payload
    if p["round"] > MAX_ROUND:
        raise BadRound(f"announcement claims round {p['round']}, beyond any run (max {MAX_ROUND})")
    return Announcement(
        peer_id=envelope.sender_id,
        public_key=envelope.sender,
        libp2p_id=p["libp2p_id"],
        maddrs=tuple(p["maddrs"]),
        round=p["round"],
        model_hash=p["model_hash"],
        device_class=p["device_class"],
        power_w=p["power_w"],
        state_bytes=p["state_bytes"],
        seq=envelope.seq,
        timestamp=envelope.timestamp,
        sees=tuple(p.get("sees", ())),
        cert=p.get("cert"),
        paused=p.get("paused"),
        energy_wh=p.get("energy_wh"),
        marginal_wh=p.get("marginal_wh"),
        tokens=p.get("tokens"),
        energy_source=p.get("energy_source"),
        grid_g_per_kwh=p.get("grid_g_per_kwh"),
    )


class PeerBook:
    """What we know of the swarm, merged over DHT lookups: the newest announcement per peer.

    A peer is live while its newest announcement is younger than the TTL and lists addresses;
    a tombstone (no addresses) or an expired record removes it. Merging makes discovery
    monotone: one partial lookup cannot make live peers vanish.
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._known: dict[str, Announcement] = {}
        self._suspects: dict[str, tuple[float, int]] = {}
        self._lost: dict[str, Announcement] = {}  # expired without a tombstone, kept for re-dialing
        self._first_seen: dict[str, int] = {}  # merge order at which we met this life of the peer
        self._merges = 0

    def merge(self, found: dict[str, Announcement]) -> None:
        self._merges += 1
        for peer_id, announcement in found.items():
            self._lost.pop(peer_id, None)
            known = self._known.get(peer_id)
            if known is None or (announcement.timestamp, announcement.seq) > (known.timestamp, known.seq):
                if known is None or known.libp2p_id != announcement.libp2p_id:  # new, or restarted
                    self._first_seen[peer_id] = self._merges
                self._known[peer_id] = announcement

    def known(self) -> dict[str, Announcement]:
        """Every peer whose newest announcement we hold (live, suspected or tombstoned, not expired)."""
        return dict(self._known)

    def forget(self, peer_id: str) -> None:
        """Drop a peer entirely (its admission was revoked)."""
        for table in (self._known, self._suspects, self._lost, self._first_seen):
            table.pop(peer_id, None)

    def first_seen(self) -> dict[str, int]:
        """Live-or-known peer id -> when (in merges) we first met its current process."""
        return {p: self._first_seen[p] for p in self._known}

    def suspect(self, peer_id: str) -> None:
        """A call to this peer failed: treat it as gone until it announces again (heartbeats
        come every few seconds), instead of waiting out its record's TTL."""
        known = self._known.get(peer_id)
        if known is not None:
            self._suspects[peer_id] = (known.timestamp, known.seq)

    def lost(self) -> dict[str, Announcement]:
        """Peers whose records expired without a tombstone: maybe dead, maybe behind a partition."""
        return dict(self._lost)

    def live(self, now: float) -> dict[str, Announcement]:
        for peer_id in [p for p, a in self._known.items() if a.timestamp + self.ttl_s < now]:
            if self._known[peer_id].maddrs:
                self._lost[peer_id] = self._known[peer_id]
            del self._known[peer_id]
            self._suspects.pop(peer_id, None)
            self._first_seen.pop(peer_id, None)
        return {
            p: a
            for p, a in self._known.items()
            if a.maddrs and (a.timestamp, a.seq) > self._suspects.get(p, (float("-inf"), -1))
        }
