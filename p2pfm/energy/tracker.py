"""Per-peer energy accounting: training windows over a meter, an idle baseline, tokens, carbon.

Two views, side by side (BRIEF s7):

- **attributable**: what the device spent while this peer trained (the meter's joules inside
  training windows: local steps, gossip, catch-up). Idle power during those windows is in it.
- **marginal**: attributable minus the device's idle baseline over the same windows: the
  energy that would not have been spent without p2pfm on a device that is on anyway.

The idle baseline is measured once at start-up, before training (a short bounded window,
``energy.idle_measure_s``), when the meter is a real counter; with the modelled meter it is
the profile's ``idle_w`` (measuring a model would only measure the model). Windows are
explicit (:meth:`EnergyTracker.start` / :meth:`EnergyTracker.stop`, or ``with window()``),
so a policy that pauses a peer simply leaves its paused time outside every window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from p2pfm.energy.meters import Meter

JOULES_PER_WH = 3600.0
MAX_IDLE_MEASURE_S = 30.0


def carbon_g(energy_wh: float, grid_g_per_kwh: float) -> float:
    return energy_wh / 1000.0 * grid_g_per_kwh


@dataclass(frozen=True)
class EnergyTotals:
    """One peer's totals since its process started (the figures records, status and announcements carry)."""

    energy_wh: float  # attributable
    marginal_wh: float  # above the idle baseline
    carbon_g: float
    marginal_carbon_g: float
    tokens: int
    j_per_token: float | None  # attributable joules per trained token (None before any token)
    marginal_j_per_token: float | None
    training_s: float  # wall seconds inside training windows
    idle_w: float  # the baseline used for the marginal view
    idle_source: str  # "measured" (a counter, at start-up) or "profile"
    energy_source: str  # the meter's source: measured:rapl, measured:nvml, modelled:profile...
    grid_g_per_kwh: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EnergyTracker:
    """Sums a meter's joules over training windows; see the module docstring for the two views."""

    def __init__(
        self,
        meter: Meter,
        *,
        grid_g_per_kwh: float,
        idle_w: float,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.meter = meter
        self.grid_g_per_kwh = grid_g_per_kwh
        self.idle_w = idle_w
        self.idle_source = "profile"
        self._wall = wall_clock
        self._joules = 0.0
        self._seconds = 0.0
        self._open: tuple[float, float] | None = None  # (joules, wall) at the window's start
        self.tokens = 0

    @property
    def measured(self) -> bool:
        return self.meter.source.startswith("measured:")

    # --- idle baseline -------------------------------------------------------------------------
    def _idle_begin(self) -> tuple[float, float]:
        return self.meter.read_joules(), self._wall()

    def _idle_end(self, begun: tuple[float, float]) -> float:
        joules, wall = self.meter.read_joules() - begun[0], self._wall() - begun[1]
        if wall > 0:
            self.idle_w, self.idle_source = max(joules, 0.0) / wall, "measured"
        return self.idle_w

    def measure_idle(self, seconds: float, sleep: Callable[[float], None] = time.sleep) -> float:
        """Idle power (W) over ``seconds`` (at most 30) of doing nothing; only for a measured meter."""
        if not self.measured or seconds <= 0:
            return self.idle_w
        begun = self._idle_begin()
        sleep(min(seconds, MAX_IDLE_MEASURE_S))
        return self._idle_end(begun)

    async def measure_idle_async(self, seconds: float) -> float:
        """:meth:`measure_idle` on an event loop (the loop keeps running, we do nothing else)."""
        if not self.measured or seconds <= 0:
            return self.idle_w
        begun = self._idle_begin()
        await asyncio.sleep(min(seconds, MAX_IDLE_MEASURE_S))
        return self._idle_end(begun)

    # --- training windows ----------------------------------------------------------------------
    def start(self) -> None:
        """Open a training window (no-op if one is open)."""
        if self._open is None:
            self._open = (self.meter.read_joules(), self._wall())

    def stop(self) -> None:
        """Close the open training window (no-op if none is open)."""
        if self._open is not None:
            joules, wall = self._open
            self._joules += max(self.meter.read_joules() - joules, 0.0)
            self._seconds += max(self._wall() - wall, 0.0)
            self._open = None

    @contextmanager
    def window(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()

    def add_tokens(self, tokens: int) -> None:
        self.tokens += max(int(tokens), 0)

    def totals(self) -> EnergyTotals:
        """Totals so far (an open window counts up to now)."""
        joules, seconds = self._joules, self._seconds
        if self._open is not None:
            joules += max(self.meter.read_joules() - self._open[0], 0.0)
            seconds += max(self._wall() - self._open[1], 0.0)
        marginal = max(joules - self.idle_w * seconds, 0.0)
        wh, marginal_wh = joules / JOULES_PER_WH, marginal / JOULES_PER_WH
        return EnergyTotals(
            energy_wh=wh, marginal_wh=marginal_wh,
            carbon_g=carbon_g(wh, self.grid_g_per_kwh), marginal_carbon_g=carbon_g(marginal_wh, self.grid_g_per_kwh),
            tokens=self.tokens, j_per_token=joules / self.tokens if self.tokens else None,
            marginal_j_per_token=marginal / self.tokens if self.tokens else None,
            training_s=seconds, idle_w=self.idle_w, idle_source=self.idle_source,
            energy_source=self.meter.source, grid_g_per_kwh=self.grid_g_per_kwh,
        )  # fmt: skip

    def close(self) -> None:
        self.stop()
        self.meter.close()
