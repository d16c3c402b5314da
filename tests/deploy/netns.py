"""The network-namespace lab of the deploy tests, which lives in the package (:mod:`p2pfm.netlab.netns`)
because ``p2pfm bench compare --shaped`` uses it too. Re-exported here for ``from netns import ...``."""

from p2pfm.netlab.netns import (  # noqa: F401
    NAME_ROOT,
    NetLab,
    Shape,
    available,
    delete_namespace,
    main,
    stop_process_group,
    sweep_stale,
)

if __name__ == "__main__":
    main()
