"""Benchmarks behind ``p2pfm bench``: each module is one bench with a config and a run function.

Map:
- ``codecs.py``  bits/param on the wire (signed envelope included), encode+sign and
                 verify+decode throughput, and reconstruction error for every codec.
"""
