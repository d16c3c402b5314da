"""A joiner whose donor is killed mid-transfer resumes from another donor, keeping its chunks.

Real peer processes over real libp2p on loopback. Three donors serve the *same* state: each
resumed from one checkpoint (written by a first peer that trained three rounds and left), and
none trains (they wait for a quorum of five that never comes), so their snapshots are
byte-identical. Their uploads are capped (``--state-serve-rate``) so that a download of the
tiny model's ~1.5 MB state in 16 KiB chunks takes seconds: the test waits for the joiner's log
to name the donor it is downloading from (after at least one verified chunk), kills that donor's
process group, and checks the joiner's ``state_download`` record: some bytes were reused, the
rest fetched, and the adopted state hashes to the donors' snapshot.
"""

from __future__ import annotations

import re
import shutil

import pytest

from p2pfm.core.transfer import state_hash
from p2pfm.daemon.checkpoint import CHECKPOINT_NAME
from tests.integration.conftest import wait_all_exit, wait_for

pytestmark = pytest.mark.integration

PROGRESS = re.compile(r"state download from (p2pfm1\w+): (\d+) of (\d+) chunks verified")


def test_a_joiner_resumes_from_another_donor_when_its_donor_dies_mid_transfer(make_swarm):
    first = make_swarm(["--rounds", "3", "--inner-steps", "2", "--min-peers", "1"])
    trainer = first.add_peer(shard=0, num_shards=1)
    first.start_peer(trainer)
    wait_all_exit([trainer], 180)
    checkpoint = trainer.work_dir / CHECKPOINT_NAME
    assert checkpoint.exists()

    serving = ["--state-serve-rate", "100000", "--state-chunk-bytes", "16384"]
    waiting = ["--rounds", "0", "--min-peers", "5", "--min-peers-timeout", "900", *serving]
    swarm = make_swarm(["--inner-steps", "2"])
    donors = [swarm.add_peer(shard=0, num_shards=1, extra=waiting) for _ in range(3)]
    for donor in donors:
        shutil.copy(checkpoint, donor.work_dir / CHECKPOINT_NAME)  # one state, three keys
    for index, donor in enumerate(donors):
        swarm.start_peer(donor, wait=index == 0)
    for donor in donors:
        donor.wait_ready()
    joiner = swarm.add_peer(shard=0, num_shards=1, extra=["--rounds", "0", "--min-peers", "1"])
    swarm.start_peer(joiner, wait=False)

    wait_for(lambda: all(d.status().get("peer_id") for d in donors), 60, "the donors' status", swarm.peers)
    by_id = {d.status()["peer_id"]: d for d in donors}
    snapshots = [next((d.work_dir / "snapshots").glob("snapshot-*")) for d in donors]
    hashes = {state_hash(path.read_bytes(), 16384).hex() for path in snapshots}  # --state-chunk-bytes
    assert len(hashes) == 1, "the donors' snapshots differ: they must serve one state"
    state_size = snapshots[0].stat().st_size

    def downloading_from() -> str | None:
        found = PROGRESS.findall(joiner.log_path.read_text()) if joiner.log_path.exists() else []
        return found[0][0] if found else None

    wait_for(lambda: downloading_from() is not None, 180, "the joiner's first verified chunks", swarm.peers)
    victim = by_id[downloading_from()]
    victim.kill()  # the whole process group: the peer and its p2pd, mid-transfer

    def download_record() -> dict | None:
        return next((r for r in joiner.metrics() if r.get("event") == "state_download"), None)

    wait_for(lambda: download_record() is not None, 240, "the joiner to adopt a state", swarm.peers)
    record = download_record()
    assert record is not None
    log = joiner.log_path.read_text()
    assert record["donor"] != victim.status().get("peer_id"), log[-3000:]
    assert record["round"] == 3 and record["reason"] == "join"
    print(f"joiner adopted the state: {record}")
    assert record["bytes_reused"] > 0, record  # the chunks verified from the killed donor were kept
    assert record["bytes_fetched"] + record["bytes_reused"] == state_size, record  # none fetched twice
    assert record["model_hash"] == hashes.pop() and record["rate_bps"] > 0
