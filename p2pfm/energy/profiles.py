"""A live peer's power model, from its announced device class and the simulator's device profiles.

One table of devices serves both the simulator and live peers (``p2pfm/sim/data/devices.toml``):
``--device-class raspberry_pi_4`` gives a live peer the same 6.4 W / 2.7 W the simulator uses.
A class that is no profile (the default ``cpu-host``) takes ``power_w`` (default 15 W, about
half a laptop CPU's TDP, BRIEF s7) and ``energy.idle_w`` (default 4 W, the laptop profile's idle).
Explicit ``power_w`` / ``idle_w`` always win over the profile.
"""

from __future__ import annotations

import os

from p2pfm.energy.meters import PowerModel

DEFAULT_ACTIVE_W = 15.0
DEFAULT_IDLE_W = 4.0


def power_model(
    device_class: str, power_w: float | None = None, idle_w: float | None = None, cores: int | None = None
) -> PowerModel:
    """The power model of ``device_class`` (a profile name; ``-`` and ``_`` are the same)."""
    from p2pfm.sim.devices import load_profiles

    profile = load_profiles().get(device_class.replace("-", "_"))
    active = power_w if power_w is not None else (profile.active_w if profile else DEFAULT_ACTIVE_W)
    idle = idle_w if idle_w is not None else (profile.idle_w if profile else DEFAULT_IDLE_W)
    return PowerModel(
        active_w=active, idle_w=min(idle, active), cores=cores or os.cpu_count() or 1, name=device_class
    )
