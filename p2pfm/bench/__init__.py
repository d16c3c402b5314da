"""Benchmarks behind ``p2pfm bench``: each module is one bench with a config and a run function.

Map:
- ``codecs.py``    bits/param on the wire (signed envelope included), encode+sign and
                   verify+decode throughput, and reconstruction error for every codec.
- ``swarm.py``     a real local swarm: bits/param/round, share of round time in compute,
                   gossip and eval, and efficiency against one process on the same machine.
- ``compare.py``   p2pfm beside p2pfm-uncompressed, hivemind.Optimizer, DDP and one process,
                   run back to back. Its parts: ``compare_config.py`` (settings),
                   ``compare_variants.py`` (start one variant's processes, read its curve),
                   ``sampler.py`` (CPU and p2pd bytes of process groups, from /proc),
                   ``compare_report.py`` (rows, table, plot). Worker processes, one per
                   rank/peer: ``compare_ddp.py``, ``compare_hivemind.py``, sharing
                   ``compare_common.py``.
- ``fuzz.py``      a fuzz campaign against a live peer's stream handlers over libp2p:
                   launches (or attaches to) the target, announces member keys, rotates
                   libp2p senders under the ban threshold, tallies answers by reason.
                   Its messages: ``fuzz_cases.py`` (sans-IO, deterministic from a seed).
- ``transfer.py``  a joiner's state download (libp2p stream and direct lane) against a plain TCP
                   copy of the same bytes, in one process on loopback. Over a shaped link between
                   two network namespaces (root): ``transfer_shaped.py`` (the lab, the two
                   processes) and ``transfer_node.py`` (the donor or the joiner in its host).
"""
