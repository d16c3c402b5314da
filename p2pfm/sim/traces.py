"""Availability traces: CSV files of online intervals, ``device,start_s,end_s``.

Each row says device ``device`` was online from ``start_s`` to ``end_s`` (trace seconds from
the start of the run; ``churn.trace_time_scale`` virtual seconds per trace second, 1 by default). Devices are mapped onto simulated peers round-robin in order of
first appearance (peer i replays device i mod D). Every problem is a :class:`TraceError`
naming the file, the line and the reason; the parser never guesses.

:func:`convert_phone_trace` (``p2pfm sim convert-trace``) turns phone traces with one line per
user-week, ``user_id,week,start_ms:end_ms;...``, into this format (see sim/traces/README.md).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from p2pfm.config import ConfigError

REQUIRED_COLUMNS = ("device", "start_s", "end_s")


class TraceError(ConfigError):
    """A trace file is malformed; ``line`` is 1-based (the header is line 1), 0 if file-wide."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        where = f"{source}:{line}" if line else source
        super().__init__(f"trace {where}: {reason}")
        self.source = source
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Trace:
    """Online intervals per device, each list sorted and non-overlapping."""

    devices: tuple[str, ...]  # in order of first appearance
    intervals: dict[str, tuple[tuple[float, float], ...]]

    def for_peer(self, peer: int) -> tuple[tuple[float, float], ...]:
        return self.intervals[self.devices[peer % len(self.devices)]]

    @property
    def span_s(self) -> float:
        """The end of the last interval: how long the trace lasts from t = 0, in trace seconds."""
        return max(end for spans in self.intervals.values() for _, end in spans)

    def scaled(self, factor: float) -> Trace:
        """The same trace on a clock running ``factor`` virtual seconds per trace second.

        ``churn.trace_time_scale``: real traces are in real seconds, runs in tens of virtual
        seconds. A factor of 1.0 returns this trace unchanged, so unscaled runs replay bit for bit.
        """
        if factor == 1.0:
            return self
        intervals = {}
        for device, spans in self.intervals.items():
            scaled = tuple((start * factor, end * factor) for start, end in spans)
            if any(end <= start for start, end in scaled):
                raise ConfigError(
                    f"churn.trace_time_scale: {factor:g} shrinks an interval of device {device} to nothing"
                )
            intervals[device] = scaled
        return Trace(devices=self.devices, intervals=intervals)


def parse_trace(text: str, source: str = "<trace>") -> Trace:
    """Parse CSV text; raise TraceError(line, reason) on the first problem."""
    rows = csv.reader(io.StringIO(text))
    try:
        header = next(rows)
    except StopIteration:
        raise TraceError(
            source, 0, f"file is empty; expected a header {','.join(REQUIRED_COLUMNS)}"
        ) from None
    except csv.Error as exc:
        raise TraceError(source, 1, f"unreadable CSV: {exc}") from None
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        if all(_is_number(h) for h in header[1:]) and len(header) > 1:
            raise TraceError(source, 1, f"missing header line; expected columns {','.join(REQUIRED_COLUMNS)}")
        raise TraceError(
            source,
            1,
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} in header {','.join(header)}",
        )
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise TraceError(source, 1, f"duplicate column {duplicated[0]} in header")
    column = {name: header.index(name) for name in REQUIRED_COLUMNS}
    spans: dict[str, list[tuple[float, float, int]]] = {}
    order: list[str] = []
    line = 1
    try:
        for row in rows:
            line = rows.line_num
            if not row or all(not cell.strip() for cell in row):
                continue  # blank lines are harmless
            if len(row) != len(header):
                raise TraceError(source, line, f"expected {len(header)} fields, got {len(row)}")
            device = row[column["device"]].strip()
            if not device:
                raise TraceError(source, line, "device is empty")
            start = _number(row[column["start_s"]], "start_s", source, line)
            end = _number(row[column["end_s"]], "end_s", source, line)
            if start < 0:
                raise TraceError(source, line, f"start_s is negative ({start:g})")
            if end <= start:
                raise TraceError(source, line, f"end_s ({end:g}) must be greater than start_s ({start:g})")
            if device not in spans:
                spans[device] = []
                order.append(device)
            spans[device].append((start, end, line))
    except csv.Error as exc:
        raise TraceError(source, rows.line_num, f"unreadable CSV: {exc}") from None
    if not order:
        raise TraceError(source, 0, "no intervals after the header")
    intervals = {}
    for device in order:
        ordered = sorted(spans[device])
        for (s0, e0, l0), (s1, _e1, l1) in zip(ordered, ordered[1:], strict=False):
            if s1 < e0:
                first, second = sorted((l0, l1))
                raise TraceError(
                    source,
                    second,
                    f"interval [{s1:g}, {_e1:g}) of device {device} overlaps line {first} [{s0:g}, {e0:g})",
                )
        intervals[device] = tuple((s, e) for s, e, _ in ordered)
    return Trace(devices=tuple(order), intervals=intervals)


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(str(path), 0, "file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(str(path), 0, f"cannot be read: {exc}") from None
    return parse_trace(text, source=str(path))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str, name: str, source: str, line: int) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise TraceError(source, line, f"{name} is not a number: {text.strip()!r}") from None
    if not math.isfinite(value):
        raise TraceError(source, line, f"{name} is not finite: {text.strip()!r}")
    return value


