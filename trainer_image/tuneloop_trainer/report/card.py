"""The model card's content: everything known about one trained model, in one
:class:`ModelCard` that both the Markdown and the JSON card are written from (so the two can
never disagree), and the comparison with the promoted model."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuneloop.api.spec import metric_direction
from tuneloop_trainer.evaluation import GateResult, PromotedEvaluation
from tuneloop_trainer.report.jsonsafe import camel, json_safe


@dataclass
class ModelCard:
    """Everything known about one trained model: provenance, data, setup, results, verdict."""

    job: str
    run: int
    task: str
    base_model: str
    method: str
    created: str
    """ISO 8601, UTC."""
    data_fingerprint: str
    """Identifies the exact training, validation and test rows."""
    validation_report: dict[str, Any]
    """The data validation report (rows read, dropped and why, label distribution, …)."""
    hyperparameters: dict[str, Any]
    metrics: dict[str, float]
    """Final metrics on the test split (with ``ood_*``, ``forgetting_increase`` and
    ``fairness_gap`` when those checks ran)."""
    validation_metrics: dict[str, float]
    """Validation metrics of the selected (best) checkpoint."""
    per_class: dict[str, Any] | None
    out_of_domain: dict[str, float] | None
    forgetting: dict[str, Any] | None
    fairness: dict[str, Any] | None
    gates: list[dict[str, Any]]
    passed: bool
    notes: list[str]
    model_uri: str | None
    save_format: str
    promoted: dict[str, Any] | None = None
    """The comparison with the model promoted when the run started (:func:`comparison`);
    ``None`` when nothing was promoted."""
    data_drift: dict[str, Any] | None = None
    """How far the training data moved since the promoted run
    (:meth:`tuneloop_trainer.data.profile.DataDrift.to_dict`); ``None`` when nothing was promoted."""
    baselines: dict[str, Any] | None = None
    """The baselines measured before training and the gain over the best
    (:meth:`tuneloop_trainer.baselines.BaselineReport.to_dict`); ``None`` when they were off."""
    privacy: dict[str, Any] | None = None
    """The differential-privacy guarantee the weights carry
    (:meth:`tuneloop_trainer.privacy.PrivacySpent.to_dict`: ε spent, δ, noise, sampling); ``None``
    when the run trained without ``spec.privacy``."""
    error_analysis: dict[str, Any] | None = None
    """Where the model fails (:meth:`tuneloop_trainer.analysis.ErrorAnalysis.to_dict`): confusion
    matrix, worst examples, metrics per slice."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: camelCase keys at the top level, no NaN."""
        return {camel(f.name): json_safe(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Read a card back from :meth:`to_dict`'s form (``null`` metrics become NaN)."""
        kwargs: dict[str, Any] = {f.name: data.get(camel(f.name)) for f in dataclasses.fields(cls)}
        for name in ("metrics", "validation_metrics"):
            kwargs[name] = {k: math.nan if v is None else float(v) for k, v in (kwargs[name] or {}).items()}
        for name in ("validation_report", "hyperparameters"):
            kwargs[name] = dict(kwargs[name] or {})
        kwargs["gates"] = list(kwargs["gates"] or [])
        kwargs["notes"] = list(kwargs["notes"] or [])
        return cls(**kwargs)


def comparison(
    metrics: Mapping[str, float], gates: Sequence[GateResult], promoted: PromotedEvaluation | None
) -> dict[str, Any] | None:
    """The model card's comparison of the candidate with the promoted model: both evaluated by
    this run on the same splits, per metric, with the gates on each metric."""
    if promoted is None:
        return None
    rows = []
    for name in dict.fromkeys([*metrics, *promoted.metrics]):
        mine, theirs = metrics.get(name), promoted.metrics.get(name)
        difference = mine - theirs if mine is not None and theirs is not None else None
        rows.append(
            {
                "metric": name,
                "candidate": mine,
                "promoted": theirs,
                "difference": difference,
                "better": "lower" if metric_direction(name) == "min" else "higher",
                "gates": [
                    {"passed": g.passed, "minImprovement": g.min_improvement, "message": g.message}
                    for g in gates
                    if g.metric == name
                ],
            }
        )
    return json_safe({**promoted.to_dict(), "comparison": rows})
