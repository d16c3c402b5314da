"""Who we still listen to: per-sender rejection counts and bans, in bounded memory.

The policy is one rule, shared by every driver: each :class:`~p2pfm.core.errors.Reject`
from a sender lowers its score by one; an :class:`~p2pfm.core.errors.Ignore` does not (an
honest laggard's stale update is no offence). A sender with ``ban_after`` rejections is
banned: its messages are dropped unread (and counted as ignored, reason ``banned``) for the
rest of the process's life.

Senders are whatever the transport can vouch for before a message is opened (the daemon
uses the libp2p peer id of the stream). Memory is bounded: at most ``max_tracked`` senders
with a non-zero score are remembered; when full, the least-offending ones are forgotten
first, never a banned one ahead of an unbanned one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from p2pfm.core.errors import Refusal

BAN_AFTER_REJECTIONS = 50  # a sender whose messages keep failing checks is dropped unread
MAX_TRACKED_SENDERS = 4096  # bound on remembered offenders


@dataclass
class Scoreboard:
    """Rejections per sender, bans, and refusal counts by reason (for metrics)."""

    ban_after: int = BAN_AFTER_REJECTIONS
    max_tracked: int = MAX_TRACKED_SENDERS
    rejections: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)  # by RejectReason value
    ignored: Counter[str] = field(default_factory=Counter)  # by IgnoreReason value

    def is_banned(self, sender: str) -> bool:
        return self.rejections.get(sender, 0) >= self.ban_after

    def note(self, sender: str, refusal: Refusal) -> bool:
        """Count a refusal of ``sender``'s message; True if this one got the sender banned."""
        if not refusal.lowers_score:
            self.ignored[refusal.reason.value] += 1
            return False
        self.rejected[refusal.reason.value] += 1
        before = self.rejections.get(sender, 0)
        self.rejections[sender] = before + 1
        if len(self.rejections) > self.max_tracked:
            self._forget_one(keep=sender)
        return before + 1 == self.ban_after

    def note_banned(self) -> None:
        """A banned sender's message was dropped unread."""
        self.ignored["banned"] += 1

    def _forget_one(self, keep: str) -> None:
        victim = min((s for s in self.rejections if s != keep), key=lambda s: self.rejections[s])
        del self.rejections[victim]

    @property
    def banned(self) -> int:
        return sum(1 for count in self.rejections.values() if count >= self.ban_after)
