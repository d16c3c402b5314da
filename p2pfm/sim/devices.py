"""Device profiles (shipped in ``data/devices.toml``) and their assignment to simulated peers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from p2pfm.config import ConfigError, build_config, load_toml, require
from p2pfm.sim.scenario import DevicesConfig


@dataclass(frozen=True)
class DeviceProfile:
    """How fast a device computes and talks, and what it draws doing so."""

    gflops: float  # sustained fp32 throughput on small models
    step_overhead_s: float  # fixed cost per inner step (framework, memory), dominant for tiny models
    up_mbps: float
    down_mbps: float
    latency_ms: float  # one way
    active_w: float  # at the device, while computing
    idle_w: float  # at the device, online and idle (waiting, sending, receiving)
    wall_factor: float = 1.0  # wall-plug energy / device energy (charger, power supply)
    source: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        where = self.name or "device"
        require(self.gflops > 0, f"{where}.gflops", "must be positive")
        require(self.step_overhead_s >= 0, f"{where}.step_overhead_s", "must be non-negative")
        require(self.up_mbps > 0, f"{where}.up_mbps", "must be positive")
        require(self.down_mbps > 0, f"{where}.down_mbps", "must be positive")
        require(self.latency_ms >= 0, f"{where}.latency_ms", "must be non-negative")
        require(self.active_w >= 0 and self.idle_w >= 0, f"{where}.active_w", "power must be non-negative")
        require(self.wall_factor >= 1.0, f"{where}.wall_factor", "must be at least 1")

    def step_seconds(self, flops_per_step: float) -> float:
        """Virtual seconds for one inner step of a workload of this many FLOPs."""
        return self.step_overhead_s + flops_per_step / (self.gflops * 1e9)

    @property
    def up_bytes_per_s(self) -> float:
        return self.up_mbps * 1e6 / 8.0

    @property
    def down_bytes_per_s(self) -> float:
        return self.down_mbps * 1e6 / 8.0


def load_profiles(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """All profiles of a devices TOML file (the shipped one by default), by name."""
    if path:
        table = load_toml(path)
    else:
        import tomllib

        table = tomllib.loads(resources.files("p2pfm.sim").joinpath("data/devices.toml").read_text())
    profiles = {}
    for name, values in table.items():
        if not isinstance(values, dict):
            raise ConfigError(f"devices: {name} must be a table")
        profiles[name] = build_config(DeviceProfile, {**values, "name": name}, where=name)
    return profiles


def resolve_profiles(config: DevicesConfig, base: Path) -> dict[str, DeviceProfile]:
    """The profiles a scenario uses: the mix's classes, with its overrides applied."""
    available = load_profiles(base / config.profiles if config.profiles else None)
    chosen = {}
    for name in sorted(config.mix):
        if name not in available:
            raise ConfigError(
                f"devices.mix: unknown device class {name!r} (known: {', '.join(sorted(available))})"
            )
        chosen[name] = available[name]
    for name, override in sorted(config.overrides.items()):
        if name not in chosen:
            raise ConfigError(f"devices.overrides: {name!r} is not in devices.mix")
        changes = {k: v for k, v in dataclasses.asdict(override).items() if v is not None}
        chosen[name] = dataclasses.replace(chosen[name], **changes)
    return chosen


def assign_devices(mix: dict[str, float], peers: int, rng: np.random.Generator) -> list[str]:
    """Device class per peer: counts by largest remainder of the mix's shares, then shuffled."""
    names = sorted(mix)
    weights = np.array([mix[n] for n in names], dtype=np.float64)
    shares = weights / weights.sum() * peers
    counts = np.floor(shares).astype(int)
    remainder = peers - int(counts.sum())
    order = np.argsort(-(shares - counts), kind="stable")
    counts[order[:remainder]] += 1
    classes = [name for name, count in zip(names, counts, strict=True) for _ in range(count)]
    permutation = rng.permutation(peers)
    return [classes[i] for i in permutation]
