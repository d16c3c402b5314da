"""Per-peer metrics as JSON lines (one object per round) plus a status file for watchers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from p2pfm.daemon.checkpoint import atomic_write_bytes


class MetricsLog:
    """Append-only ``metrics.jsonl`` and an atomically replaced ``status.json``."""

    def __init__(self, work_dir: Path) -> None:
        self.path = work_dir / "metrics.jsonl"
        self.status_path = work_dir / "status.json"
        work_dir.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, stamped with the unix time (plots align peers on it)."""
        self._handle.write(json.dumps({"time": time.time(), **record}, sort_keys=True) + "\n")

    def status(self, record: dict[str, Any]) -> None:
        atomic_write_bytes(self.status_path, json.dumps(record, sort_keys=True, indent=1).encode())

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
