"""The protocol core stays sans-IO: no sockets, clocks, threads or hivemind."""

import ast
from pathlib import Path

import p2pfm.core

FORBIDDEN = {"asyncio", "socket", "time", "threading", "hivemind", "multiprocessing", "subprocess", "pickle"}


def test_core_imports_no_io_modules():
    """No module under p2pfm/core imports asyncio, socket, time, threading, hivemind or pickle."""
    core_dir = Path(p2pfm.core.__file__).parent
    offenders = []
    for path in sorted(core_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
