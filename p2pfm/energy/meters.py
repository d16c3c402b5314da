"""Energy meters: one cumulative joule counter per peer, measured where the hardware lets us.

**Why Zeus** (``zeus`` on PyPI, the ML.ENERGY project's library), not CodeCarbon: p2pfm's
devices are Raspberry Pis, Jetsons, laptops and Macs as much as GPU hosts. Zeus reads Intel/AMD
RAPL counters, NVIDIA GPUs through NVML, Jetson power rails (INA3221) and Apple silicon, and
exposes each as a plain cumulative energy counter that we can window ourselves; CodeCarbon
has no Jetson support, writes its own CSV/API reports, and silently falls back to 50 % of a
CPU's TDP when no counter is readable, which would mix a guess into a "measured" figure.
Zeus is heavy (pandas, scikit-learn), so it is the optional extra ``p2pfm[energy]``; the
default install reports energy through :class:`ModelledMeter` and says so in every figure.

Every meter says where its numbers come from (``source``): ``measured:rapl``,
``measured:nvml``, ``measured:rapl+nvml`` or ``modelled:profile``. The figures are never
mixed silently: a meter that cannot read its counter raises :class:`MeterUnavailable` at
open time and :func:`open_meter` falls back to the model, saying so in ``source``.

What each meter counts: RAPL is the whole CPU package (and DRAM where exposed), whatever
process runs on it; NVML is the whole GPU. Neither includes the rest of the board, fans or the
power supply. The model counts the device as its profile describes it (``idle_w`` plus a
share of ``active_w - idle_w`` proportional to the CPU time this process used).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

POWERCAP_ENV = "P2PFM_POWERCAP_ROOT"
"""Environment variable naming the powercap root to read (tests point it at a fake tree)."""
DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")
METER_KINDS = ("auto", "rapl", "nvml", "model")


class MeterUnavailable(Exception):
    """This meter cannot be read here (no counter, no permission, no library)."""


class Meter(Protocol):
    """A monotone energy counter: joules since the meter was opened, and where they come from."""

    source: str

    def read_joules(self) -> float: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PowerModel:
    """A device's power as its profile describes it (``p2pfm/sim/data/devices.toml``)."""

    active_w: float  # every core busy
    idle_w: float  # on, awake, nothing to do
    cores: int  # the device's logical cores: CPU time / cores = the share of the device we kept busy
    name: str = ""

    def __post_init__(self) -> None:
        if not (0 <= self.idle_w <= self.active_w) or self.cores < 1:
            raise ValueError(f"power model {self.name!r}: need 0 <= idle_w <= active_w and cores >= 1")

    def joules(self, wall_s: float, cpu_s: float) -> float:
        """Linear utilisation model (Fan, Weber, Barroso, ISCA 2007): idle + (active - idle) x busy share."""
        busy_s = min(max(cpu_s, 0.0) / self.cores, max(wall_s, 0.0))
        return self.idle_w * max(wall_s, 0.0) + (self.active_w - self.idle_w) * busy_s


