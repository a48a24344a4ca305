"""The reliability suite's own plumbing: counts by mode, figures recorded, the doc's table."""

from __future__ import annotations

import json

import pytest

from tests.harness import reliability
from tools import reliability as tool


def test_sample_is_quick_unless_full_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(reliability.MODE_ENV, raising=False)
    assert reliability.sample(quick=3, full=100) == 3
    monkeypatch.setenv(reliability.MODE_ENV, "full")
    assert reliability.sample(quick=3, full=100) == 100


def test_table_lists_each_figure_and_each_failure(tmp_path) -> None:
    rows = [
        {"test": "tests/reliability/test_b.py::t", "scenario": "3. Trainer kills", "injection": "SIGKILL",
         "count": 40, "invariant": "all steps | no loss", "result": "0 lost", "date": "2026-12-06",
         "seconds": 12.5, "machine": "2 CPU cores"},
        {"test": "tests/reliability/test_a.py::t", "scenario": "1. Operator kills", "injection": "SIGKILL",
         "count": 100, "invariant": "one pod", "result": "0 duplicates", "notes": "emulator",
         "date": "2026-12-06", "seconds": 3, "machine": "2 CPU cores"},
    ]  # fmt: skip
    table = tool.render_table(rows, ["tests/reliability/test_c.py::t"])
    body = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in body] == ["| 1. Operator kills", "| 3. Trainer kills"]
    assert "all steps \\| no loss" in body[1] and "0 duplicates — emulator" in body[0]
    assert "test_c.py::t" in table.split("Failed in the last run")[1]
    doc = tmp_path / "r.md"
    doc.write_text(f"intro\n{tool.BEGIN}\nold\n{tool.END}\noutro\n")
    tool.write_doc(table, doc)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old" not in text


def test_a_recorded_figure_reaches_the_results_file(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeconftest('pytest_plugins = ["tests.harness.reliability"]')
    pytester.makepyfile(
        """
        def test_x(figure):
            figure(scenario="9. Load", injection="burst", count=2, invariant="converge", result="ok")
        """
    )
    out = pytester.path / "figures.jsonl"
    monkeypatch.setenv(reliability.RESULTS_ENV, str(out))
    monkeypatch.delenv(reliability.MODE_ENV, raising=False)  # `make reliability` sets it for the outer run
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    (entry,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert entry["scenario"] == "9. Load" and entry["count"] == 2 and entry["mode"] == "quick"
