"""Child processes in their own groups: failures and overruns are seen, nothing outlives kill_groups."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from p2pfm.procs import child_env, kill_groups, launch, tail, wait_all

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its new parent counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_launch_starts_a_new_group_and_appends_output_to_the_log(tmp_path):
    """The child leads its own process group; its output lands at the end of the log."""
    log = tmp_path / "logs" / "child.log"
    log.parent.mkdir()
    log.write_text("earlier run\n")
    process = launch([sys.executable, "-c", "print('hello')"], log, child_env(2))
    assert os.getpgid(process.pid) == process.pid
    assert process.wait(30) == 0
    assert tail(log, 2) == "earlier run\nhello"


def test_child_env_sizes_the_blas_pool_like_torch():
    """OMP_NUM_THREADS follows the child's torch threads, output is unbuffered."""
    env = child_env(3)
    assert env["OMP_NUM_THREADS"] == "3" and env["PYTHONUNBUFFERED"]


def test_wait_all_names_the_first_process_that_failed(tmp_path):
    """A non-zero exit ends the wait at once, with the others still running; kill_groups stops them."""
    sleeper = launch(SLEEPER, tmp_path / "sleeper.log", child_env(1))
    failing = launch([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "failing.log", child_env(1))
    started = time.time()
    outcome = wait_all([sleeper, failing], deadline=time.time() + 30)
    assert outcome.failed is failing and not outcome.overran and failing.returncode == 3
    assert time.time() - started < 15 and sleeper.poll() is None
    kill_groups([sleeper, failing])
    assert sleeper.returncode is not None


def test_wait_all_overruns_at_the_deadline(tmp_path):
    """Processes still running at the deadline: overran, nobody named as failed, nothing killed."""
    sleeper = launch(SLEEPER, tmp_path / "sleeper.log", child_env(1))
    try:
        outcome = wait_all([sleeper], deadline=time.time() + 0.5)
        assert outcome.overran and outcome.failed is None and sleeper.poll() is None
    finally:
        kill_groups([sleeper])


def test_kill_groups_stops_helpers_left_by_a_leader_that_exited_cleanly(tmp_path):
    """A leader that exited 0 may leave a forked helper (p2pd) in its group: kill_groups stops it too."""
    pid_file = tmp_path / "helper.pid"
    leader = launch(
        ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; exit 0"], tmp_path / "leader.log", child_env(1)
    )
    assert wait_all([leader], deadline=time.time() + 30).failed is None
    helper = int(pid_file.read_text())
    assert not _gone(helper)
    kill_groups([leader])
    deadline = time.time() + 10
    while not _gone(helper) and time.time() < deadline:
        time.sleep(0.05)
    assert _gone(helper)
