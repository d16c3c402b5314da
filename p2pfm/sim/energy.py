"""Energy and carbon accounting for a simulated swarm, beside a datacentre baseline.

Per peer (device profile from ``data/devices.toml``)::

    device_J  = active_W * compute_s + idle_W * (online_s - compute_s)
    wall_J    = device_J * wall_factor                  # charger / power-supply losses
    network_J = network_nj_per_byte * 1e-9 * (bytes_sent + bytes_received)
    energy    = wall_J + network_J
    carbon_g  = energy_kWh * grid_gCO2_per_kWh

Idle power is charged for all online time (the device stays awake to gossip), not for
offline time (it would be on anyway, or off). ``compute_s`` includes computation that was
lost when a peer left mid-round: the energy was spent.

**Network energy, 20 nJ/byte per side (assumption).** Aslan et al., "Electricity Intensity of
Internet Data Transmission" (J. Industrial Ecology 2018) estimate 0.06 kWh/GB for 2015 and
a halving every ~2 years, i.e. ~0.004 kWh/GB (~14 nJ/byte) for the core and access network
around 2023; we add a few nJ/byte for the end device's radio and count it once on the
sending and once on the receiving side (40 nJ per byte end to end). Configurable as
``energy.network_nj_per_byte``.

**Datacentre baseline (assumption).** The same useful work (FLOPs of all completed inner
steps, see each workload's ``flops_per_step``) on datacentre GPUs: an A100 (312 TFLOPS
dense bf16 peak at 400 W) at ~20% model-FLOPs utilisation gives ~150 GFLOPS per GPU watt;
times the facility's PUE (1.2: hyperscalers report ~1.1, the industry average is ~1.5,
Uptime Institute 2023) and the datacentre's grid intensity. Host CPUs, networking inside
the datacentre and idle GPUs are not counted, so the baseline flatters the datacentre.

Grid intensities (gCO2e/kWh): world average and countries from codecarbon's table, BRIEF s7.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pfm.config import ConfigError
from p2pfm.sim.devices import DeviceProfile
from p2pfm.sim.scenario import EnergyConfig

GRID_G_PER_KWH: dict[str, float] = {
    "WORLD": 475.0,
    "NOR": 30.0,
    "SWE": 41.0,
    "FRA": 56.0,
    "GBR": 238.0,
    "USA": 369.0,
    "DEU": 381.0,
    "CHN": 582.0,
    "IND": 713.0,
}

JOULES_PER_WH = 3600.0


def grid_intensity(config: EnergyConfig, country: str) -> float:
    table = {**GRID_G_PER_KWH, **config.grid_g_per_kwh}
    if country not in table:
        raise ConfigError(
            f"energy.country: no grid intensity for {country!r} (known: {', '.join(sorted(table))})"
        )
    return table[country]


@dataclass(frozen=True)
class EnergyReport:
    energy_wh: float
    compute_wh: float
    idle_wh: float
    network_wh: float
    by_device_wh: dict[str, float]
    carbon_g: float
    grid_g_per_kwh: float
    datacenter_energy_wh: float
    datacenter_carbon_g: float
    datacenter_grid_g_per_kwh: float


def account(
    config: EnergyConfig,
    profiles: dict[str, DeviceProfile],
    device_of_peer: list[str],
    compute_s: np.ndarray,
    online_s: np.ndarray,
    bytes_sent: np.ndarray,
    bytes_received: np.ndarray,
    useful_flops: float,
) -> EnergyReport:
    """Energy (Wh) and carbon (g) of the swarm and of the datacentre baseline."""
    active = np.array([profiles[d].active_w for d in device_of_peer])
    idle = np.array([profiles[d].idle_w for d in device_of_peer])
    wall = np.array([profiles[d].wall_factor for d in device_of_peer])
    idle_s = np.maximum(online_s - compute_s, 0.0)
    compute_j = active * compute_s * wall
    idle_j = idle * idle_s * wall
    network_j = config.network_nj_per_byte * 1e-9 * (bytes_sent + bytes_received)
    per_peer_j = compute_j + idle_j + network_j
    by_device: dict[str, float] = {}
    for name, joules in zip(device_of_peer, per_peer_j.tolist(), strict=True):
        by_device[name] = by_device.get(name, 0.0) + joules / JOULES_PER_WH
    total_wh = float(per_peer_j.sum()) / JOULES_PER_WH
    grid = grid_intensity(config, config.country)
    dc_wh = useful_flops / (config.datacenter_gflops_per_w * 1e9) * config.datacenter_pue / JOULES_PER_WH
    dc_grid = grid_intensity(config, config.datacenter_country)
    return EnergyReport(
        energy_wh=total_wh,
        compute_wh=float(compute_j.sum()) / JOULES_PER_WH,
        idle_wh=float(idle_j.sum()) / JOULES_PER_WH,
        network_wh=float(network_j.sum()) / JOULES_PER_WH,
        by_device_wh=dict(sorted(by_device.items())),
        carbon_g=total_wh / 1000.0 * grid,
        grid_g_per_kwh=grid,
        datacenter_energy_wh=dc_wh,
        datacenter_carbon_g=dc_wh / 1000.0 * dc_grid,
        datacenter_grid_g_per_kwh=dc_grid,
    )
