"""Every test here is a reliability test (marker ``reliability``); a failure is recorded for
``python -m tools.reliability`` so the table lists it instead of leaving the row out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.harness.reliability import RESULTS_ENV


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.reliability)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path and report.failed:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(json.dumps({"failed": report.nodeid, "when": report.when}) + "\n")
