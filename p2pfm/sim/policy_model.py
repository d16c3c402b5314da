"""Energy policies in the simulator: the devices' owners, the grid's day, and carbon by the hour.

A simulated peer pauses and resumes through the same :class:`~p2pfm.core.policy.PolicyGate`
as a live one; only the readings differ. Here they come from the scenario's ``[policy]``
table, per device class and local hour of the (compressed) day:

- ``plugged_curve``: the probability that a battery device is on its charger (phones charge
  at night: Berta et al. 2014; Bonawitz et al. 2019 train only while charging);
- ``busy_curve``: the probability that its owner is using it (other load ``busy_load``, else
  ``idle_load``);
- ``grid_curve``: the grid's carbon intensity by hour (one grid for the whole swarm).

Plugged and busy states are drawn once per peer per hour from the policy's own seeded stream,
so a run replays from its seed. :class:`CarbonLedger` charges each round's energy at the
intensity of that hour: with a grid that changes through the day, the annual-mean figure of
:mod:`p2pfm.sim.energy` cannot tell a policy that trains at noon from one that trains at 7 pm.
Its energy formula is the same as ``energy.account``'s (a test holds them equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from p2pfm.config import require
from p2pfm.core.policy import MAX_INTENSITY, Decision, PolicyConfig, PolicyGate, Readings, intensity_at

HOURS = 24
JOULES_PER_KWH = 3.6e6


def _check_curve(values: tuple[float, ...], name: str, high: float) -> None:
    require(len(values) == HOURS, name, f"needs {HOURS} hourly values, got {len(values)}")
    require(
        all(math.isfinite(v) and 0.0 <= v <= high for v in values), name, f"values must be in [0, {high:g}]"
    )


@dataclass(frozen=True)
class DeviceBehaviour:
    """How one device class's owner uses it, by local hour (``[policy.devices.<class>]``)."""

    battery: bool = False  # False: mains powered (Pi, Jetson): plugged-in always allows
    plugged_curve: tuple[float, ...] = (1.0,) * HOURS  # P(on the charger) by hour, battery devices only
    busy_curve: tuple[float, ...] = (0.0,) * HOURS  # P(the owner uses the device) by hour
    busy_load: float = 0.8  # other processes' CPU share while in use
    idle_load: float = 0.05  # ... and while not

    def __post_init__(self) -> None:
        _check_curve(self.plugged_curve, "policy.devices.plugged_curve", 1.0)
        _check_curve(self.busy_curve, "policy.devices.busy_curve", 1.0)
        require(
            0.0 <= self.idle_load <= self.busy_load <= 1.0,
            "policy.devices",
            "needs 0 <= idle_load <= busy_load <= 1",
        )


@dataclass(frozen=True)
class SimPolicyConfig:
    """A scenario's ``[policy]``: the gate every peer runs, the owners, the grid, the comparison."""

    gate: PolicyConfig = field(default_factory=PolicyConfig)  # rules and thresholds; dwell in virtual s
    grid_curve: tuple[float, ...] = ()  # 24 hourly g/kWh of the swarm's grid; () = energy.country's value
    grid_source: str = ""  # where the curve comes from (reported beside the results)
    devices: dict[str, DeviceBehaviour] = field(default_factory=dict)  # absent class: mains, never busy
    compare: tuple[str, ...] = ("always",)  # `p2pfm sim policies`: one run per entry, "a,b" = all must allow

    def __post_init__(self) -> None:
        if self.grid_curve:
            _check_curve(self.grid_curve, "policy.grid_curve", MAX_INTENSITY)
        require(len(self.compare) >= 1, "policy.compare", "needs at least one policy")
        for entry in self.compare:
            try:
                PolicyConfig(**{**_gate_fields(self.gate), "rules": rules_of(entry)})
            except ValueError as exc:
                require(False, "policy.compare", f"{entry!r}: {exc}")


def rules_of(entry: str) -> tuple[str, ...]:
    """``"plugged-in,carbon-aware"`` -> ("plugged-in", "carbon-aware")."""
    return tuple(rule.strip() for rule in entry.split(",") if rule.strip())


