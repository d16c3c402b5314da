"""Child processes, each in its own process group: start, watch, stop, leave no orphans.

A peer (or a hivemind worker of ``bench compare``) forks helpers of its own: hivemind's DHT
process and the ``p2pd`` daemon. Every child is therefore started in a new session, so that
its process group holds all of them and one ``killpg`` stops the lot. Used by
:mod:`p2pfm.swarm` (peer processes), ``p2pfm bench compare`` (every variant's processes)
and :mod:`p2pfm.netlab.netns` (processes inside network namespaces).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

Launcher = Callable[[list[str], Path, dict[str, str]], subprocess.Popen]
"""Starts a command line with its log file and environment: :func:`launch`, or one that runs it
elsewhere (inside a network namespace of :mod:`p2pfm.netlab.netns`)."""


def child_env(threads: int) -> dict[str, str]:
    """This process's environment for a child that runs ``threads`` torch threads.

    One BLAS/OpenMP pool per child, sized like torch's, so that children sharing the cores do
    not oversubscribe them; unbuffered output, so that a child's log is current when it dies.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def launch(argv: Sequence[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen:
    """Start ``argv`` in a new session (its own process group), stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:  # the child keeps its own descriptor
        return subprocess.Popen(
            list(argv), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=dict(env)
        )


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to ``process``'s whole group; a group that is already gone is no error."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def kill_group(process: subprocess.Popen) -> int:
    """SIGKILL ``process``'s whole group (the process, its DHT child, p2pd) and reap it."""
    signal_group(process, signal.SIGKILL)
    return process.wait()


def kill_groups(processes: Sequence[subprocess.Popen]) -> None:
    """SIGKILL the group of every process, exited ones included: after a clean exit of the
    leader, p2pd or a DHT child may still be in its group for a moment."""
    for process in processes:
        if process.poll() is None:
            kill_group(process)
        else:
            signal_group(process, signal.SIGKILL)


@dataclass(frozen=True)
class WaitOutcome:
    """How :func:`wait_all` ended: every process exited, one failed, or the deadline came."""

    failed: subprocess.Popen | None = None  # the first process seen exiting with a non-zero status
    overran: bool = False  # the deadline passed with processes still running


def wait_all(processes: Sequence[subprocess.Popen], deadline: float, poll_s: float = 0.2) -> WaitOutcome:
    """Wait until every process has exited, one exits non-zero, or ``deadline`` (``time.time()``) passes.

    Kills nothing, so that the caller can measure the processes first (then :func:`kill_groups`).
    """
    while any(p.poll() is None for p in processes):
        if time.time() > deadline:
            return WaitOutcome(overran=True)
        failed = [p for p in processes if p.poll() not in (None, 0)]
        if failed:
            return WaitOutcome(failed=failed[0])
        time.sleep(poll_s)
    return WaitOutcome(failed=next((p for p in processes if p.returncode != 0), None))


def wait_for_file(path: Path, process: subprocess.Popen, deadline: float) -> None:
    """Wait until ``process`` has written ``path``; raise as soon as it exits without, or at ``deadline``."""
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode} before writing {path}")
        if time.time() > deadline:
            raise TimeoutError(f"{path} not written in time")
        time.sleep(0.1)


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a child's log ("" if it cannot be read): where its error is."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
