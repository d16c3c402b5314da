"""The live peer's policy readings (p2pfm.daemon.readings) and its [policy] config."""

from __future__ import annotations

import json

import pytest

from p2pfm.config import ConfigError
from p2pfm.core.policy import PolicyConfig, PolicyGate
from p2pfm.daemon.config import load_peer_config
from p2pfm.daemon.readings import ReadingSource, parse_overrides

SCHEDULE = "\n".join(f"{h},{100 if h < 12 else 500}" for h in range(24)) + "\n"


def test_overrides_file_drives_the_gate_and_is_reread(tmp_path):
    """The integration tests' knob: writing the file pauses, rewriting it resumes (fake clock)."""
    overrides = tmp_path / "readings.json"
    now = [0.0]
    config = PolicyConfig(
        rules=("plugged-in", "idle-only"), readings=str(overrides), min_run_s=0, min_pause_s=5
    )
    source = ReadingSource(config, clock=lambda: now[0])
    gate = PolicyGate(config)
    overrides.write_text(json.dumps({"plugged": True, "other_load": 0.1}))
    assert gate.decide(source.read()).run
    overrides.write_text(json.dumps({"plugged": False, "battery_percent": 40, "other_load": 0.1}))
    now[0] = 1.0
    decision = gate.decide(source.read())
    assert not decision.run and decision.reason == "on battery (40%)"
    overrides.write_text(json.dumps({"plugged": True, "other_load": 0.0}))
    now[0] = 3.0
    assert not gate.decide(source.read()).run  # min_pause_s = 5
    now[0] = 6.0
    assert gate.decide(source.read()).run


def test_schedule_gives_the_intensity_of_the_hour(tmp_path):
    schedule = tmp_path / "grid.csv"
    schedule.write_text(SCHEDULE)
    overrides = tmp_path / "readings.json"
    config = PolicyConfig(rules=("carbon-aware",), carbon_schedule=str(schedule), readings=str(overrides))
    source = ReadingSource(config, clock=lambda: 0.0, local_hour=lambda _: 11.5)
    assert source.read().grid_g_per_kwh == 100.0
    overrides.write_text('{"hour": 13}')
    assert source.read().grid_g_per_kwh == 500.0


def test_region_gives_a_fixed_intensity():
    source = ReadingSource(PolicyConfig(rules=("carbon-aware",), region="FRA"), clock=lambda: 0.0)
    assert source.read().grid_g_per_kwh == 56.0


def test_bad_overrides_are_ignored_not_fatal(tmp_path):
    overrides = tmp_path / "readings.json"
    overrides.write_text('{"other_load": 7}')
    source = ReadingSource(PolicyConfig(rules=("always",), readings=str(overrides)), clock=lambda: 0.0)
    assert source.read().other_load is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[1]", "expected a JSON object"),
        (b"{", "not JSON"),
        (b'{"sun": 1}', "unknown key 'sun'"),
        (b'{"plugged": 1}', "plugged must be true or false"),
        (b'{"other_load": -0.1}', r"other_load must be a number in \[0, 1\]"),
        (b'{"grid_g_per_kwh": 1e9}', "grid_g_per_kwh must be"),
        (b'{"hour": 24}', "hour must be"),
        (b" " * 5000, "exceeds 4096"),
    ],
)
def test_overrides_are_checked(data, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(data, "readings.json")


def test_other_load_from_psutil_is_a_share():
    source = ReadingSource(PolicyConfig(rules=("idle-only",)))
    source.read()
    load = source.read().other_load
    assert load is not None and 0.0 <= load <= 1.0


def test_peer_config_policy_table_is_strict(tmp_path):
    config = load_peer_config(
        None, {"policy.rules": ["plugged-in", "idle-only"], "policy.idle_threshold": 0.7}
    )
    assert config.policy.rules == ("plugged-in", "idle-only") and config.policy.idle_threshold == 0.7
    with pytest.raises(ConfigError, match=r"policy\.rules"):
        load_peer_config(None, {"policy.rules": ["solar"]})
    with pytest.raises(ConfigError, match="unknown config key"):
        load_peer_config(None, {"policy.sunshine": 1})
    bad = tmp_path / "grid.csv"
    bad.write_text(SCHEDULE.replace("3,100", "3,abc"))
    with pytest.raises(ConfigError, match=r"grid.csv line 4: intensity 'abc' is not a number"):
        load_peer_config(None, {"policy.rules": ["carbon-aware"], "policy.carbon_schedule": str(bad)})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_peer_config(
            None, {"policy.rules": ["carbon-aware"], "policy.carbon_schedule": str(tmp_path / "no")}
        )


def test_policy_flag_reaches_the_config_and_passes_through_the_swarm():
    """``--policy a,b`` gives rules (a, b) to a peer, and ``p2pfm swarm`` hands peers the same flag."""
    import argparse

    from p2pfm.cli.peer import add_peer_flags, overrides_from_args
    from p2pfm.cli.swarm import _passthrough

    parser = argparse.ArgumentParser()
    add_peer_flags(parser)
    args = parser.parse_args(["--policy", "plugged-in, idle-only", "--idle-threshold", "0.7"])
    config = load_peer_config(None, overrides_from_args(args))
    assert config.policy.rules == ("plugged-in", "idle-only") and config.policy.idle_threshold == 0.7
    passed = _passthrough(args)
    assert passed[passed.index("--policy") + 1] == "plugged-in,idle-only"
