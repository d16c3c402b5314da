"""Several "hosts" on one machine, for tests and benchmarks over real, shaped links (root, iproute2).

Map:
- ``netns.py``    :class:`~p2pfm.netlab.netns.NetLab`: K network namespaces on a bridge, links
                  shaped (netem, or tbf plus ``linkemu``), cut, partitioned and healed.
- ``linkemu.py``  delay and loss without netem: an NFQUEUE reader that ``NetLab`` runs inside
                  a host (a script of the standard library only, started by path).

Used by the deploy tests (``tests/deploy``) and ``p2pfm bench compare --shaped``; nothing
else in the package imports it.
"""
