"""The library API trains a user's own model across two real peer processes."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfm.daemon.metrics import read_metrics

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_own_model.py"


def run_in_own_group(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``args`` in a process group of its own and kill the whole group on every exit path
    (a timeout or a failing assertion must not leave peers, DHT children or p2pd running)."""
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def test_example_two_peers_train_own_model(tmp_path):
    """examples/train_own_model.py: both peers finish, gossip rounds happen, held-out MSE falls."""
    # Generous: the peers wait for each other by handshake, not by timing, so this only bounds a hang.
    result = run_in_own_group(
        [sys.executable, str(EXAMPLE), "--steps", "300", "--work-dir", str(tmp_path)], timeout=540
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before = {
        int(m[0]): float(m[1])
        for m in re.findall(r"peer (\d): eval MSE on the other shard before: ([\d.]+)", result.stdout)
    }
    after = {
        int(m[0]): (int(m[1]), float(m[2]))
        for m in re.findall(
            r"peer (\d): eval MSE on the other shard after (\d+) rounds: ([\d.]+)", result.stdout
        )
    }
    assert set(before) == set(after) == {0, 1}, result.stdout
    for peer in (0, 1):
        rounds, mse = after[peer]
        assert rounds >= 25
        assert mse < 0.75 * before[peer]
    # Gossip really crossed between the two processes, both ways.
    for peer in (0, 1):
        rounds = [
            r for r in read_metrics(tmp_path / f"peer{peer}" / "metrics.jsonl") if r.get("event") == "round"
        ]
        assert sum(r["received_updates"] for r in rounds) > 0, f"peer {peer} never merged an update"
        assert rounds[-1]["messages_accepted"] > 0, f"peer {peer} accepted no message"
