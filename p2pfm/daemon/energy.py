"""The peer's energy meter and tracker, built from its config (glue between PeerConfig and p2pfm.energy)."""

from __future__ import annotations

import logging

from p2pfm.config import ConfigError
from p2pfm.daemon.config import PeerConfig
from p2pfm.energy.meters import MeterUnavailable, PowerModel, open_meter
from p2pfm.energy.profiles import power_model
from p2pfm.energy.tracker import EnergyTracker

log = logging.getLogger("p2pfm.peer")


def open_tracker(config: PeerConfig, gpu_indices: list[int]) -> tuple[EnergyTracker, PowerModel]:
    """The best meter readable here (``energy.meter``), its tracker, and the device's power model.

    An explicit ``rapl``/``nvml`` meter that cannot be read refuses to start (ConfigError):
    a user who asked for measurement must not silently get a model.
    """
    model = power_model(config.device_class, config.power_w, config.energy.idle_w)
    try:
        meter, reasons = open_meter(
            config.energy.meter, model, gpu_indices=gpu_indices, root=config.energy.powercap_root
        )
    except MeterUnavailable as exc:
        raise ConfigError(f"energy.meter: {config.energy.meter} cannot be read here: {exc}") from None
    for reason in reasons:
        log.info("energy: not measured by %s", reason)
    log.info(
        "energy: %s (device class %s: %.1f W active, %.1f W idle, %d cores)",
        meter.source, model.name, model.active_w, model.idle_w, model.cores,
    )  # fmt: skip
    return EnergyTracker(meter, grid_g_per_kwh=config.grid_g_per_kwh, idle_w=model.idle_w), model
