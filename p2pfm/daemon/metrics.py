"""Per-peer metrics as JSON lines (one object per round) plus a status file for watchers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from p2pfm.daemon.checkpoint import atomic_write_bytes


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Infinity: write null instead (readers of other languages choke on NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


class MetricsLog:
    """Append-only ``metrics.jsonl`` and an atomically replaced ``status.json``."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / "metrics.jsonl"
        self.status_path = work_dir / "status.json"
        work_dir.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, stamped with the unix time (plots align peers on it)."""
        record = _finite_or_none({"time": time.time(), **record})
        self._handle.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")

    def status(self, record: dict[str, Any]) -> None:
        text = json.dumps(_finite_or_none(record), sort_keys=True, indent=1, allow_nan=False)
        atomic_write_bytes(self.status_path, text.encode())

    def close(self) -> None:
        self._handle.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a crash is skipped)."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
