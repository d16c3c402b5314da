"""Deploy tests: a real Docker engine and real network namespaces on this machine.

They need root and take minutes, so they run only when asked for by marker:
``pytest -m deploy tests/deploy`` (``make test-deploy``). In the default suite every test
here is skipped with that hint. Each phase's wall time is printed at the end of the run.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the harness modules beside this file

from hostenv import Phases, is_root  # noqa: E402

PHASES = Phases()


def _deploy_selected(config: pytest.Config) -> bool:
    expr = config.getoption("markexpr") or ""
    return "deploy" in expr and "not deploy" not in expr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _deploy_selected(config):
        return
    skip = pytest.mark.skip(reason="deploy test: run with `pytest -m deploy tests/deploy` (root, minutes)")
    for item in items:
        if item.get_closest_marker("deploy"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if PHASES.times:
        terminalreporter.write_sep("-", "deploy phases")
        terminalreporter.write_line(PHASES.table())


@pytest.fixture(scope="session")
def phases() -> Phases:
    return PHASES


@pytest.fixture(scope="session")
def root_required() -> None:
    if not is_root():
        pytest.skip("deploy tests need root (network namespaces, dockerd)")


@pytest.fixture(scope="session")
def docker_engine(root_required, phases):
    """A private dockerd for the whole session; stopped (and its data removed) at the end."""
    from dockerenv import Engine, install_engine

    with phases("install engine (apt, if missing)"):
        install_engine()
    engine = Engine()
    try:
        with phases("start dockerd"):
            engine.start()
        yield engine
    finally:
        with phases("stop dockerd"):
            engine.stop()


@pytest.fixture(scope="session")
def p2pfm_image(docker_engine, phases) -> Iterator[str]:
    """The p2pfm image built from this tree, offline, on the debootstrapped base."""
    from dockerenv import base_image, build_image, collect_wheels

    base_image(docker_engine, phases)
    wheels = collect_wheels(phases)
    try:
        yield build_image(docker_engine, wheels, phases)
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
