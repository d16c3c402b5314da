"""``p2pfm bench fuzz`` against a real peer process over real libp2p on loopback.

The CLI launches its own target (one ``p2pfm peer`` that serves but never trains) and sends it
2,000 fuzzed and valid messages; the in-memory version of the campaign is ``tests/test_bench_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_bench_fuzz_2000_messages_no_crash_nothing_invalid_accepted(tmp_path):
    """2,000 messages over the three streams: 0 crashes, 0 invalid accepted, every control answered."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, in the target as well
    done = subprocess.run(
        [sys.executable, "-m", "p2pfm", "bench", "fuzz", "--count", "2000", "--json", "--work-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout)
    assert result["crashes"] == 0 and result["accepted_invalid"] == 0, result["crash_evidence"]
    assert result["controls_ok"] == result["controls"] >= 20
    assert result["tried"] >= 2000
    # Deep rules were reached, not just the wrapper's: signatures, payloads, codecs, replays, bans.
    assert {"malformed", "schema", "bad_signature", "replay", "non_finite", "wrong_kind"} <= set(
        result["rejected"]
    )
    assert result["ignored"].get("banned", 0) >= 1 and result["ignored"].get("future_round", 0) >= 1
    assert (tmp_path / "target" / "status.json").exists()  # the target it launched, in the dir we gave
