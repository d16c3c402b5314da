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
