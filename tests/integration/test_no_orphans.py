"""A peer killed outright leaves nothing running: its DHT child and p2pd follow it."""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.conftest import live_group_members, wait_for

pytestmark = pytest.mark.integration


def test_sigkilled_peer_leaves_no_orphans(make_swarm):
    """SIGKILL of the peer process alone (not its group): the DHT child and p2pd exit by themselves."""
    swarm = make_swarm(["--rounds", "0"])
    peer = swarm.add_peer(shard=0, num_shards=1)
    swarm.start_peer(peer)
    pgid = peer.process.pid
    wait_for(lambda: len(live_group_members({pgid})) >= 3, 120, "the peer, its DHT child and p2pd", [peer])
    os.kill(peer.process.pid, signal.SIGKILL)  # no clean-up code of the peer runs
    peer.process.wait()
    wait_for(
        lambda: not live_group_members({pgid}),
        60,
        "the DHT child and p2pd to exit after their parent died",
        [peer],
    )
