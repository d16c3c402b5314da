"""Who we still listen to: per-sender scores with decay, bans with a cool-down, in bounded memory.

The policy, shared by every driver: each :class:`~p2pfm.core.errors.Reject` from a sender adds
one to its score; an :class:`~p2pfm.core.errors.Ignore` does not (an honest laggard's stale
update is no offence). Scores decay (half-life ``half_life_s``), so an honest peer's rare bad
message (a bit flip, a clock jump) is forgotten. A sender whose score reaches ``ban_after`` is
banned for ``ban_s``, doubling with each repeat ban (at most a day); its messages are dropped
unread (counted as ignored, reason ``banned``). After a ban the score restarts at half the
threshold: a repeat offender is banned again sooner.

Senders are named by what a message can vouch for: the Ed25519 peer id once a signature has
verified (an identity that costs a certificate in an admitted swarm), else the transport's id
(the libp2p peer id of the stream, free to mint: bounded by rate limits instead). Memory is
bounded: at most ``max_tracked`` senders are remembered; when full, the lowest scores are
forgotten first, never a banned sender ahead of an unbanned one. Pure: callers pass ``now``.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from p2pfm.core.errors import Refusal

BAN_AFTER_REJECTIONS = 50  # a sender whose messages keep failing checks is dropped unread
SCORE_HALF_LIFE_S = 600.0  # a rejection's weight halves every ten minutes
BAN_S = 600.0  # first ban: ten minutes; each repeat doubles it
MAX_BAN_S = 86_400.0
MAX_TRACKED_SENDERS = 4096  # bound on remembered offenders


@dataclass
class _Record:
    score: float = 0.0
    at: float = 0.0  # when ``score`` was last brought up to date
    banned_until: float = float("-inf")
    bans: int = 0


@dataclass
class Scoreboard:
    """Scores and bans per sender, and refusal counts by reason (for metrics)."""

    ban_after: int = BAN_AFTER_REJECTIONS
    half_life_s: float = SCORE_HALF_LIFE_S
    ban_s: float = BAN_S
    max_tracked: int = MAX_TRACKED_SENDERS
    rejections: Counter[str] = field(default_factory=Counter)  # rejected messages per sender, all time
    rejected: Counter[str] = field(default_factory=Counter)  # by RejectReason value
    ignored: Counter[str] = field(default_factory=Counter)  # by IgnoreReason value
    bans_decided: int = 0
    decisions: deque[tuple[str, str, float]] = field(default_factory=lambda: deque(maxlen=256))
    """Bans not yet reported: (sender, the reason of the last straw, ban length in s); drivers log them once."""
    _records: dict[str, _Record] = field(default_factory=dict)

    def _decayed(self, record: _Record, now: float) -> float:
        if now <= record.at or self.half_life_s <= 0:
            return record.score
        return record.score * 0.5 ** ((now - record.at) / self.half_life_s)

    def score(self, sender: str, now: float) -> float:
        record = self._records.get(sender)
        return 0.0 if record is None else self._decayed(record, now)

    def is_banned(self, sender: str, now: float) -> bool:
        record = self._records.get(sender)
        return record is not None and now < record.banned_until

    def ban(self, sender: str, now: float) -> float:
        """Ban ``sender`` from ``now``; returns the ban's length (doubling with each repeat)."""
        record = self._records.setdefault(sender, _Record(at=now))
        length = min(self.ban_s * 2.0**record.bans, MAX_BAN_S)
        record.bans += 1
        record.banned_until = now + length
        record.score, record.at = self.ban_after / 2.0, now + length  # restarts at half when the ban ends
        self.bans_decided += 1
        self._bound(keep=sender, now=now)
        return length

    def note(self, sender: str, refusal: Refusal, now: float) -> bool:
        """Count a refusal of ``sender``'s message; True if this one got the sender banned."""
        if not refusal.lowers_score:
            self.ignored[refusal.reason.value] += 1
            return False
        self.rejected[refusal.reason.value] += 1
        self.rejections[sender] += 1
        if len(self.rejections) > self.max_tracked:  # all-time counts are for reports: keep the worst
            del self.rejections[min(self.rejections, key=self.rejections.__getitem__)]
            self.rejections[sender] = max(self.rejections[sender], 1)
        if self.is_banned(sender, now):
            return False
        record = self._records.setdefault(sender, _Record(at=now))
        record.score = self._decayed(record, now) + 1.0
        record.at = max(record.at, now)
        self._bound(keep=sender, now=now)
        if record.score > self.ban_after - 0.5:  # "reaches": decay over the burst must not spare it
            self.decisions.append((sender, refusal.reason.value, self.ban(sender, now)))
            return True
        return False

    def take_decisions(self) -> list[tuple[str, str, float]]:
        """The bans decided since the last call (each reported once)."""
        taken = list(self.decisions)
        self.decisions.clear()
        return taken

    def note_banned(self) -> None:
        """A banned sender's message was dropped unread."""
        self.ignored["banned"] += 1

    def _bound(self, keep: str, now: float) -> None:
        while len(self._records) > self.max_tracked:
            victim = min(
                (s for s in self._records if s != keep),
                key=lambda s: (self.is_banned(s, now), self._decayed(self._records[s], now)),
            )
            del self._records[victim]

    def banned(self, now: float) -> int:
        return sum(1 for record in self._records.values() if now < record.banned_until)
