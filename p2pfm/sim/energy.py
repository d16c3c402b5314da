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

**Datacentre baseline.** The same useful work (every completed inner step, at the workload's
``flops_per_step``) on a datacentre GPU whose model-FLOPs utilisation falls with model size,
times PUE, plus the datacentre hardware's embodied carbon per GPU-hour; the model and every
default are in :mod:`p2pfm.energy.datacenter` (the old "20 % MFU for every model" flattered
the datacentre by orders of magnitude for small models). The edge devices carry no additional
embodied carbon: they exist whether or not they train. The datacentre is given the swarm's
parallelism as batch: the peers' concurrent inner steps run as one step of ``peers`` times the
FLOPs (:func:`datacenter_steps`), the most favourable reading for the datacentre.

**Marginal energy**: compute time at ``active_W - idle_W`` (wall overhead included) plus the
network: what the swarm spent above the devices' idle draw (``energy_wh`` is attributable:
idle power while online is in it).

Grid intensities (gCO2e/kWh): world average and countries from codecarbon's table, BRIEF s7.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pfm.config import ConfigError
from p2pfm.energy.datacenter import DatacenterModel
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
    datacenter_carbon_g: float  # operational + embodied
    datacenter_grid_g_per_kwh: float
    marginal_wh: float = 0.0
    marginal_carbon_g: float = 0.0
    datacenter_embodied_g: float = 0.0
    datacenter_mfu: float = 0.0
    datacenter_gpu_hours: float = 0.0

    @property
    def edge_to_datacenter_carbon(self) -> float | None:
        """Swarm carbon / datacentre carbon (< 1: the swarm emitted less)."""
        return self.carbon_g / self.datacenter_carbon_g if self.datacenter_carbon_g > 0 else None


def datacenter_steps(useful_steps: float, flops_per_step: float, peers: int) -> tuple[float, float]:
    """(steps, FLOPs per step) of the datacentre run: ``peers`` concurrent steps batched into one."""
    peers = max(int(peers), 1)
    return useful_steps / peers, flops_per_step * peers


def datacenter_model(config: EnergyConfig) -> DatacenterModel:
    return DatacenterModel(
        peak_tflops=config.datacenter_peak_tflops, tdp_w=config.datacenter_tdp_w,
        idle_w=config.datacenter_idle_w, plateau_mfu=config.datacenter_plateau_mfu,
        ops_per_step=config.datacenter_ops_per_step, op_overhead_s=config.datacenter_op_overhead_s,
        pue=config.datacenter_pue, embodied_g_per_gpu_hour=config.datacenter_embodied_g_per_gpu_hour,
    )  # fmt: skip


def account(
    config: EnergyConfig,
    profiles: dict[str, DeviceProfile],
    device_of_peer: list[str],
    compute_s: np.ndarray,
    online_s: np.ndarray,
    bytes_sent: np.ndarray,
    bytes_received: np.ndarray,
    useful_steps: float,
    flops_per_step: float,
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
    marginal_j = float(((active - idle) * compute_s * wall).sum() + network_j.sum())
    by_device: dict[str, float] = {}
    for name, joules in zip(device_of_peer, per_peer_j.tolist(), strict=True):
        by_device[name] = by_device.get(name, 0.0) + joules / JOULES_PER_WH
    total_wh = float(per_peer_j.sum()) / JOULES_PER_WH
    grid = grid_intensity(config, config.country)
    dc_grid = grid_intensity(config, config.datacenter_country)
    dc = datacenter_model(config).train(
        *datacenter_steps(useful_steps, flops_per_step, len(device_of_peer)), dc_grid
    )
    return EnergyReport(
        energy_wh=total_wh,
        compute_wh=float(compute_j.sum()) / JOULES_PER_WH,
        idle_wh=float(idle_j.sum()) / JOULES_PER_WH,
        network_wh=float(network_j.sum()) / JOULES_PER_WH,
        by_device_wh=dict(sorted(by_device.items())),
        carbon_g=total_wh / 1000.0 * grid,
        grid_g_per_kwh=grid,
        datacenter_energy_wh=dc.energy_wh,
        datacenter_carbon_g=dc.carbon_g,
        datacenter_grid_g_per_kwh=dc_grid,
        marginal_wh=marginal_j / JOULES_PER_WH,
        marginal_carbon_g=marginal_j / JOULES_PER_WH / 1000.0 * grid,
        datacenter_embodied_g=dc.embodied_g,
        datacenter_mfu=dc.mfu,
        datacenter_gpu_hours=dc.gpu_hours,
    )
