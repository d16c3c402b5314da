"""A network partition between real peers: 4 peers on 4 hosts (network namespaces), cut
into two halves of two. Both halves must keep training; after the heal the swarm must
find itself again and the models must come back together (consensus distance)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hostenv import apt_install
from labswarm import TINY_MODEL, LabSwarm
from netns import NetLab, available

pytestmark = pytest.mark.deploy

# Parameter syncs every 5 rounds pull the halves' models together after the heal.
PEER_ARGS = [*TINY_MODEL, "--sync-every", "5", "--rounds", "0"]
PARTITION_S = 60  # at least this long apart: long enough for every stale route and record to expire


def sample_distance(swarm: LabSwarm, peers: list[int], samples: int = 3) -> float:
    """Median of a few readings a round or so apart (checkpoints move every round)."""
    values = []
    for _ in range(samples):
        values.append(swarm.consensus_distance(peers))
        time.sleep(1.0)
    return sorted(values)[len(values) // 2]


@pytest.mark.timeout(1200)
def test_partitioned_halves_keep_training_and_reconverge_after_heal(root_required, tmp_path: Path, phases):
    """Both halves advance while cut apart; after heal all 4 see each other again and the
    consensus distance falls back near its pre-partition level."""
    reason = available()
    if reason:
        pytest.skip(reason)
    apt_install(["iptables"])
    everyone = [0, 1, 2, 3]
    with NetLab(4) as lab:
        swarm = LabSwarm(lab, tmp_path, PEER_ARGS, run_id="partition-test")
        try:
            with phases("partition test: 4 peers start and train together"):
                swarm.start_all()
                swarm.wait(lambda: all(swarm.round(i) >= 6 and len(swarm.live(i)) == 3 for i in everyone), 300,
                           "all 4 peers past round 6, each seeing the other 3")
                ids = {i: swarm.peer_id(i) for i in everyone}
                before = sample_distance(swarm, everyone)

            with phases("partition test: halves {0,1} | {2,3} train apart"):
                lab.partition([0, 1], [2, 3])
                cut_rounds = {i: swarm.round(i) for i in everyone}
                halves = {0: {ids[2], ids[3]}, 1: {ids[2], ids[3]}, 2: {ids[0], ids[1]}, 3: {ids[0], ids[1]}}
                # Each side forgets the other (announcements expire) and keeps going.
                cut_at = time.monotonic()
                swarm.wait(lambda: all(not (swarm.live(i) & halves[i]) and swarm.round(i) >= cut_rounds[i] + 8
                                       for i in everyone), 300, "both halves to train 8 rounds without the other")
                time.sleep(max(0.0, PARTITION_S - (time.monotonic() - cut_at)))
                during = sample_distance(swarm, everyone)
                inside = max(sample_distance(swarm, [0, 1], 1), sample_distance(swarm, [2, 3], 1))

            with phases("partition test: heal, swarm finds itself, models reconverge"):
                held = time.monotonic() - cut_at
                print(f"healing after a {held:.0f} s partition")
                lab.heal()
                healed_rounds = {i: swarm.round(i) for i in everyone}
                # Each half's DHT drops the other half's nodes during the cut; the daemon's
                # heartbeat re-dials peers it lost (PeerBook.lost -> PeerNetwork.redial).
                swarm.wait(lambda: all(len(swarm.live(i)) == 3 for i in everyone), 120,
                           "every peer to see all 3 others again")
                swarm.wait(lambda: all(swarm.round(i) >= healed_rounds[i] + 15 for i in everyone), 300,
                           "15 more rounds after the heal (3 parameter syncs)")
                after = sample_distance(swarm, everyone)
        finally:
            swarm.stop_all()
        print(f"consensus distance: before {before:.2e}, partitioned {during:.2e} "
              f"(within halves {inside:.2e}), after heal {after:.2e}")
        assert during > before, "the halves did not drift apart: was the partition real?"
        assert after < during, "the models did not come back together after the heal"
        assert after <= 1.5 * before + 0.25 * (during - before), (before, during, after)
