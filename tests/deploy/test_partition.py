"""A network partition between real peers: 4 peers on 4 hosts (network namespaces), cut
into two halves of two. Both halves must keep training; after the heal the swarm must
find itself again and the models must come back together (consensus distance)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hostenv import apt_install
from labswarm import TINY_MODEL, LabSwarm
from netns import NetLab, available

pytestmark = pytest.mark.deploy

# Parameter syncs every 5 rounds pull the halves' models together after the heal.
SYNC_EVERY = 5
PEER_ARGS = [*TINY_MODEL, "--sync-every", str(SYNC_EVERY), "--rounds", "0"]
# The scenario: the halves stay apart at least this long (the announcement TTL is 15 s, so
# every record and route of the other half has long expired). A duration of the scenario,
# not a guess about how fast anything is: the test also waits for the events themselves.
PARTITION_S = 60
RECONVERGE_S = 600  # generous: reconvergence is waited for, never timed


def wait_rounds(swarm: LabSwarm, peers: Sequence[int], n: int = 1, timeout: float = 300) -> None:
    """Wait until every one of ``peers`` has finished ``n`` more rounds (a new checkpoint)."""
    start = {i: swarm.round(i) for i in peers}
    swarm.wait(
        lambda: all(swarm.round(i) >= start[i] + n for i in peers),
        timeout,
        f"{n} more round(s) on peers {list(peers)} (from rounds {start})",
    )


def sample_distance(swarm: LabSwarm, peers: Sequence[int], samples: int = 3) -> float:
    """Median of a few readings, each after every peer finished one more round (checkpoints
    move every round)."""
    values = []
    for k in range(samples):
        if k:
            wait_rounds(swarm, peers)
        values.append(swarm.consensus_distance(peers))
    return sorted(values)[len(values) // 2]


@pytest.mark.timeout(2400)  # the sum of the waits below, with room: a slow machine is not a failure
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
                swarm.wait(
                    lambda: all(swarm.round(i) >= 6 and len(swarm.live(i)) == 3 for i in everyone),
                    300,
                    "all 4 peers past round 6, each seeing the other 3",
                )
                ids = {i: swarm.peer_id(i) for i in everyone}
                # The reference is the swarm *together*: peers that trained a few rounds before
                # they saw everyone start far apart (CI once read 0.45 here, against 0.06-0.11
                # in other runs, and the partition's 0.28 looked like no drift). Two sync
                # periods with all 4 in view first, so every peer has pulled the others' models.
                wait_rounds(swarm, everyone, 2 * SYNC_EVERY)
                before = sample_distance(swarm, everyone)

            with phases("partition test: halves {0,1} | {2,3} train apart"):
                lab.partition([0, 1], [2, 3])
                cut_rounds = {i: swarm.round(i) for i in everyone}
                halves = {0: {ids[2], ids[3]}, 1: {ids[2], ids[3]}, 2: {ids[0], ids[1]}, 3: {ids[0], ids[1]}}
                # Each side forgets the other (announcements expire) and keeps going; the cut
                # lasts at least PARTITION_S (the scenario), however fast that happens.
                cut_at = time.monotonic()
                swarm.wait(
                    lambda: (
                        all(
                            not (swarm.live(i) & halves[i]) and swarm.round(i) >= cut_rounds[i] + 8
                            for i in everyone
                        )
                        and time.monotonic() - cut_at >= PARTITION_S
                    ),
                    PARTITION_S + 300,
                    f"both halves to train 8 rounds without the other, cut for at least {PARTITION_S} s",
                )
                during = sample_distance(swarm, everyone)
                inside = max(sample_distance(swarm, [0, 1], 1), sample_distance(swarm, [2, 3], 1))

            with phases("partition test: heal, swarm finds itself, models reconverge"):
                held = time.monotonic() - cut_at
                print(f"healing after a {held:.0f} s partition")
                lab.heal()
                healed_rounds = {i: swarm.round(i) for i in everyone}
                # Each half's DHT drops the other half's nodes during the cut; the daemon's
                # heartbeat re-dials peers it lost (PeerBook.lost -> PeerNetwork.redial).
                swarm.wait(
                    lambda: all(len(swarm.live(i)) == 3 for i in everyone),
                    300,
                    "every peer to see all 3 others again",
                )
                # Reconvergence is an event: sample until the distance is back near its
                # pre-partition level (parameter syncs every 5 rounds pull the halves together).
                bound = 1.5 * before + 0.25 * (during - before)
                readings: list[tuple[dict[int, int], float]] = []
                deadline = time.monotonic() + RECONVERGE_S
                while True:
                    rounds = {i: swarm.round(i) for i in everyone}
                    readings.append((rounds, sample_distance(swarm, everyone)))
                    if readings[-1][1] <= bound:
                        break
                    if time.monotonic() > deadline:
                        pytest.fail(
                            f"consensus distance not back to <= {bound:.3e} within {RECONVERGE_S} s of the "
                            f"heal (before {before:.3e}, partitioned {during:.3e}, healed at rounds "
                            f"{healed_rounds}); readings (rounds, median distance): "
                            + "; ".join(f"{r} {d:.3e}" for r, d in readings)
                        )
                    wait_rounds(swarm, everyone)
                after = readings[-1][1]
                print(
                    f"reconverged after {len(readings)} reading(s), at rounds {readings[-1][0]} "
                    f"(healed at {healed_rounds})"
                )
        finally:
            swarm.stop_all()
        print(
            f"consensus distance: before {before:.2e}, partitioned {during:.2e} "
            f"(within halves {inside:.2e}), after heal {after:.2e}"
        )
        assert during > before, "the halves did not drift apart: was the partition real?"
        assert during > 3 * inside, "the halves are no further apart than peers within a half"
        assert after < during, "the models did not come back together after the heal"
        assert after <= bound, (before, during, after)
