"""An arm64 ``p2pfm peer`` joins an x86-64 swarm and exchanges signed updates with it.

The arm64 peer runs in an arm64 Debian root under qemu-user (:mod:`arm64root`: its own
wheels, torch 2.10.0 CPU and hivemind's aarch64 ``p2pd``), the two x86-64 peers natively as
``p2pfm swarm`` runs them (an admitted swarm: one authority, a certificate per peer; the
arm64 peer gets its key and certificate the same way). All three share loopback: a chroot
shares the host's network namespace.

Pass: the arm64 peer finishes ``ARM_ROUNDS`` rounds, it accepted updates from both x86 peers
and both accepted updates from it, and it really ran on aarch64 (its interpreter's ELF
header, and ``platform.machine()`` in the process) with torch 2.10.0.

Emulation costs ~130x per training step, so the model is tiny and the x86 peers are paced
to the arm64 peer's speed (``arm64_observe/sitecustomize.py`` says why and how, and records
whose updates each peer accepted: metrics.jsonl counts them but does not say whose).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from arm64root import Arm64Root, Arm64Unavailable, build_root
from hostenv import REPO

from p2pfm.core.admission import issue_certificate
from p2pfm.core.identity import Identity
from p2pfm.procs import signal_group
from p2pfm.swarm import LocalSwarm, PeerProcess

pytestmark = pytest.mark.deploy

RUN_ID = "arm64-deploy"
ARM_ROUNDS = 3
# ~22k parameters: one arm64 inner step takes ~3 s under emulation on this machine.
TINY = [
    "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
    "--batch-size", "4", "--inner-steps", "2", "--eval-batches", "1", "--threads", "1",
]  # fmt: skip
X86_STEP_DELAY_S = 4.0  # an x86 round then lasts about as long as an emulated one (~10 s)
OBSERVE = Path(__file__).parent / "arm64_observe"
START_TIMEOUT_S = 300  # emulated start-up: torch import ~30 s, DHT and p2pd ~20 s, on a busy machine more
EXCHANGE_TIMEOUT_S = 600
EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module")
def arm64_root(root_required, phases):
    try:
        root = build_root(phases)
    except Arm64Unavailable as exc:  # not root, or qemu-user-static cannot be installed
        pytest.skip(str(exc))
    try:
        yield root
    finally:
        with phases("arm64 root: kill what runs in it, remove it"):
            root.close()


def elf_machine(path: Path) -> int:
    """The e_machine field of an ELF file (little-endian, offset 18)."""
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(header[18:20], "little")


def read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


def read_status(work: Path) -> dict:
    try:
        return json.loads((work / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def make_corpus(paths: list[Path]) -> None:
    """One small shared text (~100 KB of this repo's docs) for every peer: emulated reading
    and sharding of the default corpus (the stdlib) would cost minutes, and the two
    machines' stdlibs differ."""
    text = (REPO / "README.md").read_text() + "".join(
        p.read_text() for p in sorted((REPO / "protocols").glob("*.md"))
    )
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


class ArmPeer:
    """The arm64 ``p2pfm peer`` in the root, with one retry for the rare emulated start-up hang."""

    def __init__(self, root: Arm64Root, args: list[str]) -> None:
        self.root, self.args = root, args
        self.work = root.host_path("/work/arm64")
        self.log = self.work / "peer.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {"PYTHONPATH": "/work/observe", "P2PFM_TEST_ACCEPTED": "/work/arm64/accepted.jsonl"}
        self.process = self.root.popen(["/opt/p2pfm/bin/p2pfm", "peer", *self.args], self.log, env)

    def wait_ready(self, timeout: float) -> bool:
        """True once it has written its addresses; False on timeout; raises if it exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = read_status(self.work)
            if status.get("maddrs") and status.get("pid") == self.process.pid:
                return True
            if self.process.poll() is not None:
                raise RuntimeError(f"arm64 peer exited with {self.process.returncode}:\n{tail(self.log)}")
            time.sleep(1.0)
        return False

    def start_with_retry(self, timeout: float) -> None:
        for attempt in (1, 2):
            self.start()
            if self.wait_ready(timeout):
                return
            print(f"arm64 peer not up after {timeout:.0f} s (attempt {attempt}):\n{tail(self.log)}")
            self.kill()
        raise TimeoutError(f"arm64 peer did not start twice in a row:\n{tail(self.log)}")

    def kill(self) -> None:
        if self.process is not None:
            signal_group(self.process, signal.SIGKILL)
            self.process.wait(30)
        self.root.kill_all()

    def stop(self, grace_s: float = 60.0) -> None:
        """Graceful leave (SIGTERM), then SIGKILL whatever is left in the root."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@pytest.mark.timeout(2400)
def test_arm64_peer_exchanges_signed_updates_with_x86_peers(arm64_root: Arm64Root, tmp_path: Path, phases):
    root = arm64_root
    with phases("arm64: install checks"):
        # The console script the README's install path gives, and a really aarch64 interpreter.
        assert root.run("/opt/p2pfm/bin/p2pfm", "--version").stdout.startswith("p2pfm ")
        interpreter = root.resolve("/opt/p2pfm/bin/python")
        assert elf_machine(interpreter) == EM_AARCH64, f"{interpreter} is not an aarch64 binary"

    corpus = tmp_path / "corpus.txt"
    make_corpus([corpus, root.host_path("/work/corpus.txt")])
    shutil.copytree(OBSERVE, root.host_path("/work/observe"))

    common = ["--data", str(corpus), "--min-peers", "3", "--rounds", "0", *TINY]
    swarm = LocalSwarm(tmp_path / "x86", common, threads_per_peer=1, run_id=RUN_ID)
    x86: list[PeerProcess] = []
    for shard in (0, 1):
        peer = swarm.add_peer(shard=shard, num_shards=3)
        peer.env = {
            **swarm.env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(OBSERVE), os.environ.get("PYTHONPATH")])),
            "P2PFM_TEST_ACCEPTED": str(peer.work_dir / "accepted.jsonl"),
            "P2PFM_TEST_STEP_DELAY_S": str(X86_STEP_DELAY_S),
        }
        x86.append(peer)

    arm_work = root.host_path("/work/arm64")
    arm_work.mkdir(parents=True)
    identity = Identity.generate()
    identity.save(arm_work / "peer.key")
    assert swarm.authority is not None
    cert = issue_certificate(swarm.authority, RUN_ID, identity.peer_id, issued=time.time())
    (arm_work / "peer.cert").write_bytes(cert)

    arm: ArmPeer | None = None
    try:
        with phases("arm64: two x86 peers start"):
            for peer in x86:
                swarm.start_peer(peer)
        arm_args = [
            "--work-dir", "/work/arm64", "--key", "/work/arm64/peer.key", "--run-id", RUN_ID,
            "--authority", swarm.authority.peer_id, "--cert", "/work/arm64/peer.cert",
            "--shard", "2", "--num-shards", "3", "--initial-peers", str(swarm.bootstrap),
            "--data", "/work/corpus.txt", "--min-peers", "3", "--rounds", "0", *TINY,
        ]  # fmt: skip
        arm = ArmPeer(root, arm_args)
        with phases("arm64: emulated peer starts (import, DHT, p2pd)"):
            arm.start_with_retry(START_TIMEOUT_S)

        arm_id = identity.peer_id
        x86_ids = [read_status(p.work_dir).get("peer_id") for p in x86]
        assert all(x86_ids), "x86 peers wrote no peer id"

        def arm_rounds() -> list[dict]:
            return [r for r in read_jsonl(arm_work / "metrics.jsonl") if r.get("event") == "round"]

        def senders(work: Path) -> set[str]:
            return {r["sender"] for r in read_jsonl(work / "accepted.jsonl")}

        def done() -> bool:
            return (
                len(arm_rounds()) >= ARM_ROUNDS
                and set(x86_ids) <= senders(arm_work)
                and all(arm_id in senders(p.work_dir) for p in x86)
            )

        with phases(f"arm64: {ARM_ROUNDS} rounds with updates both ways"):
            deadline = time.monotonic() + EXCHANGE_TIMEOUT_S
            while not done():
                dead = [f"x86 peer {p.index}" for p in x86 if not p.alive]
                if arm.process.poll() is not None:
                    dead.append("arm64 peer")
                if dead or time.monotonic() > deadline:
                    pytest.fail(
                        f"{'exited: ' + ', '.join(dead) if dead else 'timed out'}; arm64 rounds "
                        f"{len(arm_rounds())}, arm64 accepted from {senders(arm_work)}, x86 accepted "
                        f"from {[senders(p.work_dir) for p in x86]} (arm64 is {arm_id})\n"
                        f"--- arm64 ---\n{tail(arm.log)}\n"
                        + "\n".join(f"--- x86 {p.index} ---\n{tail(p.log_path)}" for p in x86)
                    )
                time.sleep(1.0)

        accepted_by_arm = read_jsonl(arm_work / "accepted.jsonl")
        assert {r["machine"] for r in accepted_by_arm} == {"aarch64"}
        assert {r["torch"].split("+")[0] for r in accepted_by_arm} == {"2.10.0"}
        for peer in x86:
            records = [r for r in read_jsonl(peer.work_dir / "accepted.jsonl") if r["sender"] == arm_id]
            assert {r["machine"] for r in records} == {"x86_64"}
        rounds = arm_rounds()
        assert any(r["received_updates"] > 0 for r in rounds), "arm64 merged no update in its rounds"
        # torch 2.10 on aarch64 trains the GPT: finite losses, the steps counted.
        assert all(math.isfinite(r["train_loss"]) and r["step"] > 0 for r in rounds), rounds
        # Honest peers: nothing any of them sent was refused as bad (stale or late is no offence).
        for name, work in [("arm64", arm_work), *((f"x86 {p.index}", p.work_dir) for p in x86)]:
            last = [r for r in read_jsonl(work / "metrics.jsonl") if r.get("event") == "round"][-1]
            assert last["messages_rejected"] == {}, f"{name} rejected messages: {last['messages_rejected']}"
        print(
            f"arm64 rounds {[r['round'] for r in rounds]}, received per round "
            f"{[r['received_updates'] for r in rounds]}, round seconds "
            f"{[round(r['round_seconds'], 1) for r in rounds]}; arm64 accepted "
            f"{len(accepted_by_arm)} updates, x86 peers accepted "
            f"{[sum(r['sender'] == arm_id for r in read_jsonl(p.work_dir / 'accepted.jsonl')) for p in x86]} "
            "from arm64"
        )
    finally:
        with phases("arm64: stop the peers"):
            if arm is not None:
                arm.stop()
            swarm.stop_all()
            root.kill_all()
