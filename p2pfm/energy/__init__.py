"""Energy: live meters, per-peer accounting, the datacentre baseline, swarm reports from signed claims.

- ``meters.py``      a cumulative joule counter per peer: Zeus (RAPL, NVML) where readable, else
  CPU time x the device profile's power model; every figure names its source.
- ``tracker.py``     training windows over a meter, the idle baseline, attributable and marginal
  energy, tokens, carbon (:class:`~p2pfm.energy.tracker.EnergyTracker`: the seam policies use).
- ``profiles.py``    a live peer's power model from its device class (the simulator's profiles).
- ``datacenter.py``  the datacentre baseline by model size (MFU falls with size), PUE, embodied carbon.
- ``report.py``      a swarm's energy report built from verified announcements.

Nothing here imports Zeus until a meter is opened: the default install needs none of it.
"""
