"""Benchmarks behind ``p2pfm bench``: each module is one bench with a config and a run function.

Map:
- ``codecs.py``    bits/param on the wire (signed envelope included), encode+sign and
                   verify+decode throughput, and reconstruction error for every codec.
- ``swarm.py``     a real local swarm: bits/param/round, share of round time in compute,
                   gossip and eval, and efficiency against one process on the same machine.
- ``compare.py``   p2pfm beside p2pfm-uncompressed, hivemind.Optimizer, DDP and one process;
                   ``compare_common.py`` (shared pieces), ``compare_ddp.py`` and
                   ``compare_hivemind.py`` (worker processes, one per rank/peer).
"""
