"""Availability traces: good files parse, every malformed file names its line and reason."""

import pytest

from p2pfm.sim.churn import TraceChurn
from p2pfm.sim.traces import TraceError, load_trace, parse_trace


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
