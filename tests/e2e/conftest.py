"""On a failed end-to-end test, add every pod's log tail to the report.

A status dump alone rarely says why a run stalled; the trainer's own words do. The sections show
up in the failure report (and in CI's output) next to the assertion; the operator fixture prints
the operator's log at teardown.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        fixtures: dict[str, Any] = getattr(item, "funcargs", {})
        world = fixtures.get("world")
        kubelet = fixtures.get("kubelet", getattr(world, "kubelet", None))
        if kubelet is not None:
            for pod, tail in kubelet.log_tails().items():
                report.sections.append((f"pod {pod} (log tail)", tail))
    return report
