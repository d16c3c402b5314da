"""Energy policies, pure: from readings (battery, other load, grid intensity, time) to run or pause.

A device owner decides when their device may train: only on mains power (``plugged-in``), only
while nothing else wants the CPU (``idle-only``), only while the grid is clean
(``carbon-aware``), always (``always``), or several at once (every listed rule must allow).
The live daemon and the simulator both ask the same :class:`PolicyGate`, so a simulated
policy comparison measures the code a real peer runs.

Why a gate with hysteresis and dwell times rather than a bare threshold test: readings
fluctuate (CPU load second to second, a charger's contact), and each pause costs a
checkpoint and each resume a catch-up download. A peer pauses when a rule's threshold is
crossed, resumes only once the reading is back past the threshold by a margin (``idle_margin``,
``carbon_margin_g``), and keeps any state for at least ``min_run_s`` / ``min_pause_s``.

Readings come from adapters outside the core (psutil and a schedule file in the daemon, the
scenario's device and grid models in the simulator); times are whatever clock the driver uses.
A carbon schedule is a text file of 24 hourly intensities, parsed here (:func:`parse_schedule`)
so that its rules are one function for both drivers; the format is in ``protocols/peer.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from p2pfm.config import ConfigError, require

POLICIES: tuple[str, ...] = ("always", "plugged-in", "idle-only", "carbon-aware")
"""The rule names a ``[policy]`` table's ``rules`` (or ``--policy a,b``) may list."""

REGION_G_PER_KWH: dict[str, float] = {
    # Annual mean grid intensities (gCO2e/kWh) from codecarbon's table (BRIEF s7): a fixed value
    # per region for carbon-aware peers without an hourly schedule.
    "WORLD": 475.0, "NOR": 30.0, "SWE": 41.0, "FRA": 56.0, "GBR": 238.0,
    "USA": 369.0, "DEU": 381.0, "CHN": 582.0, "IND": 713.0,
}  # fmt: skip

MAX_INTENSITY = 5000.0  # g/kWh; the dirtiest grids are ~1000: a larger figure is a typo
MAX_SCHEDULE_BYTES = 64 << 10
MAX_SCHEDULE_LINES = 1000
MAX_DWELL_S = 7 * 86400.0


class ScheduleError(ConfigError):
    """A carbon schedule file is malformed; the message names the line and the reason."""


