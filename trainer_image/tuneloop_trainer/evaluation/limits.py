"""Limits the fine-tuned model must stay within: the fairness gap between groups, and
catastrophic forgetting as the rise in general-domain perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneloop_trainer.evaluation.numbers import TOLERANCE, finite_or_none


@dataclass
class FairnessResult:
    """A metric per group and the gap between the best and the worst group."""

    metric: str
    per_group: dict[str, float]
    """The metric on each group large enough to be judged."""
    counts: dict[str, int]
    """Examples in each judged group."""
    gap: float
    """Largest minus smallest per-group value (0 with fewer than two groups)."""
    max_gap: float
    passed: bool
    too_small: dict[str, int] = field(default_factory=dict)
    """Groups left out for having fewer than ``min_group_size`` examples, with their sizes."""
    missing_group: int = 0
    """Rows without a group value, left out."""
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "perGroup": {k: finite_or_none(v) for k, v in self.per_group.items()},
            "counts": dict(self.counts),
            "gap": finite_or_none(self.gap),
            "maxGap": finite_or_none(self.max_gap),
            "passed": self.passed,
            "tooSmall": dict(self.too_small),
            "missingGroup": self.missing_group,
            "message": self.message,
        }


def group_metrics(
    groups: Sequence[str | None],
    per_group_metric: Callable[[list[int]], float],
    *,
    metric: str = "",
    max_gap: float = math.inf,
    min_group_size: int = 1,
) -> FairnessResult:
    """Compute a metric on each group's rows: ``per_group_metric`` gets the indices of one
    group's rows (into whatever lists the caller holds) and returns the metric on them.

    Rows whose group is ``None`` are skipped and counted; groups with fewer than
    ``min_group_size`` rows are skipped and listed, because a metric on three examples is
    noise, and a gap built on noise would block promotions at random. Without a
    ``max_gap`` the result always passes: this is the measurement, :func:`fairness_check`
    the judgement.
    """
    if min_group_size < 1:
        raise ValueError(f"min_group_size must be at least 1, got {min_group_size}")
    indices: dict[str, list[int]] = {}
    missing = 0
    for i, group in enumerate(groups):
        if group is None:
            missing += 1
        else:
            indices.setdefault(str(group), []).append(i)
    judged = {g: idx for g, idx in sorted(indices.items()) if len(idx) >= min_group_size}
    too_small = {g: len(idx) for g, idx in sorted(indices.items()) if len(idx) < min_group_size}
    per_group = {g: float(per_group_metric(idx)) for g, idx in judged.items()}
    counts = {g: len(idx) for g, idx in judged.items()}
    notes = []
    if missing:
        notes.append(f"{missing} rows without a group were left out")
    if too_small:
        notes.append(f"{len(too_small)} groups with fewer than {min_group_size} rows were left out")

    values = list(per_group.values())
    if any(not math.isfinite(v) for v in values):
        bad = [g for g, v in per_group.items() if not math.isfinite(v)]
        gap, passed = math.nan, False
        head = f"{metric or 'the metric'} is not a finite number for groups {', '.join(bad)}"
    elif len(values) < 2:
        gap, passed = 0.0, True
        head = (
            f"fewer than two groups with at least {min_group_size} rows ({len(values)}): "
            "there is no gap to measure, so the check passes without having compared anything"
        )
    else:
        hi = max(per_group, key=lambda g: per_group[g])
        lo = min(per_group, key=lambda g: per_group[g])
        gap = per_group[hi] - per_group[lo]
        passed = gap <= max_gap + TOLERANCE
        head = (
            f"{metric or 'metric'} gap {gap:.4g} between {hi} ({per_group[hi]:.4g}) and {lo} ({per_group[lo]:.4g})"
            + ("" if math.isinf(max_gap) else f" {'within' if passed else 'exceeds'} the limit {max_gap:g}")
        )
    return FairnessResult(
        metric=metric,
        per_group=per_group,
        counts=counts,
        gap=gap,
        max_gap=max_gap,
        passed=passed,
        too_small=too_small,
        missing_group=missing,
        message="; ".join([head, *notes]),
    )


def fairness_check(
    metric: str,
    groups: Sequence[str | None],
    compute: Callable[[list[int]], float],
    max_gap: float,
    min_group_size: int = 1,
) -> FairnessResult:
    """The fairness limit: the best and the worst group may differ by at most ``max_gap``.

    The gap is ``max - min`` whichever way the metric points (for perplexity, where lower
    is better, the worst group is the one with the highest value, and the gap is still the
    distance between the two), so ``maxGap`` reads the same for every metric. It is an
    absolute difference in the metric's own units.
    """
    return group_metrics(groups, compute, metric=metric, max_gap=max_gap, min_group_size=min_group_size)


@dataclass
class ForgettingResult:
    """General-domain perplexity before and after fine-tuning."""

    base: float
    tuned: float
    relative_increase: float
    """``tuned / base - 1``: 0.15 means 15 % higher perplexity (worse)."""
    max_increase: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": finite_or_none(self.base),
            "tuned": finite_or_none(self.tuned),
            "relativeIncrease": finite_or_none(self.relative_increase),
            "maxIncrease": finite_or_none(self.max_increase),
            "passed": self.passed,
        }


def forgetting_check(base_perplexity: float, tuned_perplexity: float, max_increase: float) -> ForgettingResult:
    """Catastrophic forgetting as the relative rise in general-domain perplexity.

    Relative, not absolute: perplexities of different models and corpora live on different
    scales, and "at most 10 % worse than before" means the same for all of them. A
    decrease (negative increase) always passes.
    """
    if not base_perplexity > 0:
        raise ValueError(f"the base perplexity must be positive, got {base_perplexity}")
    if math.isnan(tuned_perplexity):
        relative = math.nan
    elif math.isinf(tuned_perplexity):
        relative = math.inf
    else:
        relative = tuned_perplexity / base_perplexity - 1.0
    return ForgettingResult(
        base=base_perplexity,
        tuned=tuned_perplexity,
        relative_increase=relative,
        max_increase=max_increase,
        passed=relative <= max_increase + TOLERANCE,  # NaN compares False: fails
    )
