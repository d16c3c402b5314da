"""``p2pfm bench transfer``: its flags, its help and its refusals (no network, no root needed)."""

from __future__ import annotations

import argparse

import pytest

from p2pfm.cli import build_parser, main
from p2pfm.cli.bench import format_transfer, parse_shaped


def test_transfer_help_says_what_is_measured(capsys):
    """The help names both downloads, the TCP copy they are measured against and the shaped mode."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "transfer", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "plain TCP copy",
        "libp2p stream",
        "direct lane",
        "network namespaces",
        "root",
        "--repeats",
    ):
        assert phrase in text, phrase


def test_transfer_flags_default_to_the_124m_state_on_loopback():
    """Without flags: 1.49e9 bytes, 2 repeats, loopback (no --shaped)."""
    args = build_parser().parse_args(["bench", "transfer"])
    assert (args.bytes, args.repeats, args.shaped, args.json) == (1_490_000_000, 2, None, False)


def test_shaped_takes_a_rate_and_an_optional_delay():
    """--shaped 300 is 300 Mbit/s with no delay; --shaped 200,5 adds 5 ms."""
    assert parse_shaped("300") == (300.0, 0.0)
    assert parse_shaped("200,5") == (200.0, 5.0)
    args = build_parser().parse_args(["bench", "transfer", "--shaped", "1000", "--repeats", "3", "--json"])
    assert (args.shaped, args.repeats, args.json) == ((1000.0, 0.0), 3, True)


@pytest.mark.parametrize("value", ["fast", "0", "-5", "100,-1", "100,5,7", ""])
def test_shaped_rejects_what_is_not_a_rate_and_delay(value):
    """A bad --shaped is refused with the expected form."""
    with pytest.raises(argparse.ArgumentTypeError, match="RATE_MBIT|rate must be positive"):
        parse_shaped(value)


def test_bad_shaped_value_is_a_usage_error(capsys):
    """argparse reports it against the flag, exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "transfer", "--shaped", "fast"])
    assert exit_info.value.code == 2
    assert "--shaped" in capsys.readouterr().err


def test_shaped_without_root_says_to_use_sudo(monkeypatch, capsys):
    """Where namespaces cannot be made, --shaped stops before any work and says what to do."""
    from p2pfm.netlab import netns

    monkeypatch.setattr(netns, "available", lambda: "network namespaces need root")
    assert main(["bench", "transfer", "--shaped", "300", "--bytes", "5000"]) == 2
    err = capsys.readouterr().err
    assert "--shaped needs root" in err and "sudo" in err


def test_transfer_refuses_zero_repeats(capsys):
    """--repeats 0 is refused before anything starts."""
    assert main(["bench", "transfer", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err


def test_report_gives_each_download_as_a_share_of_the_tcp_copy():
    """The text report: TCP copy MB/s, then each download's MB/s and percent of it."""
    result = {
        "total_bytes": 1000, "repeats": 2, "tcp_copy_MBps": 30.0,
        "libp2p_download_MBps": 15.0, "download_vs_tcp": 0.5, "libp2p_stream_MBps": 16.0, "stream_vs_tcp": 0.533,
        "lane_download_MBps": 27.0, "lane_download_vs_tcp": 0.9, "lane_MBps": 28.0, "lane_vs_tcp": 0.933,
        "link": {"rate_mbit": 300, "link_MBps": 37.5, "rtt_added_ms": 0, "shaper": "netem"},
    }  # fmt: skip
    text = format_transfer(result)
    assert "links 300 Mbit/s" in text and "50.0 % of TCP" in text and "90.0 % of TCP" in text
    assert "loopback" in format_transfer({k: v for k, v in result.items() if k != "link"})
