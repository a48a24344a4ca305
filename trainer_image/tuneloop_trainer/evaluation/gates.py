"""Promotion gates: each gate's bounds judged on the test metrics, ``minImprovement`` against
the promoted model evaluated by this run on the same splits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from tuneloop.api.spec import Gate, metric_direction
from tuneloop_trainer.evaluation.numbers import TOLERANCE, finite_or_none


@dataclass
class GateResult:
    """One promotion gate, judged."""

    metric: str
    value: float | None
    """The metric on the test split; ``None`` when it was not computed."""
    min: float | None
    max: float | None
    min_improvement: float | None
    promoted_value: float | None
    """The promoted model's value, when there is one and it has this metric."""
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": finite_or_none(self.value),
            "min": self.min,
            "max": self.max,
            "minImprovement": self.min_improvement,
            "promotedValue": finite_or_none(self.promoted_value),
            "passed": self.passed,
            "message": self.message,
        }


@dataclass
class PromotedEvaluation:
    """The promoted model, evaluated by this run on the same splits, by the same code, as the
    candidate: what ``minImprovement`` compares with (never the numbers stored when it was
    promoted, which came from an older test split)."""

    run: int
    """The promoted run."""
    model_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    """Its metrics on this run's test split (``ood_*`` on the out-of-domain set); empty when it
    could not be evaluated."""
    error: str | None = None
    """Why it could not be evaluated (deleted, unreadable, does not fit the task)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "modelUri": self.model_uri,
            "metrics": {k: finite_or_none(v) for k, v in self.metrics.items()},
            "error": self.error,
        }


#: What to do when the promoted model cannot be evaluated.
PROMOTED_UNAVAILABLE_ADVICE: Final = (
    "pin a run whose model exists (spec.promotion.pin), or delete promoted.json under spec.output.uri to "
    "compare with nothing"
)


def _judge_gate(
    gate: Gate, metrics: Mapping[str, float], promoted: Mapping[str, float] | PromotedEvaluation | None
) -> GateResult:
    name = gate.metric
    evaluation = promoted if isinstance(promoted, PromotedEvaluation) else None
    promoted_metrics = evaluation.metrics if evaluation is not None else promoted
    promoted_value = promoted_metrics.get(name) if isinstance(promoted_metrics, Mapping) else None
    whose = f"the promoted model (run {evaluation.run})" if evaluation is not None else "the promoted model"

    def result(value: float | None, passed: bool, message: str) -> GateResult:
        return GateResult(name, value, gate.min, gate.max, gate.min_improvement, promoted_value, passed, message)

    if name not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        return result(None, False, f"{name} was not computed, so the gate cannot pass (computed: {known})")
    value = float(metrics[name])
    if not math.isfinite(value):
        return result(value, False, f"{name} is {value}, not a finite number")

    checks: list[str] = []
    passed = True
    if gate.min is not None:
        ok = value >= gate.min - TOLERANCE
        passed &= ok
        checks.append(f"{name} {value:.4g} {'>=' if ok else '<'} min {gate.min:g}")
    if gate.max is not None:
        ok = value <= gate.max + TOLERANCE
        passed &= ok
        checks.append(f"{name} {value:.4g} {'<=' if ok else '>'} max {gate.max:g}")
    if gate.min_improvement is not None:
        if promoted is None:
            checks.append("no promoted model yet, so minImprovement passes")
        elif evaluation is not None and evaluation.error is not None:
            passed = False
            checks.append(
                f"minImprovement cannot be checked: {whose}, {evaluation.model_uri}, could not be evaluated "
                f"({evaluation.error}); {PROMOTED_UNAVAILABLE_ADVICE}"
            )
        elif promoted_value is None or not math.isfinite(promoted_value):
            checks.append(f"{whose} has no {name} to compare with, so minImprovement passes")
        else:
            lower_is_better = metric_direction(name) == "min"
            improvement = promoted_value - value if lower_is_better else value - promoted_value
            ok = improvement >= gate.min_improvement - TOLERANCE
            passed &= ok
            checks.append(
                f"{name} {value:.4g} vs {promoted_value:.4g} of {whose} on the same test split: "
                f"{'decrease' if lower_is_better else 'increase'} {improvement:+.4g}, "
                f"{'at least' if ok else 'less than'} minImprovement {gate.min_improvement:g}"
            )
    return result(value, passed, "; ".join(checks) or "no bounds given")


def evaluate_gates(
    gates: Sequence[Gate],
    metrics: Mapping[str, float],
    promoted: Mapping[str, float] | PromotedEvaluation | None,
) -> list[GateResult]:
    """Judge every promotion gate on the test metrics; all must pass to promote.

    ``minImprovement`` is measured in the metric's better direction (from
    :func:`~tuneloop.api.spec.metric_direction`): an accuracy must rise by it, a perplexity
    must fall by it. A negative ``minImprovement`` therefore allows a bounded regression.
    ``promoted`` is the promoted model's metrics on the same test split (a
    :class:`PromotedEvaluation`, or a plain mapping). With no promoted model (``None``), or one
    that did not compute the metric, there is nothing to improve on and that bound passes,
    saying so. A promoted model that could not be evaluated (``error`` set) fails the bound:
    passing it would promote without the comparison the gate asks for, and failing over to the
    numbers stored at its promotion would compare across test splits. A metric that was not
    computed, or is NaN, fails: a gate that cannot be checked must not promote.
    """
    return [_judge_gate(gate, metrics, promoted) for gate in gates]
