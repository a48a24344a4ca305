"""The conventions every evaluation result follows: the slack allowed against user-given
bounds, JSON-safe numbers, and predictions that pair up with references."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

#: Slack for comparisons against user-given bounds (see :mod:`tuneloop_trainer.evaluation`).
TOLERANCE: Final = 1e-9


def finite_or_none(value: float | None) -> float | None:
    """``value``, or ``None`` for NaN and infinity (JSON has neither)."""
    return value if value is not None and math.isfinite(value) else None


def check_lengths(kind: str, a: Sequence[Any], b: Sequence[Any]) -> None:
    """Refuse predictions and references that do not pair up one to one, or are empty."""
    if len(a) != len(b):
        raise ValueError(f"{kind}: {len(a)} predictions but {len(b)} references; they must pair up one to one")
    if not a:
        raise ValueError(f"{kind}: no examples to evaluate")
