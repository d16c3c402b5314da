"""A real 3-peer swarm on a --data folder holding one 1.1 MB text file: byte-range shards train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_MODEL
from tests.test_data import english_like

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_swarm_trains_three_peers_on_one_big_file(tmp_path):
    """`p2pfm swarm --peers 3 --data DIR` with one 1.1 MB file exits 0 and reports three non-empty shards."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "book.txt").write_text(english_like(1_100_000, seed=7))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's p2pfm, whatever is installed
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pfm",
            "swarm",
            "--peers",
            "3",
            "--rounds",
            "3",
            "--data",
            str(data),
            "--json",
            "--out",
            str(tmp_path / "run"),
            "--threads-per-peer",
            "1",
            *TINY_MODEL,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    split = summary["data_split"]
    assert split["corpus_bytes"] == 1_100_000
    assert split["holdout_bytes"] > 0
    assert set(split["shard_bytes"]) == {"0", "1", "2"} and all(b > 0 for b in split["shard_bytes"].values())
    assert sum(split["shard_bytes"].values()) + split["holdout_bytes"] == 1_100_000
    assert summary["rounds"] == 3
