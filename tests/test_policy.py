"""Energy policies (p2pfm.core.policy): rules, combinations, hysteresis, dwell times, schedules."""

from __future__ import annotations

import pytest

from p2pfm.config import ConfigError, build_config
from p2pfm.core.policy import (
    PolicyConfig,
    PolicyGate,
    Readings,
    ScheduleError,
    intensity_at,
    parse_schedule,
)

NO_DWELL = {"min_run_s": 0.0, "min_pause_s": 0.0}


def gate(*rules: str, **changes) -> PolicyGate:
    return PolicyGate(PolicyConfig(rules=rules, **{**NO_DWELL, **changes}))


def test_always_never_pauses():
    g = gate("always")
    for t, load in enumerate([0.0, 1.0, 0.99]):
        decision = g.decide(Readings(now=t, plugged=False, other_load=load, grid_g_per_kwh=900.0))
        assert decision.run and not decision.changed


def test_plugged_in_pauses_on_battery_and_resumes_on_mains():
    g = gate("plugged-in")
    assert g.decide(Readings(0, plugged=True, battery_percent=80)).run
    paused = g.decide(Readings(1, plugged=False, battery_percent=79))
    assert (paused.run, paused.changed, paused.reason) == (False, True, "on battery (79%)")
    assert not g.decide(Readings(2, plugged=False)).run
    resumed = g.decide(Readings(3, plugged=True))
    assert resumed.run and resumed.changed


def test_plugged_in_allows_a_device_without_battery():
    decision = gate("plugged-in").decide(Readings(0, plugged=None))
    assert decision.run and "no battery" in decision.reason


def test_idle_only_has_hysteresis():
    """Pauses above the threshold; resumes only at threshold - margin or below (no flapping at 0.5)."""
    g = gate("idle-only", idle_threshold=0.5, idle_margin=0.1)
    assert g.decide(Readings(0, other_load=0.5)).run  # at the threshold: still allowed
    assert not g.decide(Readings(1, other_load=0.51)).run
    assert not g.decide(Readings(2, other_load=0.45)).run  # below the threshold, within the margin
    decision = g.decide(Readings(3, other_load=0.40))
    assert decision.run and decision.changed


def test_carbon_aware_follows_the_grid_with_margin():
    g = gate("carbon-aware", carbon_threshold=300.0, carbon_margin_g=20.0, region="DEU")
    assert g.decide(Readings(0, grid_g_per_kwh=299.0)).run
    paused = g.decide(Readings(1, grid_g_per_kwh=350.0))
    assert not paused.run and paused.reason == "grid 350 g/kWh > 300"
    assert not g.decide(Readings(2, grid_g_per_kwh=290.0)).run
    assert g.decide(Readings(3, grid_g_per_kwh=280.0)).run


def test_carbon_aware_pauses_when_intensity_is_unknown():
    g = gate("carbon-aware", region="FRA")
    assert not g.decide(Readings(0)).run


def test_combination_all_must_allow_and_every_objection_is_named():
    g = gate("plugged-in", "idle-only", "carbon-aware", region="DEU")
    ok = Readings(0, plugged=True, other_load=0.1, grid_g_per_kwh=100.0)
    assert g.decide(ok).run
    bad = g.decide(Readings(1, plugged=False, other_load=0.9, grid_g_per_kwh=100.0))
    assert not bad.run
    assert bad.reasons == ("on battery", "other load 0.90 > 0.50")
    # One objection left: still paused.
    assert not g.decide(Readings(2, plugged=True, other_load=0.9, grid_g_per_kwh=100.0)).run
    assert g.decide(Readings(3, plugged=True, other_load=0.2, grid_g_per_kwh=100.0)).run


def test_dwell_times_hold_a_state():
    """A fresh peer may pause at once; then it stays paused min_pause_s and running min_run_s."""
    g = PolicyGate(PolicyConfig(rules=("plugged-in",), min_run_s=60.0, min_pause_s=30.0))
    assert not g.decide(Readings(0.0, plugged=False)).run
    assert not g.decide(Readings(29.9, plugged=True)).run  # min_pause_s not yet over
    resumed = g.decide(Readings(30.0, plugged=True))
    assert resumed.run and resumed.changed
    held = g.decide(Readings(89.0, plugged=False))  # min_run_s not over: keeps training
    assert held.run and not held.changed and held.reasons == ("on battery",)
    assert not g.decide(Readings(90.0, plugged=False)).run


