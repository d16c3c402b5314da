"""``p2pfm attack``: its flags agree with the attack registry and its config is strict."""

from pathlib import Path

import pytest

from p2pfm.cli import build_parser
from p2pfm.cli.attack import FORGES
from p2pfm.config import ConfigError
from p2pfm.core.attacks import UPDATE_ATTACKS
from p2pfm.daemon.attacker import AttackConfig, AttackLog, last_summary, read_attack_log

MADDR = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWNsZmGQUhAhNfYLY8JEKJama1wF9GEaEZf8QCDqETHQsT"


def test_forge_names_match_the_attack_registry():
    """The CLI names the forges without importing numpy; they must be the registry's."""
    assert FORGES == tuple(UPDATE_ATTACKS)


def test_count_takes_a_number_or_per_attack_numbers():
    """``--count 7`` applies to every attack, ``--count burst=400`` to one."""
    args = build_parser().parse_args(
        [
            "attack",
            "--initial-peers",
            MADDR,
            "--run-id",
            "r",
            "--attack",
            "burst",
            "sybil",
            "--count",
            "7",
            "burst=400",
        ]
    )
    config = AttackConfig(
        initial_peers=(MADDR,), run_id="r", attacks=("burst", "sybil"), out=Path("x"), work_dir=Path("w"),
        counts=dict(args.count),
    )  # fmt: skip
    assert config.count_for("burst", 1) == 400 and config.count_for("sybil", 200) == 7


@pytest.mark.parametrize(
    "field, value",
    [("attacks", ("nonsense",)), ("forge", "nonsense"), ("state", "nonsense"), ("counts", {"burst": 0})],
)
def test_attack_config_refuses_bad_values_naming_the_field(field, value):
    """Unknown attacks, forges, states and zero counts are refused with the field's name."""
    values = dict(initial_peers=(MADDR,), run_id="r", attacks=("updates",), out=Path("x"), work_dir=Path("w"))
    with pytest.raises(ConfigError, match=field):
        AttackConfig(**{**values, field: value})


def test_drain_needs_the_final_round():
    """The drain attack waits for the swarm's last round, so it must be told which one."""
    with pytest.raises(ConfigError, match="final_round"):
        AttackConfig(
            initial_peers=(MADDR,), run_id="r", attacks=("drain",), out=Path("x"), work_dir=Path("w")
        )


def test_attack_log_summaries_count_answers_by_reason(tmp_path):
    """Each peer answer is tallied (accepted, refused by reason, failed); the last summary wins."""
    log = AttackLog(tmp_path / "a.jsonl")
    for reply in ({"ok": True}, {"ok": False, "reason": "banned"}, {"ok": False, "reason": "banned"}, None):
        log.answer("flood", reply)
    log.summaries(final=True)
    log.close()
    summary = last_summary(read_attack_log(tmp_path / "a.jsonl"), "flood")
    assert summary["accepted"] == 1 and summary["refused"] == {"banned": 2} and summary["failed"] == 1
