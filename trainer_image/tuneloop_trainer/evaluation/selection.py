"""Model selection and early stopping over the history of validation evaluations."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal


def _better(value: float, best: float, mode: Literal["min", "max"], min_delta: float) -> bool:
    return value < best - min_delta if mode == "min" else value > best + min_delta


def select_best(history: Sequence[Mapping[str, float]], metric: str, mode: Literal["min", "max"]) -> int:
    """The index of the best evaluation in ``history``.

    Evaluations without the metric, or with a non-finite value, are passed over; on a tie
    the earliest wins (fewer steps, less drift from the base model).
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    best_index: int | None = None
    best = 0.0
    for i, entry in enumerate(history):
        value = entry.get(metric)
        if value is None or not math.isfinite(value):
            continue
        if best_index is None or _better(float(value), best, mode, 0.0):
            best_index, best = i, float(value)
    if best_index is None:
        raise ValueError(f"no evaluation in the history has a finite {metric!r}")
    return best_index


class EarlyStopper:
    """Stop when the validation metric has not improved for ``patience`` evaluations.

    An improvement must beat the best so far by more than ``min_delta`` (in the metric's
    better direction), so that noise-level wiggles do not reset the count. The state is
    small and JSON-safe, and goes into every checkpoint: a resumed run must not forget how
    long it has been waiting.
    """

    def __init__(self, metric: str, mode: Literal["min", "max"], patience: int, min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must not be negative, got {min_delta}")
        self.metric = metric
        self.mode: Literal["min", "max"] = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.evals = 0

    def update(self, value: float, step: int | None = None) -> bool:
        """Record one evaluation; ``True`` means stop now. ``step`` defaults to the number
        of the evaluation (0, 1, …). A NaN or infinite value counts as no improvement."""
        where = self.evals if step is None else step
        self.evals += 1
        if math.isfinite(value) and (self.best is None or _better(value, self.best, self.mode, self.min_delta)):
            self.best, self.best_step, self.bad_evals = float(value), where, 0
        else:
            self.bad_evals += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "mode": self.mode,
            "patience": self.patience,
            "minDelta": self.min_delta,
            "best": self.best,
            "bestStep": self.best_step,
            "badEvals": self.bad_evals,
            "evals": self.evals,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from a checkpoint. A state for another metric or direction is refused:
        its best value would be compared against numbers of a different kind."""
        if state.get("metric") != self.metric or state.get("mode") != self.mode:
            raise ValueError(
                f"early-stopping state is for {state.get('metric')!r} ({state.get('mode')}), "
                f"not {self.metric!r} ({self.mode})"
            )
        best = state.get("best")
        self.best = None if best is None else float(best)
        best_step = state.get("bestStep")
        self.best_step = None if best_step is None else int(best_step)
        self.bad_evals = int(state.get("badEvals", 0))
        self.evals = int(state.get("evals", 0))
