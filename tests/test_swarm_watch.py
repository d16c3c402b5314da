"""How the local swarm tells a failed peer from a finished one, and what its progress bar says.

The failure checks run on real (tiny, network-free) processes standing in for peers: only the
exit status, the peer's status.json and its log matter to them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from p2pfm.swarm import PeerProcess, error_excerpt, first_failure, peer_failure, swarm_phase


def exited_peer(
    tmp_path: Path, index: int, code: str, *, log: str = "", round_done: int | None = None
) -> PeerProcess:
    """A PeerProcess whose process ran ``code`` (Python) and exited, with ``log`` in its peer.log."""
    peer = PeerProcess(index=index, work_dir=tmp_path / f"peer-{index}", args=[], env={})
    peer.work_dir.mkdir(parents=True)
    peer.log_path.write_text(log)
    peer.process = subprocess.Popen([sys.executable, "-c", code])
    peer.process.wait(timeout=60)
    if round_done is not None:
        status = {"pid": peer.process.pid, "round": round_done, "state": "left"}
        (peer.work_dir / "status.json").write_text(json.dumps(status))
    return peer


def test_non_zero_exit_is_a_failure_carrying_the_peers_error(tmp_path):
    """A peer that exits 2 at start-up fails with its reason and its own error line."""
    log = "INFO starting\np2pfm: error: data: shard 1 of 3 is empty (0 training files)\n"
    peer = exited_peer(tmp_path, 1, "raise SystemExit(2)", log=log)
    failure = peer_failure(peer, rounds=10)
    assert failure is not None
    assert failure.index == 1
    assert failure.reason == "exited with status 2 at start-up"
    assert "p2pfm: error: data: shard 1 of 3 is empty" in str(failure)
    assert str(peer.log_path) in str(failure)


def test_zero_exit_counts_only_after_all_rounds(tmp_path):
    """Status 0 is success when the peer's status shows its rounds done, a failure before that."""
    finished = exited_peer(tmp_path, 0, "pass", round_done=10)
    left_early = exited_peer(tmp_path, 1, "pass", round_done=4)
    assert peer_failure(finished, rounds=10) is None
    failure = peer_failure(left_early, rounds=10)
    assert failure is not None
    assert failure.reason == "exited with status 0 during round 5, before its 10 rounds were done"


def test_killed_peer_names_the_signal(tmp_path):
    """A crash (SIGKILL) is reported as such, not as an exit status of -9."""
    peer = exited_peer(tmp_path, 2, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    failure = peer_failure(peer, rounds=10)
    assert failure is not None and failure.reason == "was killed by SIGKILL at start-up"


def test_running_and_unstarted_peers_have_not_failed(tmp_path):
    """Only exited peers can fail; first_failure returns the first one in peer order."""
    unstarted = PeerProcess(index=0, work_dir=tmp_path / "peer-0", args=[], env={})
    running = PeerProcess(index=1, work_dir=tmp_path / "peer-1", args=[], env={})
    running.process = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        failed_a = exited_peer(tmp_path, 2, "raise SystemExit(1)")
        failed_b = exited_peer(tmp_path, 3, "raise SystemExit(3)")
        assert peer_failure(unstarted, rounds=5) is None
        assert peer_failure(running, rounds=5) is None
        assert first_failure([unstarted, running], rounds=5) is None
        failure = first_failure([unstarted, running, failed_a, failed_b], rounds=5)
        assert failure is not None and failure.index == 2
    finally:
        running.process.communicate(timeout=60)


def test_error_excerpt_keeps_the_whole_last_traceback():
    """A traceback longer than the default tail is shown from its first line; plain logs give their tail."""
    noise = [f"INFO line {i}" for i in range(50)]
    frames = [f'  File "x.py", line {i}, in f' for i in range(20)]
    text = "\n".join([*noise, "Traceback (most recent call last):", *frames, "ValueError: boom"])
    excerpt = error_excerpt(text).splitlines()
    assert excerpt[0] == "Traceback (most recent call last):"
    assert excerpt[-1] == "ValueError: boom"
    assert error_excerpt("\n".join(noise)).splitlines() == noise[-12:]


def test_phase_uses_the_quorum_of_the_slowest_joiner():
    """Joining peers' quorum reports drive "waiting for peers have/need", with the time waited."""
    statuses = [
        {
            "state": "joining",
            "quorum": {
                "need": 3,
                "have": 2,
                "seen": ["b"],
                "unconfirmed": [],
                "waited_s": 12.4,
                "deadline_s": 300.0,
            },
        },
        {
            "state": "joining",
            "quorum": {
                "need": 3,
                "have": 1,
                "seen": [],
                "unconfirmed": [],
                "waited_s": 3.0,
                "deadline_s": 300.0,
            },
        },
        {},
    ]
    assert swarm_phase(statuses, 3) == "waiting for peers 1/3 (12 s of 300 s)"
    assert swarm_phase([{"state": "joining", "quorum": {"need": 3, "have": 2}}], 3) == "waiting for peers 2/3"


def test_phase_without_quorum_reports_counts_the_peers_that_are_up():
    """Daemons that write no quorum: the bar counts peers with a status, then says training."""
    assert swarm_phase([{}, {}, {}], 3) == "waiting for peers 0/3"
    assert swarm_phase([{"state": "joining"}, {}, {}], 3) == "waiting for peers 1/3"
    assert swarm_phase([{"state": "training"}, {"state": "joining"}, {}], 3) == "waiting for peers 2/3"
    assert swarm_phase([{"state": "training"}, {"state": "training"}, {"state": "draining"}], 3) == "training"
    assert swarm_phase([{"state": "left"}, {"state": "draining"}, {"state": "left"}], 3) == "finishing"
