"""Availability traces: good files parse, every malformed file names its line and reason."""

import math
from pathlib import Path

import pytest

from p2pfm.cli import main as cli_main
from p2pfm.config import ConfigError
from p2pfm.sim.churn import TraceChurn
from p2pfm.sim.engine import Simulation
from p2pfm.sim.scenario import load_scenario, scenario_from_dict
from p2pfm.sim.traces import WEEK_S, TraceError, convert_phone_trace, load_trace, parse_trace

SIM = Path(__file__).resolve().parents[1] / "sim"


def test_trace_parses_intervals_in_order_of_first_appearance():
    """Rows group by device, sorted by start; devices keep their first-appearance order."""
    trace = parse_trace("device,start_s,end_s\nb,10,20\na,0,5\nb,0,5\n")
    assert trace.devices == ("b", "a")
    assert trace.intervals["b"] == ((0.0, 5.0), (10.0, 20.0))
    assert trace.for_peer(3) == trace.intervals["a"]  # round-robin: peer 3 -> device 1


def test_trace_accepts_columns_in_any_order_and_blank_lines():
    """Columns are found by name; blank lines are skipped."""
    trace = parse_trace("end_s,device,start_s\n\n5,a,1\n")
    assert trace.intervals["a"] == ((1.0, 5.0),)


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("", 0, "file is empty"),
        ("a,0,10\nb,5,6\n", 1, "missing header"),
        ("device,start_s\na,0\n", 1, "missing column end_s"),
        ("device,start_s,end_s\na,0,10\nb,x,3\n", 3, "start_s is not a number"),
        ("device,start_s,end_s\na,0,nan\n", 2, "end_s is not finite"),
        ("device,start_s,end_s\na,5,5\n", 2, "end_s (5) must be greater than start_s (5)"),
        ("device,start_s,end_s\na,10,3\n", 2, "must be greater than start_s"),
        ("device,start_s,end_s\na,-1,3\n", 2, "start_s is negative"),
        ("device,start_s,end_s\na,0,10\nb,0,10\na,5,15\n", 4, "overlaps line 2"),
        ("device,start_s,end_s\na,0,10,7\n", 2, "expected 3 fields, got 4"),
        ("device,start_s,end_s\n,0,10\n", 2, "device is empty"),
        ("device,start_s,end_s\n", 0, "no intervals"),
        ("device,device,start_s,end_s\na,a,0,1\n", 1, "duplicate column device"),
    ],
)
def test_trace_rejects_malformed_input_naming_line_and_reason(text, line, reason):
    """Each malformed trace raises TraceError with the offending line number and the reason."""
    with pytest.raises(TraceError) as info:
        parse_trace(text, source="t.csv")
    assert info.value.line == line
    assert reason in info.value.reason
    assert (f"t.csv:{line}" if line else "t.csv") in str(info.value)


def test_trace_missing_file_is_a_config_error(tmp_path):
    """A missing trace file is reported by path, not as a traceback."""
    with pytest.raises(TraceError, match="does not exist"):
        load_trace(tmp_path / "nope.csv")


def test_trace_churn_replays_intervals():
    """Peers go online at interval starts and offline at interval ends."""
    churn = TraceChurn(parse_trace("device,start_s,end_s\na,0,10\na,20,30\n"))
    assert churn.initial_online(0)
    assert churn.next_change(0, 0.0, True) == 10.0
    assert churn.next_change(0, 10.0, False) == 20.0
    assert churn.next_change(0, 20.0, True) == 30.0
    assert churn.next_change(0, 30.0, False) is None


def week_scenario(tmp_path, scale: float | None):
    """Four peers on a week-long trace: online the first 4 days, offline 1, online again from day 5 on."""
    day = 86400
    (tmp_path / "week.csv").write_text(
        f"device,start_s,end_s\na,0,{4 * day}\na,{5 * day},{8 * day}\nb,0,{8 * day}\n"
    )
    churn = {"model": "trace", "trace": str(tmp_path / "week.csv")}
    if scale is not None:
        churn["trace_time_scale"] = scale
    return scenario_from_dict(
        {
            "name": "week",
            "peers": 4,
            "rounds": 28,
            "round_seconds": 0.25,  # 7 virtual seconds: one per trace day at scale 1/86400
            "eval_every": 4,
            "workload": {"mlp": {"samples_per_peer": 32, "eval_samples": 64, "hidden": 8}},
            "gossip": {"inner_steps": 2},
            "churn": churn,
        }
    )


def test_trace_time_scale_replays_a_week_long_trace_across_the_whole_run(tmp_path):
    """Scaled, the day-4 leave and day-5 rejoin fall inside the run; unscaled, nothing happens."""
    scaled = Simulation(week_scenario(tmp_path, 1 / 86400)).run()
    changes = [t for t, _ in scaled.metrics.online_curve[1:]]
    assert changes == pytest.approx([4.0, 4.0, 5.0, 5.0])  # peers 0 and 2 follow device a
    assert all(t > scaled.end_time / 2 for t in changes)
    assert scaled.metrics.leaves == scaled.metrics.joins == 2
    unscaled = Simulation(week_scenario(tmp_path, None)).run()
    assert len(unscaled.metrics.online_curve) == 1 and unscaled.metrics.leaves == 0