@dataclass(frozen=True)
class PolicyConfig:
    """A peer's energy policy (``[policy]`` in the peer's TOML; ``[policy]`` in a scenario).

    ``carbon_schedule`` / ``region`` say where the grid intensity comes from (a file of 24
    hourly values, else the region's annual mean); the daemon reads them, the core only
    takes the resulting readings. ``readings`` is a test and debug knob: a JSON file of
    overrides the daemon re-reads every ``check_every_s`` (see :mod:`p2pfm.daemon.readings`).
    """

    rules: tuple[str, ...] = ("always",)
    idle_threshold: float = 0.5  # idle-only: pause while other processes use more than this CPU share
    idle_margin: float = 0.1  # ... and resume once it is at most threshold - margin
    carbon_threshold: float = 300.0  # carbon-aware: train while the grid is at most this (g/kWh)
    carbon_margin_g: float = 20.0  # ... and resume once it is at most threshold - margin
    carbon_schedule: str = ""  # file of 24 hourly intensities (g/kWh); "" = the region's fixed value
    region: str = ""  # key of REGION_G_PER_KWH, for carbon-aware without a schedule
    min_run_s: float = 30.0  # after resuming, train at least this long before pausing again
    min_pause_s: float = 30.0  # after pausing, stay paused at least this long
    check_every_s: float = 2.0  # the daemon reads its sources this often (while paused too)
    readings: str = ""  # JSON file of reading overrides (tests, debugging); "" = none

    def __post_init__(self) -> None:
        require(len(self.rules) >= 1, "policy.rules", f"needs at least one of {', '.join(POLICIES)}")
        for rule in self.rules:
            require(rule in POLICIES, "policy.rules", f"unknown rule {rule!r} (known: {', '.join(POLICIES)})")
        require(len(set(self.rules)) == len(self.rules), "policy.rules", "lists a rule twice")
        require(0.0 < self.idle_threshold <= 1.0, "policy.idle_threshold", "must be in (0, 1] (a CPU share)")
        require(
            0.0 <= self.idle_margin < self.idle_threshold,
            "policy.idle_margin",
            "must be in [0, idle_threshold)",
        )
        require(
            0.0 < self.carbon_threshold <= MAX_INTENSITY,
            "policy.carbon_threshold",
            f"must be in (0, {MAX_INTENSITY:g}] g/kWh",
        )
        require(
            0.0 <= self.carbon_margin_g < self.carbon_threshold,
            "policy.carbon_margin_g",
            "must be in [0, carbon_threshold)",
        )
        for name in ("min_run_s", "min_pause_s"):
            value = getattr(self, name)
            require(0.0 <= value <= MAX_DWELL_S, f"policy.{name}", f"must be in [0, {MAX_DWELL_S:g}] seconds")
        require(
            0.05 <= self.check_every_s <= 3600.0, "policy.check_every_s", "must be in [0.05, 3600] seconds"
        )
        require(
            not self.region or self.region in REGION_G_PER_KWH,
            "policy.region",
            f"unknown region {self.region!r} (known: {', '.join(REGION_G_PER_KWH)})",
        )
        require(
            "carbon-aware" not in self.rules or bool(self.carbon_schedule or self.region),
            "policy.carbon_schedule",
            "carbon-aware needs an intensity source: a schedule file (--carbon-schedule) or a region (--region)",
        )

    @property
    def active(self) -> bool:
        """Whether any rule can ever pause (``always`` alone cannot)."""
        return any(rule != "always" for rule in self.rules)


@dataclass(frozen=True)
class Readings:
    """What the sources saw at ``now`` (None: no such source, e.g. no battery on a Pi)."""

    now: float  # the driver's clock, seconds
    plugged: bool | None = None  # on mains power; None = no battery (mains-powered device)
    battery_percent: float | None = None
    other_load: float | None = None  # CPU share [0, 1] used by processes other than this peer
    grid_g_per_kwh: float | None = None  # grid carbon intensity now


@dataclass(frozen=True)
class Decision:
    """The gate's answer: train or not, why, and whether this answer changed the state."""

    run: bool
    reasons: tuple[str, ...]  # paused: every rule that objects; running: what each rule saw
    changed: bool = False

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def rule_verdict(rule: str, readings: Readings, config: PolicyConfig, *, paused: bool) -> tuple[bool, str]:
    """One rule on one set of readings: (allows training, why). ``paused`` selects the resume
    thresholds (threshold minus margin): the hysteresis that keeps a peer from flapping."""
    if rule == "always":
        return True, "always"
    if rule == "plugged-in":
        if readings.plugged is None:
            return True, "no battery (mains powered)"
        battery = "" if readings.battery_percent is None else f" ({readings.battery_percent:.0f}%)"
        return (True, f"plugged in{battery}") if readings.plugged else (False, f"on battery{battery}")
    if rule == "idle-only":
        load = readings.other_load
        if load is None:
            return True, "other load unknown"
        limit = config.idle_threshold - (config.idle_margin if paused else 0.0)
        if load > limit:
            return False, f"other load {load:.2f} > {limit:.2f}"
        return True, f"other load {load:.2f} <= {limit:.2f}"
    if rule == "carbon-aware":
        grid = readings.grid_g_per_kwh
        if grid is None or not math.isfinite(grid):
            return False, "grid intensity unknown"
        limit = config.carbon_threshold - (config.carbon_margin_g if paused else 0.0)
        if grid > limit:
            return False, f"grid {grid:.0f} g/kWh > {limit:.0f}"
        return True, f"grid {grid:.0f} g/kWh <= {limit:.0f}"
    raise ValueError(f"unknown policy rule {rule!r}")  # PolicyConfig refuses these first


