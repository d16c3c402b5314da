"""The CLI entry points answer --help and --version without importing heavy libraries."""

import subprocess
import sys

from p2pfm import __version__


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2pfm", *args], capture_output=True, text=True, timeout=120)


def test_version_prints_package_version():
    """`p2pfm --version` prints the package version."""
    result = run_cli("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_help_lists_commands():
    """`p2pfm --help` exits 0 and describes the tool."""
    result = run_cli("--help")
    assert result.returncode == 0
    assert "peer-to-peer" in result.stdout


def test_peer_help_lists_registered_codecs_and_aggregations():
    """`p2pfm peer --help` names every registered codec and aggregation rule, and --trim-fraction."""
    result = run_cli("peer", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "update codec: none, fp16, int8, topk" in text
    assert "mean, clipped_mean, trimmed_mean, median" in text
    assert "--trim-fraction" in text and "[gossip.trim_fraction]" in text


def test_building_the_parser_imports_no_numpy():
    """The registries behind the help texts are read only when help is shown, so startup stays light."""
    code = "import sys; from p2pfm.cli import build_parser; build_parser(); print('numpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