def _gate_fields(gate: PolicyConfig) -> dict:
    return {name: getattr(gate, name) for name in gate.__dataclass_fields__}


def with_rules(gate: PolicyConfig, entry: str) -> PolicyConfig:
    return PolicyConfig(**{**_gate_fields(gate), "rules": rules_of(entry)})


class PolicyModel:
    """Readings and one gate per simulated peer; :meth:`decide` at each round start."""

    def __init__(
        self,
        config: SimPolicyConfig,
        device_of: list[str],
        day_length_s: float,
        flat_grid: float,
        rng: np.random.Generator,
    ) -> None:
        self.config = config
        self.day = day_length_s
        self.rng = rng
        self.n = len(device_of)
        self.gates = [PolicyGate(config.gate) for _ in range(self.n)]
        behaviour = [config.devices.get(d, DeviceBehaviour()) for d in device_of]
        self.battery = np.array([b.battery for b in behaviour])
        self.plugged_p = np.array([b.plugged_curve for b in behaviour])  # (n, 24)
        self.busy_p = np.array([b.busy_curve for b in behaviour])
        self.busy_load = np.array([b.busy_load for b in behaviour])
        self.idle_load = np.array([b.idle_load for b in behaviour])
        self.grid = tuple(config.grid_curve) if config.grid_curve else (flat_grid,) * HOURS
        self._hour_index = -1
        self.plugged = np.ones(self.n, bool)
        self.busy = np.zeros(self.n, bool)

    def hour(self, now: float) -> float:
        return (now / self.day * HOURS) % HOURS

    def grid_at(self, now: float) -> float:
        return intensity_at(self.grid, self.hour(now))

    def _draw(self, now: float) -> None:
        """New plugged and busy states for every peer at each hour boundary (one draw per hour)."""
        index = int(math.floor(now / self.day * HOURS))
        if index == self._hour_index:
            return
        self._hour_index = index
        hour = index % HOURS
        self.plugged = self.rng.random(self.n) < self.plugged_p[:, hour]
        self.busy = self.rng.random(self.n) < self.busy_p[:, hour]

    def readings(self, peer: int, now: float) -> Readings:
        self._draw(now)
        return Readings(
            now=now,
            plugged=bool(self.plugged[peer]) if self.battery[peer] else None,
            other_load=float(self.busy_load[peer] if self.busy[peer] else self.idle_load[peer]),
            grid_g_per_kwh=self.grid_at(now),
        )

    def decide(self, peer: int, now: float) -> Decision:
        return self.gates[peer].decide(self.readings(peer, now))


class CarbonLedger:
    """Energy and carbon charged round by round at the grid intensity of the round's hour.

    ``energy.account``'s formula on each round's increments: active power over compute time,
    idle power over the rest of the (unpaused) online time, both times the wall factor, plus
    network energy per byte. A paused peer's time is charged to nobody (it is not training).
    """

    def __init__(
        self, active_w: np.ndarray, idle_w: np.ndarray, wall: np.ndarray, nj_per_byte: float
    ) -> None:
        self.active_w, self.idle_w, self.wall, self.nj = active_w, idle_w, wall, nj_per_byte
        n = active_w.size
        self.last = (np.zeros(n), np.zeros(n), np.zeros(n))  # compute_s, online_s, bytes
        self.last_time = 0.0
        self.energy_j = 0.0
        self.carbon_g = 0.0

    def charge(
        self,
        now: float,
        grid_g_per_kwh: float,
        compute_s: np.ndarray,
        online_s: np.ndarray,
        nbytes: np.ndarray,
    ) -> None:
        compute, online, sent = (a - b for a, b in zip((compute_s, online_s, nbytes), self.last, strict=True))
        joules = (self.active_w * compute + self.idle_w * np.maximum(online - compute, 0.0)) * self.wall
        total = float(joules.sum() + self.nj * 1e-9 * sent.sum())
        self.energy_j += total
        self.carbon_g += total / JOULES_PER_KWH * grid_g_per_kwh
        self.last = (compute_s.copy(), online_s.copy(), nbytes.copy())
        self.last_time = now
