"""The Docker Compose deployment, for real: build the image from this tree with no registry,
start `first` + 3 `peer` replicas, watch them train, stop and start containers (churn), and
check that the swarm kept training and the restarted peers came back as themselves."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dockerenv import Compose, read_json

pytestmark = pytest.mark.deploy

# The integration tests' tiny GPT: rounds of about a second on a shared CPU.
TINY_MODEL = "--n-layer 2 --n-embd 64 --n-head 4 --block-size 64 --batch-size 16 --eval-batches 2"
REPLICAS = 3  # `peer` replicas beside `first`: 4 peers on 2 cores, one torch thread each
# How long a stopped container may take to leave gracefully before docker kills it: well
# above compose.yaml's stop_grace_period (30 s), so a busy machine cannot turn the graceful
# leave this test checks into a kill.
STOP_TIMEOUT_S = "120"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Swarm:
    """What the compose test reads: each peer's status.json on the named volumes."""

    def __init__(self, compose: Compose) -> None:
        self.compose = compose

    def work_dirs(self) -> dict[str, Path]:
        """Container name -> its work dir on the host (slots are matched by owner id)."""
        dirs = {}
        for name in self.compose.containers("first"):
            dirs[name] = self.compose.volume("first-data")
        peer_data = self.compose.volume("peer-data")
        owners = {
            (p / "owner").read_text().strip(): p for p in peer_data.glob("slot-*") if (p / "owner").exists()
        }
        for name in self.compose.containers("peer"):
            cid = self.compose.engine.docker(
                "inspect", "--format", "{{.Id}}", name, quiet=True
            ).stdout.strip()
            if cid in owners:
                dirs[name] = owners[cid]
        return dirs

    def status(self) -> dict[str, dict]:
        return {name: read_json(d / "status.json") for name, d in self.work_dirs().items()}

    def rounds(self) -> dict[str, int]:
        return {name: int(s.get("round", -1)) for name, s in self.status().items()}

    def state(self, name: str) -> str:
        return self.compose.engine.docker(
            "inspect", "--format", "{{.State.Status}}", name, quiet=True
        ).stdout.strip()

    def health(self, name: str) -> str:
        return self.compose.engine.docker(
            "inspect", "--format", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", name, quiet=True
        ).stdout.strip()


def wait_for(condition: Callable[[], bool], timeout: float, what: str, swarm: Swarm) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(2)
    pytest.fail(
        f"timed out after {timeout:.0f} s waiting for {what}\nstatus: {swarm.status()}\n"
        f"{swarm.compose.logs(tail=25)}"
    )


@pytest.mark.timeout(3600)  # includes the session's image build (pytest-timeout counts fixtures)
def test_compose_swarm_trains_and_survives_stop_start(docker_engine, p2pfm_image, phases):
    """first + 3 replicas train; with first and one replica stopped the other two go on;
    started again, both resume from their checkpoints with the same identity and rejoin."""
    project = f"p2pfmdeploy{os.getpid()}"
    compose = Compose(
        docker_engine,
        project,
        {
            "P2PFM_IMAGE": p2pfm_image,
            "P2PFM_RUN_ID": "deploy-test",
            "P2PFM_ROUNDS": "0",  # until stopped
            "P2PFM_FIRST_PORT": str(free_port()),
            "P2PFM_THREADS": "1",
            "P2PFM_EXTRA_ARGS": TINY_MODEL,
        },
    )
    swarm = Swarm(compose)
    everyone = 1 + REPLICAS
    try:
        with phases(f"compose up: first + {REPLICAS} peers"):
            compose("up", "-d", "--no-build", "--scale", f"peer={REPLICAS}")
            assert len(compose.containers()) == everyone

        def all_training(min_round: int) -> bool:
            status = swarm.status()
            return len(status) == everyone and all(
                s.get("round", -1) >= min_round and len(s.get("live_peers", [])) >= everyone - 1
                for s in status.values()
            )

        with phases("swarm trains: every peer past round 3 and seeing the other 3"):
            wait_for(lambda: all_training(3), 600, "all peers training together", swarm)

        first = compose.containers("first")[0]
        victim = compose.containers("peer")[0]
        survivors = [n for n in compose.containers() if n not in (first, victim)]
        before = swarm.status()
        victim_dir = swarm.work_dirs()[victim]

        with phases("stop first (compose stop) and one replica (docker stop)"):
            compose("stop", "--timeout", STOP_TIMEOUT_S, "first")
            docker_engine.docker("stop", "--time", STOP_TIMEOUT_S, victim)
            assert swarm.state(first) == "exited" and swarm.state(victim) == "exited"
            stopped = swarm.status()
            # SIGINT reached the daemon: a graceful leave, not a kill.
            assert stopped[first]["state"] == "left" and stopped[victim]["state"] == "left"

        gone = {before[first]["peer_id"], before[victim]["peer_id"]}
        with phases("the two survivors keep training and forget the stopped peers"):
            start_rounds = swarm.rounds()

            def survivors_alone() -> bool:
                status, rounds = swarm.status(), swarm.rounds()
                return all(
                    rounds[n] >= start_rounds[n] + 3 and not gone & set(status[n]["live_peers"])
                    for n in survivors
                )

            wait_for(survivors_alone, 300, "survivors to advance 3 rounds without the stopped peers", swarm)

        with phases("start both again; they rejoin"):
            swarm_round = max(swarm.rounds()[n] for n in survivors)
            compose("start", "first")
            docker_engine.docker("start", victim)

            def rejoined() -> bool:
                status = swarm.status()
                back = all(
                    status[n].get("state") == "training"
                    and status[n]["round"] > swarm_round
                    and len(status[n]["live_peers"]) >= everyone - 1
                    for n in (first, victim)
                )
                seen = all(gone <= set(status[n]["live_peers"]) for n in survivors)
                return back and seen

            wait_for(rejoined, 600, "the restarted peers to rejoin and be seen by the survivors", swarm)
            after = swarm.status()
            # Same key on the volume, same slot: the restarted containers are the same peers.
            assert after[first]["peer_id"] == before[first]["peer_id"]
            assert after[victim]["peer_id"] == before[victim]["peer_id"]
            assert swarm.work_dirs()[victim] == victim_dir
            for name in (first, victim):
                starts = [r for r in read_metrics(swarm.work_dirs()[name]) if r.get("event") == "start"]
                assert len(starts) == 2 and starts[-1]["resumed"] is True, starts

        with phases("healthchecks report healthy"):
            # The Dockerfile's HEALTHCHECK runs every 30 s (start period 180 s): a few periods.
            wait_for(
                lambda: all(swarm.health(n) == "healthy" for n in compose.containers()),
                300,
                "every container's healthcheck to pass",
                swarm,
            )

        rounds = swarm.rounds()
        print(f"final rounds: {rounds}")
    finally:
        with phases("compose down (containers and volumes)"):
            compose.down()
            assert compose.containers() == []


def read_metrics(work_dir: Path) -> list[dict]:
    import json

    records = []
    for line in (work_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