def test_gate_is_deterministic():
    readings = [Readings(t, plugged=t % 3 != 0, other_load=(t * 0.37) % 1.0) for t in range(50)]

    def run() -> list[tuple[bool, bool, str]]:
        g = PolicyGate(PolicyConfig(rules=("plugged-in", "idle-only"), min_run_s=2.0, min_pause_s=3.0))
        return [(d.run, d.changed, d.reason) for d in map(g.decide, readings)]

    first = run()
    assert first == run()
    assert any(changed for _, changed, _ in first)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"rules": ["solar"]}, "policy.rules"),
        ({"rules": []}, "policy.rules"),
        ({"rules": ["always", "always"]}, "policy.rules"),
        ({"idle_threshold": 1.5}, "policy.idle_threshold"),
        ({"idle_threshold": 0.3, "idle_margin": 0.3}, "policy.idle_margin"),
        ({"carbon_threshold": -1.0}, "policy.carbon_threshold"),
        ({"min_pause_s": -1.0}, "policy.min_pause_s"),
        ({"check_every_s": 0.0}, "policy.check_every_s"),
        ({"region": "MARS"}, "policy.region"),
        ({"rules": ["carbon-aware"]}, "policy.carbon_schedule"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config(PolicyConfig, values, where="policy")


def test_config_from_a_table():
    config = build_config(PolicyConfig, {"rules": ["plugged-in", "carbon-aware"], "region": "DEU"})
    assert config.rules == ("plugged-in", "carbon-aware") and config.active
    assert not PolicyConfig().active


SCHEDULE = "# hour, g/kWh\n" + "\n".join(f"{h},{300 + h}" for h in range(24)) + "\n"


def test_schedule_parses_any_order_comments_and_spaces():
    lines = SCHEDULE.splitlines()
    text = "\n".join([lines[0], *reversed(lines[1:])]).replace("5,305", "5   305  # morning") + "\n\n"
    schedule = parse_schedule(text, "grid.csv")
    assert schedule == tuple(300.0 + h for h in range(24))
    assert intensity_at(schedule, 5.99) == 305.0 and intensity_at(schedule, 24.5) == 300.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.replace("7,307", "24,307"), "grid.csv line 9: hour 24 outside 0-23"),
        (lambda s: s.replace("7,307", "7,lots"), "grid.csv line 9: intensity 'lots' is not a number"),
        (lambda s: s.replace("7,307", "seven,307"), "grid.csv line 9: hour 'seven' is not an integer"),
        (lambda s: s.replace("7,307", "7,307,1"), "grid.csv line 9: expected HOUR,G_PER_KWH"),
        (lambda s: s.replace("7,307", "7,nan"), r"grid.csv line 9: intensity nan outside \[0, 5000\]"),
        (lambda s: s.replace("7,307", "7,-1"), r"grid.csv line 9: intensity -1.0 outside"),
        (lambda s: s.replace("7,307", "8,1"), "grid.csv line 10: hour 8 given twice"),
        (lambda s: s.replace("7,307\n", ""), r"grid.csv: no intensity for hour\(s\) 7"),
        (lambda s: s + "\n" * 1000, "lines exceeds 1000"),
        (lambda s: s + "#" * 70000, "characters exceeds"),
    ],
)
def test_schedule_errors_name_line_and_reason(change, message):
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(change(SCHEDULE), "grid.csv")


def test_lifecycle_pause_and_resume_transitions():
    """Pauses happen only while training; a paused peer resumes, catches up, or leaves."""
    from p2pfm.core.protocol import TRANSITIONS, Event, InvalidTransition, Phase

    assert TRANSITIONS[(Phase.TRAINING, Event.PAUSE)] is Phase.PAUSED
    assert TRANSITIONS[(Phase.PAUSED, Event.RESUME)] is Phase.TRAINING
    assert TRANSITIONS[(Phase.PAUSED, Event.BEHIND)] is Phase.CATCHING_UP
    assert TRANSITIONS[(Phase.PAUSED, Event.STOP)] is Phase.LEFT
    for phase in (Phase.STARTING, Phase.JOINING, Phase.CATCHING_UP, Phase.DRAINING, Phase.PAUSED):
        assert (phase, Event.PAUSE) not in TRANSITIONS
    assert (Phase.PAUSED, Event.ROUNDS_DONE) not in TRANSITIONS
    assert issubclass(InvalidTransition, RuntimeError)
