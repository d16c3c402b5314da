"""Integration fixtures: real peer processes over real libp2p on loopback, no fakes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pfm.swarm import LocalSwarm, PeerProcess

# A tiny GPT keeps each round well under a second on a shared CPU while still learning
# visibly: byte-level loss falls from ln 256 = 5.5 to below 3.5 in a few hundred steps.
TINY_MODEL = [
    "--n-layer",
    "2",
    "--n-embd",
    "64",
    "--n-head",
    "4",
    "--block-size",
    "64",
    "--batch-size",
    "16",
    "--eval-batches",
    "2",
]


@pytest.fixture
def make_swarm(tmp_path: Path) -> Iterator[Callable[..., LocalSwarm]]:
    swarms: list[LocalSwarm] = []

    def factory(peer_args: list[str], run_id: str = "itest", admitted: bool = True) -> LocalSwarm:
        out = tmp_path / f"swarm-{len(swarms)}"
        out.mkdir(parents=True, exist_ok=True)
        swarm = LocalSwarm(
            out, [*TINY_MODEL, *peer_args], threads_per_peer=1, run_id=run_id, admitted=admitted
        )
        swarms.append(swarm)
        return swarm

    yield factory
    for swarm in swarms:
        swarm.stop_all()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, peers: list[PeerProcess] = ()) -> None:
    """Poll ``condition`` until true; on timeout fail with the peers' log tails."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.3)
    from p2pfm.procs import tail

    logs = "\n".join(f"--- peer {p.index} ---\n{tail(p.log_path, 15)}" for p in peers)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def round_of(peer: PeerProcess) -> int:
    return int(peer.status().get("round", 0))


def round_records(peer: PeerProcess) -> list[dict]:
    return [r for r in peer.metrics() if r.get("event") == "round"]


def wait_all_exit(peers: list[PeerProcess], timeout: float) -> None:
    wait_for(lambda: not any(p.alive for p in peers), timeout, "peers to finish their rounds", peers)
    for peer in peers:
        assert peer.process.returncode == 0, f"peer {peer.index} exited with {peer.process.returncode}"


def live_group_members(pgids: set[int]) -> list[int]:
    """Pids of processes (zombies excluded: they have exited) whose process group is in ``pgids``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state != "Z" and int(pgrp) in pgids:
            found.append(int(entry.name))
    return found
