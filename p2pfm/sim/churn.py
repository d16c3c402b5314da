"""Availability processes: when each simulated peer is online.

A model answers two questions for the engine, always drawing from the churn RNG it was
given (so a run replays from its seed):

- :meth:`Availability.initial_online` -- is peer i online at t = 0?
- :meth:`Availability.next_change` -- when does peer i next flip (leave if online, join if
  offline)? ``None`` = never. Called once per transition, so models are lazy and cheap.

The ``fraction`` model is driven by rounds instead: :meth:`Availability.round_events` returns
the leave/join times it schedules at each round boundary.
"""

from __future__ import annotations

import math

import numpy as np

from p2pfm.sim.scenario import ChurnConfig
from p2pfm.sim.traces import Trace


class Availability:
    """No churn: everybody online for the whole run."""

    def initial_online(self, peer: int) -> bool:
        return True

    def next_change(self, peer: int, now: float, online: bool) -> float | None:
        return None

    def round_events(
        self, round: int, now: float, round_seconds: float, online: np.ndarray
    ) -> list[tuple[float, int, bool]]:
        """(time, peer, goes_online) transitions scheduled at the start of ``round``."""
        return []


class ExponentialChurn(Availability):
    """Alternating sessions: Exp(mean online) online, Exp(mean offline) offline; starts stationary."""

    def __init__(self, config: ChurnConfig, rng: np.random.Generator) -> None:
        self.on = config.mean_online_s
        self.off = config.mean_offline_s
        self.rng = rng

    def initial_online(self, peer: int) -> bool:
        return bool(self.rng.random() < self.on / (self.on + self.off))

    def next_change(self, peer: int, now: float, online: bool) -> float | None:
        return now + float(self.rng.exponential(self.on if online else self.off))


class DiurnalChurn(Availability):
    """Online probability by local hour; sessions of mean ``mean_session_s`` (scaled with the day).

    Offline gaps are drawn with mean ``session * (1 - p) / p`` for p at the current local
    hour, so the long-run online fraction at each hour follows the curve.
    """

    def __init__(self, config: ChurnConfig, peers: int, rng: np.random.Generator) -> None:
        self.curve = np.asarray(config.diurnal_curve, dtype=np.float64)
        self.day = config.day_length_s
        self.session = config.mean_session_s * config.day_length_s / 86400.0
        self.offsets = rng.uniform(0.0, float(config.timezone_spread_h), size=peers)  # hours east of UTC
        self.rng = rng

    def probability(self, peer: int, now: float) -> float:
        """Online probability for this peer's local time (linear between hourly points)."""
        hour = (now / self.day * 24.0 + self.offsets[peer]) % 24.0
        low = int(hour)
        frac = hour - low
        return float((1 - frac) * self.curve[low] + frac * self.curve[(low + 1) % 24])

    def initial_online(self, peer: int) -> bool:
        return bool(self.rng.random() < self.probability(peer, 0.0))

    def next_change(self, peer: int, now: float, online: bool) -> float | None:
        if online:
            return now + float(self.rng.exponential(self.session))
        p = self.probability(peer, now)
        return now + float(self.rng.exponential(self.session * (1.0 - p) / p))


class TraceChurn(Availability):
    """Replays a trace; peer i follows device i mod D (round-robin)."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace

    def initial_online(self, peer: int) -> bool:
        return any(start <= 0.0 < end for start, end in self.trace.for_peer(peer))

    def next_change(self, peer: int, now: float, online: bool) -> float | None:
        for start, end in self.trace.for_peer(peer):
            if online and start <= now < end:
                return end
            if not online and start >= now:
                return start
        return None


class FractionChurn(Availability):
    """Every ``every_rounds`` rounds, ``fraction`` of all peers leave and later rejoin.

    Departures fall at uniform random times inside the window (so some die mid-computation
    or with messages in flight); each departed peer rejoins ``offline_rounds`` rounds after it
    left (default: one window), with the state it had when it left.
    """

    def __init__(self, config: ChurnConfig, peers: int, rng: np.random.Generator) -> None:
        self.fraction = config.fraction
        self.every = config.every_rounds
        self.offline_rounds = config.offline_rounds or config.every_rounds
        self.peers = peers
        self.rng = rng

    def round_events(
        self, round: int, now: float, round_seconds: float, online: np.ndarray
    ) -> list[tuple[float, int, bool]]:
        if round == 0 or round % self.every or self.fraction <= 0:
            return []
        count = int(math.floor(self.fraction * self.peers + 0.5))
        candidates = np.flatnonzero(online)
        count = min(count, candidates.size)
        if count == 0:
            return []
        leaving = np.sort(self.rng.choice(candidates, size=count, replace=False))
        window = self.every * round_seconds
        times = now + self.rng.uniform(0.0, window, size=count)
        back = self.offline_rounds * round_seconds
        events = []
        for peer, t in zip(leaving.tolist(), times.tolist(), strict=True):
            events.append((t, peer, False))
            events.append((t + back, peer, True))
        return events


def build_availability(
    config: ChurnConfig, peers: int, rng: np.random.Generator, trace: Trace | None = None
) -> Availability:
    if config.model == "none":
        return Availability()
    if config.model == "exponential":
        return ExponentialChurn(config, rng)
    if config.model == "diurnal":
        return DiurnalChurn(config, peers, rng)
    if config.model == "fraction":
        return FractionChurn(config, peers, rng)
    if trace is None:
        raise ValueError("the trace churn model needs a parsed trace")
    return TraceChurn(trace)