# --- converting phone traces ----------------------------------------------------------------

WEEK_S = 7 * 86400
WEEK_MS = WEEK_S * 1000


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_phone_trace` did, for the user to check before replaying it."""

    csv: str  # the trace in our format, ``device,start_s,end_s``
    devices: int  # devices written (one per user-week, or per user with absolute times)
    intervals_in: int
    intervals_out: int  # after merging overlapping or touching intervals
    empty_dropped: int  # user-weeks without any interval: nothing to write, so no device
    span_s: float  # trace seconds to map onto the run: a week, or the last end with absolute times

    def time_scale_for(self, run_seconds: float) -> float:
        """The ``churn.trace_time_scale`` that replays the whole span over ``run_seconds``."""
        return run_seconds / self.span_s


def convert_phone_trace(text: str, source: str = "<phone trace>", *, absolute: bool = False) -> Conversion:
    """Convert a phone availability trace, ``user_id,week,start_ms:end_ms;start_ms:end_ms;...``.

    One line per user-week; blank lines, ``#`` comments and a header line are skipped.
    By default times are milliseconds from the start of that week and each user-week becomes
    one device ``<user>-w<week>`` starting at 0, so every week is a sample of the same week-long
    pattern. With ``absolute`` the times share one clock (e.g. Unix epoch ms): each user is one
    device and the earliest start becomes 0. Overlapping or touching intervals are merged (our
    traces forbid overlaps, and a touch would replay as a leave and an instant rejoin).
    Raises TraceError naming the line on the first problem; never guesses.
    """
    spans: dict[str, list[tuple[int, int]]] = {}
    order: list[str] = []
    intervals_in = empty = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            raise TraceError(source, number, f"expected user_id,week,intervals (3 fields), got {len(fields)}")
        user, week, listed = fields
        if not week.lstrip("-").isdigit():
            if not order:
                continue  # a header line such as user_id,week,intervals
            raise TraceError(source, number, f"week is not an integer: {week!r}")
        if not user:
            raise TraceError(source, number, "user_id is empty")
        device = user if absolute else f"{user}-w{int(week)}"
        if device not in spans:
            spans[device] = []
            order.append(device)
        if not listed:
            continue
        for item in listed.split(";"):
            start_text, sep, end_text = item.strip().partition(":")
            if not sep:
                raise TraceError(source, number, f"interval {item.strip()!r} is not start_ms:end_ms")
            start = _milliseconds(start_text, "start_ms", source, number)
            end = _milliseconds(end_text, "end_ms", source, number)
            if end <= start:
                raise TraceError(source, number, f"end_ms ({end}) must be greater than start_ms ({start})")
            if not absolute and end > WEEK_MS:
                raise TraceError(
                    source,
                    number,
                    f"end_ms ({end}) is past the end of the week ({WEEK_MS}); use absolute times",
                )
            spans[device].append((start, end))
            intervals_in += 1
    if not order:
        raise TraceError(source, 0, "no user-week lines")
    origin = min((s for device in order for s, _ in spans[device]), default=0) if absolute else 0
    rows = ["device,start_s,end_s"]
    intervals_out = 0
    last_end = 0
    for device in order:
        if not spans[device]:
            empty += 1
            continue
        merged: list[list[int]] = []
        for start, end in sorted(spans[device]):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in merged:
            rows.append(f"{device},{_seconds(start - origin)},{_seconds(end - origin)}")
            last_end = max(last_end, end - origin)
        intervals_out += len(merged)
    if intervals_out == 0:
        raise TraceError(source, 0, "no intervals: every user-week is empty")
    return Conversion(
        csv="\n".join(rows) + "\n",
        devices=len(order) - empty,
        intervals_in=intervals_in,
        intervals_out=intervals_out,
        empty_dropped=empty,
        span_s=last_end / 1000 if absolute else float(WEEK_S),
    )


def _milliseconds(text: str, name: str, source: str, line: int) -> int:
    text = text.strip()
    if not text.isdigit():
        raise TraceError(source, line, f"{name} is not a non-negative integer: {text!r}")
    return int(text)


def _seconds(ms: int) -> str:
    """Exact decimal seconds of integer milliseconds (``90500`` -> ``90.5``), no float noise."""
    whole, frac = divmod(ms, 1000)
    return f"{whole}.{frac:03d}".rstrip("0").rstrip(".") if frac else str(whole)