class PolicyGate:
    """The run/pause state of one peer under its policy; :meth:`decide` at every check.

    A peer starts running. It pauses when any rule objects and resumes when every rule allows
    (with the resume thresholds), but never sooner than ``min_run_s`` after its last resume or
    ``min_pause_s`` after its last pause. Deterministic: the same readings give the same answers.
    """

    def __init__(self, config: PolicyConfig, *, running: bool = True, since: float = -math.inf) -> None:
        self.config = config
        self.running = running
        self.since = since  # when the current state began (driver's clock)
        self.reasons: tuple[str, ...] = ()  # why we are paused (empty while running)

    def evaluate(self, readings: Readings) -> tuple[bool, tuple[str, ...]]:
        """Whether the rules allow training now, ignoring dwell times: (allow, reasons)."""
        verdicts = [
            rule_verdict(r, readings, self.config, paused=not self.running) for r in self.config.rules
        ]
        objections = tuple(why for ok, why in verdicts if not ok)
        return (not objections, objections or tuple(why for _, why in verdicts))

    def decide(self, readings: Readings) -> Decision:
        allow, reasons = self.evaluate(readings)
        dwell = self.config.min_run_s if self.running else self.config.min_pause_s
        if allow != self.running and readings.now - self.since >= dwell:
            self.running, self.since = allow, readings.now
            self.reasons = () if allow else reasons
            return Decision(allow, reasons, changed=True)
        if not self.running:
            return Decision(False, self.reasons)
        return Decision(True, reasons)


# --- carbon schedules -----------------------------------------------------------------------
def parse_schedule(text: str, source: str = "schedule") -> tuple[float, ...]:
    """24 hourly grid intensities (g/kWh) from a schedule file's text; raises ScheduleError.

    Format: one ``HOUR,G_PER_KWH`` per line (comma or whitespace between), hours 0-23 each
    exactly once in any order; ``#`` starts a comment; blank lines are skipped. Values must be
    finite and in [0, 5000]. At most 64 KiB and 1,000 lines. Errors name the line and the reason.
    """
    if len(text) > MAX_SCHEDULE_BYTES:
        raise ScheduleError(f"{source}: {len(text)} characters exceeds {MAX_SCHEDULE_BYTES}")
    lines = text.splitlines()
    if len(lines) > MAX_SCHEDULE_LINES:
        raise ScheduleError(f"{source}: {len(lines)} lines exceeds {MAX_SCHEDULE_LINES}")
    values: dict[int, float] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.replace(",", " ").split()
        where = f"{source} line {number}"
        if len(fields) != 2:
            raise ScheduleError(f"{where}: expected HOUR,G_PER_KWH, got {line[:60]!r}")
        try:
            hour = int(fields[0])
        except ValueError:
            raise ScheduleError(f"{where}: hour {fields[0][:20]!r} is not an integer") from None
        if not 0 <= hour <= 23:
            raise ScheduleError(f"{where}: hour {hour} outside 0-23")
        try:
            value = float(fields[1])
        except ValueError:
            raise ScheduleError(f"{where}: intensity {fields[1][:20]!r} is not a number") from None
        if not (math.isfinite(value) and 0.0 <= value <= MAX_INTENSITY):
            raise ScheduleError(f"{where}: intensity {value!r} outside [0, {MAX_INTENSITY:g}] g/kWh")
        if hour in values:
            raise ScheduleError(f"{where}: hour {hour} given twice")
        values[hour] = value
    missing = [h for h in range(24) if h not in values]
    if missing:
        raise ScheduleError(f"{source}: no intensity for hour(s) {', '.join(map(str, missing))}")
    return tuple(values[h] for h in range(24))


def intensity_at(schedule: tuple[float, ...], hour: float) -> float:
    """The schedule's intensity at a (fractional) hour of the day: the value of that whole hour."""
    return schedule[int(math.floor(hour)) % 24]
