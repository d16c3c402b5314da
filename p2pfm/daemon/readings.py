"""Where a live peer's energy-policy readings come from: psutil, a carbon schedule, overrides.

The policy itself is pure (:mod:`p2pfm.core.policy`); this adapter reads the device:

- battery: ``psutil.sensors_battery()`` (None on machines without one: mains powered);
- other load: the system's CPU share minus this process tree's (the peer and its children,
  hivemind's DHT process and p2pd included), so a peer's own training never pauses it;
- grid intensity: the schedule file's value for the local hour, else the region's annual mean;
- overrides: ``policy.readings``, a JSON object re-read at every check whose keys replace the
  readings above (``plugged``, ``battery_percent``, ``other_load``, ``grid_g_per_kwh``,
  ``hour``). Tests pause and resume real peers by writing it; a human can debug a policy with
  it. A bad file is logged and ignored (until fixed), never fatal: it is a debug knob.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfm.config import ConfigError
from p2pfm.core.policy import (
    MAX_INTENSITY,
    REGION_G_PER_KWH,
    PolicyConfig,
    Readings,
    intensity_at,
    parse_schedule,
)

log = logging.getLogger("p2pfm.peer")

MAX_OVERRIDES_BYTES = 4096
# key -> (type check, bounds description, validator)
_OVERRIDES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "plugged": ("true or false", lambda v: isinstance(v, bool)),
    "battery_percent": ("a number in [0, 100]", lambda v: _number(v) and 0.0 <= v <= 100.0),
    "other_load": ("a number in [0, 1]", lambda v: _number(v) and 0.0 <= v <= 1.0),
    "grid_g_per_kwh": (
        f"a number in [0, {MAX_INTENSITY:g}]",
        lambda v: _number(v) and 0.0 <= v <= MAX_INTENSITY,
    ),
    "hour": ("a number in [0, 24)", lambda v: _number(v) and 0.0 <= v < 24.0),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_schedule(path: str | os.PathLike[str]) -> tuple[float, ...]:
    """A carbon schedule file, read (bounded) and parsed; ConfigError names the file and line."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(64 << 10 | 1)
    except OSError as exc:
        raise ConfigError(f"policy.carbon_schedule: {path} cannot be read: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"policy.carbon_schedule: {path} is not UTF-8 text") from None
    return parse_schedule(text, f"policy.carbon_schedule: {path}")


def parse_overrides(data: bytes, source: str) -> dict[str, Any]:
    """The overrides file's JSON object, checked key by key; ValueError names the problem."""
    if len(data) > MAX_OVERRIDES_BYTES:
        raise ValueError(f"{source}: {len(data)} bytes exceeds {MAX_OVERRIDES_BYTES}")
    try:
        values = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: not JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(values).__name__}")
    for key, value in values.items():
        if key not in _OVERRIDES:
            raise ValueError(f"{source}: unknown key {key!r} (known: {', '.join(_OVERRIDES)})")
        what, ok = _OVERRIDES[key]
        if not ok(value):
            raise ValueError(f"{source}: {key} must be {what}, got {value!r}")
    return values


class ReadingSource:
    """The live peer's readings, taken when :meth:`read` is called (every ``check_every_s``)."""

    def __init__(
        self,
        config: PolicyConfig,
        *,
        clock: Callable[[], float] = time.time,
        local_hour: Callable[[float], float] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.local_hour = local_hour or _local_hour
        self.schedule = load_schedule(config.carbon_schedule) if config.carbon_schedule else None
        self.region_g = REGION_G_PER_KWH.get(config.region) if config.region else None
        self.overrides_path = Path(config.readings) if config.readings else None
        self._bad_overrides: str | None = None  # the last complaint, logged once per change
        self._process: Any = None
        self._own_cpu: dict[int, Any] = {}

    def read(self) -> Readings:
        now = self.clock()
        overrides = self._overrides()
        plugged, percent = self._battery() if "plugged" not in overrides else (None, None)
        hour = float(overrides.get("hour", self.local_hour(now)))
        grid = self.region_g
        if self.schedule is not None:
            grid = intensity_at(self.schedule, hour)
        load = (
            None if "other_load" in overrides or "idle-only" not in self.config.rules else self._other_load()
        )
        return Readings(
            now=now,
            plugged=overrides.get("plugged", plugged),
            battery_percent=_float_or_none(overrides.get("battery_percent", percent)),
            other_load=_float_or_none(overrides.get("other_load", load)),
            grid_g_per_kwh=_float_or_none(overrides.get("grid_g_per_kwh", grid)),
        )

    # --- sources ---------------------------------------------------------------------------
    def _overrides(self) -> dict[str, Any]:
        if self.overrides_path is None:
            return {}
        try:
            with self.overrides_path.open("rb") as handle:
                data = handle.read(MAX_OVERRIDES_BYTES + 1)
            values = parse_overrides(data, str(self.overrides_path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            if str(exc) != self._bad_overrides:
                log.warning("policy readings override ignored: %s", exc)
                self._bad_overrides = str(exc)
            return {}
        self._bad_overrides = None
        return values

    @staticmethod
    def _battery() -> tuple[bool | None, float | None]:
        import psutil

        try:
            battery = psutil.sensors_battery()
        except (OSError, RuntimeError, NotImplementedError):
            return None, None
        if battery is None:
            return None, None
        return bool(battery.power_plugged), float(battery.percent)

    def _other_load(self) -> float:
        """System CPU share since the last call minus this process tree's, in [0, 1]."""
        import psutil

        if self._process is None:
            self._process = psutil.Process()
        system = psutil.cpu_percent(interval=None)  # all cores, 0-100
        own = 0.0
        try:
            processes = [self._process, *self._process.children(recursive=True)]
        except psutil.Error:
            processes = [self._process]
        seen = {}
        for process in processes:
            tracked = self._own_cpu.get(process.pid, process)  # the same object keeps its baseline
            try:
                own += tracked.cpu_percent(interval=None)  # one core = 100
                seen[process.pid] = tracked
            except psutil.Error:
                continue
        self._own_cpu = seen
        cores = psutil.cpu_count() or 1
        return min(max((system - own / cores) / 100.0, 0.0), 1.0)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _local_hour(now: float) -> float:
    local = time.localtime(now)
    return local.tm_hour + local.tm_min / 60.0
