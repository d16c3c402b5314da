"""p2pfm: gossip-based peer-to-peer training of foundation models on edge devices.

Package map:
- ``core/``    the pure, transport-free protocol: identities, signed envelope, codecs,
               error feedback, gossip rules, robust aggregation. No sockets, clocks or threads.
- ``model/``   the default byte-level GPT and the default corpus (this machine's stdlib).
- ``daemon/``  the live peer: hivemind DHT discovery, libp2p gossip, training loop,
               checkpoints, metrics.
- ``sim/``     the discrete-event churn simulator driving the same core.
- ``bench/``   benchmarks (codecs, swarm, comparisons).
- ``netlab/``  several "hosts" on one machine (network namespaces, shaped links; root): for the
               deploy tests and ``bench compare --shaped``.
- ``cli/``     the ``p2pfm`` command line: one thin module per subcommand.
- ``config.py`` strict loading of frozen dataclass configs (shared by daemon, swarm, sim).
- ``swarm.py``  a local swarm of real peer processes; ``procs.py`` child processes in their own
               process groups (start, wait, kill), shared by the swarm, the benches and netlab.
"""

__version__ = "0.1.0"
