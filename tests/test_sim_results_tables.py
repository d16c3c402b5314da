"""sim/results/tables.py: the README's tables are what the recorded summary.json files print."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "sim" / "results"


def _tables():
    spec = importlib.util.spec_from_file_location("sim_results_tables", RESULTS / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["main", "sync50", "gpt", "trace-example", "trace-phone-week", "seeds"])
def test_readme_tables_match_the_recorded_runs(name, capsys):
    _tables().main([name])
    table = capsys.readouterr().out
    assert table.strip() in (RESULTS / "README.md").read_text()


def test_readme_sweep_table_is_the_recorded_sweep_md():
    sweep = (RESULTS / "mlp100-sweep" / "sweep.md").read_text()
    assert sweep.strip() in (RESULTS / "README.md").read_text()


def test_compare_with_itself_lists_every_run_unchanged(capsys):
    _tables().main(["compare", "--old", str(RESULTS)])
    out = capsys.readouterr().out
    assert out.count("\n| ") == 1  # the header's rule line only: no run row
    assert "Unchanged: mlp100-none," in out
