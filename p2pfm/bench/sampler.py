"""CPU time and bytes on the wire of running process groups, read from ``/proc``.

``p2pfm bench compare`` measures every variant the same way, from outside: the CPU seconds of
all its processes (children included) and, for libp2p variants, what their ``p2pd`` daemons
wrote. Linux only.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, process group, CPU seconds) of a live process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    return comm, int(rest[2]), (int(rest[11]) + int(rest[12])) / _CLOCK_TICKS


def _read_wchar(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class ProcessSampler:
    """Polls ``/proc`` for every process in the watched process groups (workers, their forks, p2pd).

    Keeps each pid's latest CPU time and, for ``p2pd`` processes, bytes written, and a time
    series of the p2pd total. A process's last ``interval`` before exit is missed: CPU and
    bytes are lower bounds by at most that much.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.groups: set[int] = set()
        self.cpu: dict[int, float] = {}
        self.p2pd_written: dict[int, int] = {}
        self.series: list[tuple[float, int]] = []  # (unix time, total p2pd wchar)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def watch(self, pgid: int) -> None:
        with self._lock:
            self.groups.add(pgid)

    def sample(self) -> None:
        with self._lock:
            groups = set(self.groups)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            stat = _read_stat(pid)
            if stat is None or stat[1] not in groups:
                continue
            comm, _, cpu = stat
            self.cpu[pid] = max(cpu, self.cpu.get(pid, 0.0))
            if comm == "p2pd":
                written = _read_wchar(pid)
                if written is not None:
                    self.p2pd_written[pid] = max(written, self.p2pd_written.get(pid, 0))
        self.series.append((time.time(), sum(self.p2pd_written.values())))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_seconds(self) -> float:
        return float(sum(self.cpu.values()))

    def wire_bytes_at(self, unix_time: float) -> float:
        """Measured bytes on the wire (half of all p2pd writes) up to ``unix_time``."""
        if not self.series:
            return 0.0
        times, totals = zip(*self.series, strict=True)
        return float(np.interp(unix_time, times, totals)) / 2.0

    @property
    def wire_bytes(self) -> float:
        return sum(self.p2pd_written.values()) / 2.0
