"""Availability traces: CSV files of online intervals, ``device,start_s,end_s``.

Each row says device ``device`` was online from ``start_s`` to ``end_s`` (virtual seconds
from the start of the run). Devices are mapped onto simulated peers round-robin in order of
first appearance (peer i replays device i mod D). Every problem is a :class:`TraceError`
naming the file, the line and the reason; the parser never guesses.
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