class ModelledMeter:
    """The fallback: process CPU time and wall time through a :class:`PowerModel`.

    Deterministic given its clocks (both injectable): the same CPU and wall seconds always
    give the same joules, so figures are reproducible on machines without counters.
    """

    source = "modelled:profile"

    def __init__(
        self,
        model: PowerModel,
        *,
        cpu_clock: Callable[[], float] = time.process_time,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self._cpu, self._wall = cpu_clock, wall_clock
        self._cpu0, self._wall0 = cpu_clock(), wall_clock()

    def read_joules(self) -> float:
        return self.model.joules(self._wall() - self._wall0, self._cpu() - self._cpu0)

    def close(self) -> None:
        pass


def powercap_root() -> Path:
    """The powercap root to read: ``$P2PFM_POWERCAP_ROOT`` or ``/sys/class/powercap``."""
    return Path(os.environ.get(POWERCAP_ENV) or DEFAULT_POWERCAP_ROOT)


class ZeusRaplMeter:
    """CPU package (+ DRAM) energy through Zeus's RAPL reader, for every package under ``root``.

    ``root`` is a powercap directory (``/sys/class/powercap``); Zeus reads
    ``root/intel-rapl/intel-rapl:N/energy_uj`` and tracks counter wrap-arounds itself.
    """

    source = "measured:rapl"

    def __init__(self, root: Path | None = None) -> None:
        rapl_dir = (root or powercap_root()) / "intel-rapl"
        indices = sorted(
            int(m.group(1)) for p in (rapl_dir.iterdir() if rapl_dir.is_dir() else ())
            if (m := re.fullmatch(r"intel-rapl:(\d+)", p.name))
        )  # fmt: skip
        if not indices:  # checked first: importing Zeus costs ~1 s of start-up for nothing
            raise MeterUnavailable(f"no RAPL package under {rapl_dir}")
        try:
            from zeus.device.cpu.rapl import RAPLCPU
        except ImportError as exc:
            raise MeterUnavailable(f"zeus is not installed ({exc}); pip install 'p2pfm[energy]'") from None
        try:
            self._cpus = [RAPLCPU(i, str(rapl_dir)) for i in indices]
            self._start_mj = self._total_mj()
        except Exception as exc:  # zeus raises its own errors for permission, missing files
            self.close()
            raise MeterUnavailable(f"RAPL under {rapl_dir} is not readable: {exc}") from None

    def _total_mj(self) -> float:
        total = 0.0
        for cpu in self._cpus:
            m = cpu.get_total_energy_consumption()
            total += m.cpu_mj + (m.dram_mj or 0.0)
        return total

    def read_joules(self) -> float:
        return (self._total_mj() - self._start_mj) / 1000.0

    def close(self) -> None:
        """Stop Zeus's wrap-around watchers (one child process per counter, started on first read)."""
        for cpu in getattr(self, "_cpus", ()):
            for rapl_file in (cpu.rapl_file, cpu.dram):
                tracker = getattr(rapl_file, "_wraparound_tracker", None)
                if tracker is not None:
                    tracker._stop()
                    rapl_file._wraparound_tracker = None


class ZeusNvmlMeter:
    """NVIDIA GPU energy through Zeus's NVML wrapper (Volta or newer: a hardware energy counter)."""

    source = "measured:nvml"

    def __init__(self, indices: Sequence[int] | None = None) -> None:
        try:
            import pynvml
            from zeus.device.gpu.nvidia import NVIDIAGPU, nvml_is_available
        except ImportError as exc:
            raise MeterUnavailable(f"zeus/nvidia-ml-py is not installed ({exc})") from None
        if not nvml_is_available():
            raise MeterUnavailable("NVML cannot be initialised (no NVIDIA driver or GPU)")
        try:
            chosen = list(indices) if indices is not None else list(range(pynvml.nvmlDeviceGetCount()))
            self._gpus = [NVIDIAGPU(i) for i in chosen]
            if not self._gpus or not all(g.supports_get_total_energy_consumption() for g in self._gpus):
                raise MeterUnavailable(f"GPUs {chosen} have no energy counter (pre-Volta, or none)")
            self._start_mj = self._total_mj()
        except MeterUnavailable:
            raise
        except Exception as exc:
            raise MeterUnavailable(f"NVML energy counter not readable: {exc}") from None

    def _total_mj(self) -> float:
        return float(sum(g.get_total_energy_consumption() for g in self._gpus))

    def read_joules(self) -> float:
        return (self._total_mj() - self._start_mj) / 1000.0

    def close(self) -> None:
        pass


class SumMeter:
    """Several measured meters read as one (CPU package + GPU)."""

    def __init__(self, meters: Sequence[Meter]) -> None:
        self.meters = list(meters)
        kinds = [m.source.split(":", 1)[1] for m in self.meters]
        self.source = "measured:" + "+".join(kinds)

    def read_joules(self) -> float:
        return sum(m.read_joules() for m in self.meters)

    def close(self) -> None:
        for m in self.meters:
            m.close()


def open_meter(
    kind: str,
    model: PowerModel,
    *,
    gpu_indices: Sequence[int] = (),
    root: Path | None = None,
    cpu_clock: Callable[[], float] = time.process_time,
    wall_clock: Callable[[], float] = time.monotonic,
) -> tuple[Meter, list[str]]:
    """The best meter of ``kind`` readable here, and why others were not (for the log).

    ``auto``: RAPL and NVML (on ``gpu_indices``) where readable, summed; else the model.
    ``rapl``/``nvml``: that counter or :class:`MeterUnavailable`. ``model``: the model only.
    """
    if kind not in METER_KINDS:
        raise ValueError(f"meter kind {kind!r}: one of {', '.join(METER_KINDS)}")
    reasons: list[str] = []
    measured: list[Meter] = []
    if kind in ("auto", "rapl"):
        try:
            measured.append(ZeusRaplMeter(root))
        except MeterUnavailable as exc:
            if kind == "rapl":
                raise
            reasons.append(f"rapl: {exc}")
    if kind == "nvml" or (kind == "auto" and gpu_indices):
        try:
            measured.append(ZeusNvmlMeter(list(gpu_indices) or None))
        except MeterUnavailable as exc:
            if kind == "nvml":
                raise
            reasons.append(f"nvml: {exc}")
    if len(measured) == 1:
        return measured[0], reasons
    if measured:
        return SumMeter(measured), reasons
    return ModelledMeter(model, cpu_clock=cpu_clock, wall_clock=wall_clock), reasons
