"""``p2pfm bench compare``: the report's arithmetic, its config checks, and real quick runs.

The quick run of ``single`` and ``p2pfm`` (real peer processes on loopback) is in the default
suite (~40-60 s on 2 shared cores); the quick run of every variant, hivemind and DDP
included, is marked slow: ``pytest -m slow tests/test_bench_compare.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfm.bench.compare_config import ALL_VARIANTS, CompareConfig, quick_config
from p2pfm.bench.compare_report import default_target, format_table, summarize_runs
from p2pfm.bench.compare_variants import Point, VariantRun
from p2pfm.config import ConfigError

REQUIRED_KEYS = {"variant", "final_eval_loss", "time_to_target_s", "bytes_sent", "bits_per_param_per_round"}


def _run(
    variant: str,
    losses: list[float],
    *,
    bytes_sent: float = 0.0,
    payload: float = 0.0,
    rounds: float | None = None,
    processes: int = 2,
) -> VariantRun:
    points = [
        Point(t=10.0 * i, eval_loss=loss, samples_per_peer=80 * i, payload_bytes=payload * i / len(losses))
        for i, loss in enumerate(losses)
    ]
    return VariantRun(
        variant=variant,
        points=points,
        wall_s=10.0 * len(losses),
        cpu_s=5.0,
        bytes_sent=bytes_sent,
        payload_bytes=payload,
        comm_rounds=rounds,
        params=1000,
        processes=processes,
    )


def test_default_target_is_five_percent_above_single():
    """Without --target-loss the target is 5% above single's final loss."""
    runs = [_run("single", [5.0, 3.0, 2.0], processes=1), _run("p2pfm", [5.0, 3.5, 2.5])]
    assert default_target(runs) == pytest.approx(2.1)


def test_default_target_without_single_is_the_worst_final_loss():
    """Without single, every variant that finished reaches the target."""
    assert default_target([_run("p2pfm", [5.0, 2.5]), _run("ddp", [5.0, 2.2])]) == pytest.approx(2.5)


def test_rows_report_time_to_target_ratio_and_bits_per_param():
    """time_to_target_s is the first point at or below target; ratios are to p2pfm's; bits use payload."""
    runs = [
        _run("p2pfm", [5.0, 3.0, 2.0], payload=2000.0, rounds=10.0),
        _run("ddp", [5.0, 2.0, 1.9], payload=80_000.0, rounds=10.0),
        _run("hivemind", [5.0, 4.0, 3.0], payload=100.0, rounds=5.0),
    ]
    rows, target = summarize_runs(CompareConfig(target_loss=2.5), runs)
    by_name = {row["variant"]: row for row in rows}
    assert target == 2.5
    assert by_name["p2pfm"]["time_to_target_s"] == 20.0
    assert by_name["ddp"]["time_to_target_s"] == 10.0
    assert by_name["ddp"]["time_to_target_vs_p2pfm"] == pytest.approx(0.5)
    assert by_name["hivemind"]["time_to_target_s"] is None
    assert by_name["hivemind"]["time_to_target_vs_p2pfm"] is None
    # 2000 bytes * 8 / 1000 params / 2 peers / 10 rounds
    assert by_name["p2pfm"]["bits_per_param_per_round"] == pytest.approx(0.8)
    assert all(REQUIRED_KEYS <= row.keys() for row in rows)
    table = format_table(rows, target)
    assert "ddp" in table and "0.50" in table


def test_config_rejects_samples_that_are_not_whole_rounds():
    """samples_per_peer must be a multiple of inner_steps * batch_size (whole gossip rounds)."""
    with pytest.raises(ConfigError, match="samples_per_peer"):
        CompareConfig(samples_per_peer=1000)


def test_config_rejects_unknown_variants():
    """An unknown variant name is a ConfigError naming the choices."""
    with pytest.raises(ConfigError, match="variants"):
        CompareConfig(variants=("p2pfm", "horovod"))


def test_shaped_config_accepts_only_network_variants():
    """--shaped runs p2pfm and ddp only (hivemind and single have no namespace launcher)."""
    CompareConfig(variants=("p2pfm", "ddp"), shaped=(50.0, 30.0))
    with pytest.raises(ConfigError, match="shaped"):
        CompareConfig(variants=("p2pfm", "single"), shaped=(50.0, 30.0))


def test_quick_config_rounds_match_samples_per_peer():
    """rounds * inner_steps * batch_size == samples per peer."""
    config = quick_config()
    assert config.rounds * config.inner_steps * config.batch_size == config.samples_per_peer
    assert config.torch_threads >= 1


def _compare(tmp_path: Path, variants: str, timeout: float) -> tuple[list[dict], dict]:
    out = tmp_path / "compare"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pfm",
            "bench",
            "compare",
            "--quick",
            "--json",
            "--variants",
            variants,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert (out / "compare.png").stat().st_size > 0
    return rows, json.loads((out / "compare.json").read_text())


@pytest.mark.integration
def test_quick_compare_single_and_p2pfm_prints_json_rows(tmp_path):
    """--quick --json runs single and real p2pfm peers and prints one row per variant with the keys."""
    rows, saved = _compare(tmp_path, "single,p2pfm", timeout=300)
    assert [row["variant"] for row in rows] == ["single", "p2pfm"]
    for row in rows:
        assert REQUIRED_KEYS <= row.keys()
        assert row["error"] is None
        assert 0 < row["final_eval_loss"] < 5.5  # below ln 256: it learned something
        assert row["samples_per_peer"] == saved["config"]["samples_per_peer"]
    p2pfm = rows[1]
    assert p2pfm["bytes_sent"] > 0 and p2pfm["payload_bytes"] > 0
    assert 0 < p2pfm["bits_per_param_per_round"] < 32  # compressed gossip: below fp32 per round
    assert rows[0]["bytes_sent"] == 0 and rows[0]["bits_per_param_per_round"] is None
    assert saved["target_loss"] == pytest.approx(round(rows[0]["final_eval_loss"] * 1.05, 4))


@pytest.mark.slow
@pytest.mark.integration
def test_quick_compare_every_variant(tmp_path, request):
    """--quick runs all five variants (hivemind and DDP processes included) and reports each."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow (~3-4 min): run with -m slow")
    rows, _ = _compare(tmp_path, ",".join(ALL_VARIANTS), timeout=900)
    assert [row["variant"] for row in rows] == list(ALL_VARIANTS)
    by_name = {row["variant"]: row for row in rows}
    for row in rows:
        assert REQUIRED_KEYS <= row.keys() and row["error"] is None
    # DDP on n ranks is the same arithmetic as one process on the n shards' batch.
    assert by_name["ddp"]["final_eval_loss"] == pytest.approx(by_name["single"]["final_eval_loss"], abs=2e-3)
    assert by_name["ddp"]["bits_per_param_per_round"] == pytest.approx(32.0)
    assert (
        by_name["p2pfm"]["bits_per_param_per_round"]
        < by_name["p2pfm-uncompressed"]["bits_per_param_per_round"]
    )
