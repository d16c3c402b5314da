"""Rate limits: token buckets per sender, in bounded memory. Pure: callers pass ``now``.

A peer answers three kinds of request from others, and each costs it something: an update
costs a decode (and a slot in the round's inbox), a parameter pull an encode of the whole
model, a state download the whole snapshot on the wire. Without limits one stranger made a
peer accept 500 updates a second and fetched its 12.5 MB state for a 219-byte request, as
often as it liked. :class:`RateLimiter` gives every sender a bucket of ``burst`` tokens that
refills at ``rate`` per second; a request without a token is refused (``rate_limited``,
an ignore: an honest peer over its budget is not punished, only slowed).

Memory is bounded (``max_senders``; the least recently seen are forgotten, which at worst
hands a forgotten sender a fresh burst), so a flood of fresh identities cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from p2pfm.config import require
from p2pfm.core.errors import RateLimited


@dataclass(frozen=True)
class RateLimits:
    """Budgets per sender. Defaults leave honest peers far below them (one update per partner
    per round, a parameter pull every few rounds, a state download when joining)."""

    updates_per_s: float = 20.0  # per sender; honest: fanout / round time, well under 1/s
    update_burst: float = 40.0
    requests_per_s: float = 0.2  # state downloads and parameter pulls per sender (one per 5 s)
    request_burst: float = 3.0
    max_inflight_bytes: int = 256 << 20  # incoming gossip frames being read or checked, all senders
    max_streams_per_sender: int = 4  # concurrent incoming streams per transport id
    max_senders: int = 4096  # buckets remembered

    def __post_init__(self) -> None:
        for name in ("updates_per_s", "update_burst", "requests_per_s", "request_burst"):
            require(getattr(self, name) > 0, f"limits.{name}", "must be positive")
        require(self.max_inflight_bytes >= 1 << 16, "limits.max_inflight_bytes", "must be at least 64 KiB")
        require(self.max_streams_per_sender >= 1, "limits.max_streams_per_sender", "must be at least 1")
        require(self.max_senders >= 16, "limits.max_senders", "must be at least 16")


class RateLimiter:
    """One token bucket per sender: ``rate`` tokens a second up to ``burst``."""

    def __init__(self, rate: float, burst: float, max_senders: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_senders = max_senders
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # sender -> (tokens, at)
        self.refused = 0

    def allow(self, sender: str, now: float, cost: float = 1.0) -> bool:
        tokens, at = self._buckets.pop(sender, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        else:
            self.refused += 1
        self._buckets[sender] = (tokens, max(at, now))
        while len(self._buckets) > self.max_senders:
            self._buckets.popitem(last=False)
        return allowed

    def check(self, sender: str, now: float, what: str = "message") -> None:
        """[IGNORE] RATE_LIMITED if ``sender`` is over its budget."""
        if not self.allow(sender, now):
            raise RateLimited(
                f"{sender} is over its budget of {self.rate:g} {what}s/s (burst {self.burst:g})"
            )
