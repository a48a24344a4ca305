"""Figures for the reliability suite (``tests/reliability/``, issue #13).

Each reliability test injects a fault many times and asserts an invariant every time. It runs
a small sample in ``make test`` and the full count when ``TUNELOOP_RELIABILITY=full`` (what
``make reliability`` sets). Whatever the count, the test reports its figure through the
:func:`figure` fixture; ``python -m tools.reliability`` collects the figures of a full run
into the table of ``docs/reliability.md``.

    def test_operator_kills(figure):
        n = sample(quick=3, full=100)
        ...                                   # inject n faults, assert the invariant each time
        figure(
            scenario="1. Operator SIGKILL mid-reconcile",
            injection="SIGKILL of the operator process at a random point",
            count=n,
            invariant="never two pods for one (job, run, attempt, rank)",
            result="0 duplicate pods, 0 lost runs",
        )

A figure is recorded only when the test body reaches it, so a failing test records nothing
(and the tool reports the failure instead).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

#: ``full`` runs every reliability test at its documented count; anything else a quick sample.
MODE_ENV = "TUNELOOP_RELIABILITY"
#: A JSON-lines file that receives one object per recorded figure (set by tools/reliability.py).
RESULTS_ENV = "TUNELOOP_RELIABILITY_RESULTS"


def is_full() -> bool:
    return os.environ.get(MODE_ENV, "").strip().lower() == "full"


def sample(*, quick: int, full: int) -> int:
    """How many faults to inject: ``quick`` in ``make test``, ``full`` for ``make reliability``."""
    return full if is_full() else quick


class Figure(Protocol):
    def __call__(
        self,
        *,
        scenario: str,
        injection: str,
        count: int,
        invariant: str,
        result: str,
        notes: str = "",
    ) -> None: ...


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Iterator[Figure]:
    """Record the figure of this test (see the module docstring)."""
    started = time.monotonic()
    path = os.environ.get(RESULTS_ENV)

    def record(
        *,
        scenario: str,
        injection: str,
        count: int,
        invariant: str,
        result: str,
        notes: str = "",
    ) -> None:
        if not path:
            return
        entry: dict[str, Any] = {
            "test": request.node.nodeid,
            "scenario": scenario,
            "injection": injection,
            "count": count,
            "invariant": invariant,
            "result": result,
            "notes": notes,
            "seconds": round(time.monotonic() - started, 1),
            "mode": "full" if is_full() else "quick",
        }
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    recorder: Callable[..., None] = record
    yield recorder  # type: ignore[misc]
