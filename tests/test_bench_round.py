"""``p2pfm bench round``: the in-process round timing, and its digest for comparing code versions."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from p2pfm.bench.round import PARTS, RoundBenchConfig, format_report, run_round_bench
from p2pfm.config import ConfigError


def test_bench_round_cli_prints_seconds_per_part_and_a_digest():
    result = subprocess.run(
        [sys.executable, "-m", "p2pfm", "bench", "round", "--numel", "300007", "--rounds", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["numel"] == 300_007 and report["codec"] == "topk" and report["rounds"] == 1
    for key in ("first", "best"):
        assert set(report[key]) == set(PARTS)
        assert all(math.isfinite(s) and s > 0 for s in report[key].values())
    assert len(report["digest"]) == 64
    assert report["digest"] in format_report(report)


def test_the_digest_is_a_function_of_the_computation():
    """The same flags give the same digest (what two code versions are compared by); other inputs do not."""
    config = RoundBenchConfig(numel=5000, rounds=2, outer_momentum=0.9)
    digest = run_round_bench(config)["digest"]
    assert run_round_bench(config)["digest"] == digest
    assert (
        run_round_bench(RoundBenchConfig(numel=5000, rounds=2, outer_momentum=0.9, seed=1))["digest"]
        != digest
    )
    assert run_round_bench(RoundBenchConfig(numel=5000, rounds=2))["digest"] != digest


@pytest.mark.parametrize(
    "flags", [{"numel": 0}, {"numel": 2**33}, {"rounds": 0}, {"codec": "zip"}, {"outer_momentum": 1.0}]
)
def test_bench_round_refuses_bad_flags(flags):
    with pytest.raises(ConfigError):
        RoundBenchConfig(**flags)


def test_bench_round_cli_refuses_a_bad_size():
    result = subprocess.run(
        [sys.executable, "-m", "p2pfm", "bench", "round", "--numel", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "numel" in result.stderr
