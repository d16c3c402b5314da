"""The start-up quorum: a peer that expects partners trains only once they can hear it.

Why a handshake and not a head count: "I see N peers in the DHT" says nothing about whether
*they* see *us*. A peer that counted others and started at once could run its whole job
before its partners' next lookup found it, pushing into peers that never push back (the
library example did exactly that: one peer ran 30 rounds in a second and left while the
other still waited for it). So every announcement lists the libp2p ids of the peers its
sender currently sees (``sees``), and a joining peer counts a partner as *confirmed* only
when that partner's newest announcement lists our current libp2p id: from then on the
partner pushes to us, and we to it. libp2p ids are fresh per process start, so a restarted
peer is not confirmed by a stale record of its previous life.

Pure: the daemon feeds announcements in and gets a :class:`QuorumView` out; the
simulator's peers are always mutually visible and never wait.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAX_SEES = 64
"""Peers listed in one announcement's ``sees`` (the newest first: joiners are who need it)."""


@dataclass(frozen=True)
class QuorumView:
    """Where a joining peer stands: whom it sees, who sees it back, how many it needs."""

    need: int  # peers including ourselves before we train
    seen: tuple[str, ...]  # peer ids we see live
    confirmed: tuple[str, ...]  # of those, the ones whose announcement lists our libp2p id

    @property
    def have(self) -> int:
        """Peers that can hear each other with us, ourselves included."""
        return 1 + len(self.confirmed)

    @property
    def ready(self) -> bool:
        return self.have >= self.need

    @property
    def unconfirmed(self) -> tuple[str, ...]:
        """Peers we see that do not see us yet: who we are waiting for."""
        return tuple(p for p in self.seen if p not in self.confirmed)

    def as_status(self) -> dict[str, object]:
        """The view for status.json and metrics (JSON types)."""
        return {
            "need": self.need,
            "have": self.have,
            "seen": list(self.seen),
            "confirmed": list(self.confirmed),
            "unconfirmed": list(self.unconfirmed),
        }

    def describe(self) -> str:
        """One log line: who we have and whom we wait for."""
        waiting = ", ".join(self.unconfirmed) or "nobody seen yet"
        missing = max(0, self.need - self.have)
        return (
            f"have {self.have} of {self.need} peers (us + {', '.join(self.confirmed) or 'no one'}), "
            f"waiting for {missing} more; seen but not yet hearing us: {waiting}"
        )


def quorum_view(my_libp2p_id: str, sees_by_peer: Mapping[str, Iterable[str]], need: int) -> QuorumView:
    """``sees_by_peer``: live peer id -> the libp2p ids its newest announcement lists."""
    seen = tuple(sorted(sees_by_peer))
    confirmed = tuple(p for p in seen if my_libp2p_id in set(sees_by_peer[p]))
    return QuorumView(need=max(1, need), seen=seen, confirmed=confirmed)


def peers_to_list(
    first_seen: Mapping[str, float], libp2p_ids: Mapping[str, str], limit: int = MAX_SEES
) -> list[str]:
    """The libp2p ids our announcement lists: of the peers in ``libp2p_ids`` (the live ones), the
    most recently first-seen first, at most ``limit`` (a peer that just joined is the one waiting
    for confirmation; long-known peers trained past their quorum long ago)."""
    newest_first = sorted(libp2p_ids, key=lambda p: (-first_seen.get(p, 0), p))
    return [libp2p_ids[p] for p in newest_first][:limit]
