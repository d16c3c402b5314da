"""The churn-resilience simulator: many peers, a virtual clock, the real protocol core.

Every simulated peer is a :class:`~p2pfm.core.gossip.GossipLearner` whose messages are
real sealed envelopes (:mod:`p2pfm.core.envelope`) carrying real codec bytes; the simulator
only decides *when* things happen (device speeds, links, churn) and does the local math.

Map:
- ``scenario.py``  scenario files: frozen dataclasses, strict TOML loading (errors name the field).
- ``engine.py``    the discrete-event engine (event heap, virtual clock, rounds, messages, churn, state download).
- ``adversary.py`` Byzantine peers (``[byzantine]``): which peers, and the updates they send instead.
- ``workloads.py`` what peers train: a vectorised numpy MLP (1,000-peer runs) and the daemon's byte-level GPT.
- ``churn.py``     availability models: none, exponential on/off, diurnal, trace replay, fraction per N rounds.
- ``traces.py``    availability trace CSV parser (``device,start_s,end_s``) with line-numbered errors; time scaling; phone-trace converter.
- ``devices.py``   device profiles (``data/devices.toml``: Raspberry Pi 4/5, Jetson Orin Nano, phone, laptop).
- ``energy.py``    energy (compute, idle, network, wall overhead), carbon, and the datacentre baseline.
- ``report.py``    summary.json (deterministic), metrics.csv, timing.json and PNG plots.
- ``run.py``       ``run_scenario``: simulate one scenario and write its results.
- ``sweep.py``     ``run_sweep``: one scenario at several churn rates, the churn-resilience curve.
- ``byzantine.py`` ``run_byzantine_sweep``: every aggregation rule against every attack at several fractions.
"""