def test_trace_time_scale_one_leaves_the_trace_as_it_is():
    """The default scale returns the very same intervals, so unscaled recorded runs replay bit for bit."""
    trace = parse_trace("device,start_s,end_s\na,0.1,0.3\n")
    assert trace.scaled(1.0) is trace
    assert trace.scaled(2.0).intervals["a"] == ((0.2, 0.6),)
    assert trace.span_s == 0.3


@pytest.mark.parametrize("value", [0, -1.0, 0.0, math.inf, -math.inf, math.nan, 1e-10, 2e6, "fast", True])
def test_trace_time_scale_rejects_bad_values_naming_the_field(value):
    """Zero, negative, infinite, NaN, out-of-bounds and non-numbers are ConfigErrors naming the field."""
    with pytest.raises(ConfigError, match=r"churn\.trace_time_scale"):
        scenario_from_dict({"name": "x", "peers": 2, "rounds": 1, "churn": {"trace_time_scale": value}})


def test_trace_time_scale_rejected_from_a_toml_file_by_field(tmp_path):
    """TOML's nan and inf are refused too, with the file and the field in the message."""
    path = tmp_path / "s.toml"
    path.write_text('name = "x"\npeers = 2\nrounds = 1\n[churn]\ntrace_time_scale = nan\n')
    with pytest.raises(ConfigError, match=r"s\.toml: churn\.trace_time_scale: must be a finite number"):
        load_scenario(path)


def test_converter_turns_user_weeks_in_ms_into_our_csv():
    """One device per user-week, exact seconds, overlapping and touching intervals merged, header skipped."""
    text = "user_id,week,intervals\nu1,3,0:1500;1500:2000;5000:9000;8000:10250\nu2,3,\nu1,4,604799000:604800000\n"
    result = convert_phone_trace(text)
    assert result.csv == "device,start_s,end_s\nu1-w3,0,2\nu1-w3,5,10.25\nu1-w4,604799,604800\n"
    assert (result.devices, result.intervals_in, result.intervals_out, result.empty_dropped) == (2, 5, 3, 1)
    assert result.span_s == WEEK_S and result.time_scale_for(30.0) == 30.0 / WEEK_S
    parse_trace(result.csv)  # what it writes, our parser reads


def test_converter_with_absolute_times_joins_weeks_per_user_from_the_earliest_start():
    """Absolute (epoch) ms: one device per user, shifted so the earliest start is 0."""
    result = convert_phone_trace(
        "u1,1,1700000001000:1700000002000\nu1,2,1700000005000:1700000006500\n", absolute=True
    )
    assert result.csv == "device,start_s,end_s\nu1,0,1\nu1,4,5.5\n"
    assert result.span_s == 5.5


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("u1,1,5:3\n", 1, "end_ms (3) must be greater than start_ms (5)"),
        ("u1,1,0:10\nu1,x,0:10\n", 2, "week is not an integer"),
        ("u1,1,0-10\n", 1, "is not start_ms:end_ms"),
        ("u1,1,0:1.5\n", 1, "end_ms is not a non-negative integer"),
        ("u1,1\n", 1, "expected user_id,week,intervals (3 fields), got 2"),
        ("u1,1,0:604800001\n", 1, "past the end of the week"),
        ("u1,1,\n", 0, "every user-week is empty"),
    ],
)
def test_converter_rejects_malformed_lines_naming_line_and_reason(text, line, reason):
    with pytest.raises(TraceError) as err:
        convert_phone_trace(text, "p.txt")
    assert err.value.line == line and reason in err.value.reason


def test_shipped_example_converts_to_the_shipped_csv_and_replays_the_whole_week(tmp_path, capsys):
    """The documented command reproduces sim/traces/phone-week.csv; its scenario maps the week onto the run."""
    out = tmp_path / "phone-week.csv"
    argv = [
        "sim",
        "convert-trace",
        str(SIM / "traces/phone-week-ms.txt"),
        "--out",
        str(out),
        "--run-seconds",
        "30",
    ]
    assert cli_main(argv) == 0
    assert out.read_text() == (SIM / "traces/phone-week.csv").read_text()
    captured = capsys.readouterr()
    assert "trace_time_scale = 4.96031746031746e-05" in captured.out
    assert "5 devices, 40 intervals" in captured.err
    scenario = load_scenario(SIM / "scenarios/trace-phone-week.toml")
    assert scenario.churn.trace_time_scale == 30.0 / WEEK_S
    sim = Simulation(scenario.with_changes(rounds=120, peers=5))
    last = max(end for spans in sim.availability.trace.intervals.values() for _, end in spans)
    assert 0.9 * 30.0 < last <= 30.0 + 1e-9  # the week's last day falls at the end of the run


def test_convert_trace_cli_refuses_scenario_flags(tmp_path, capsys):
    """Flags of the other sim commands are errors, not silently ignored."""
    argv = ["sim", "convert-trace", str(SIM / "traces/phone-week-ms.txt"), "--out", str(tmp_path / "x.csv")]
    assert cli_main([*argv, "--seed", "3"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert cli_main(["sim", str(SIM / "scenarios/trace-phone-week.toml"), "--run-seconds", "3"]) == 2
