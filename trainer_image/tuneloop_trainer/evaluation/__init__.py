"""Evaluation as pure functions over predictions: metrics, gates, fairness, forgetting,
model selection and early stopping.

Nothing here touches a model. The recipe runs the model, collects predictions, losses and
references, and hands them to these functions, so every number in a model card can be
reproduced (and unit-tested) from plain lists.

Conventions:

* Metric names are those of :data:`tuneloop.api.spec.METRIC_OUTPUTS`; whether lower or
  higher is better comes from :func:`tuneloop.api.spec.metric_direction`, never from a
  table of our own.
* Comparisons against user-given bounds (gates, fairness and forgetting limits) allow a
  slack of :data:`TOLERANCE`: ``maxIncrease: 0.10`` must pass a base perplexity of 10 and a
  tuned one of 11, although ``11 / 10 - 1`` is ``0.10000000000000009`` in binary.
* ``to_dict()`` results use the API's camelCase keys and hold no NaN or infinity (they
  become ``None``): they are written as JSON, which has neither.

Modules: :mod:`.metrics` (classification, generation, perplexity), :mod:`.limits` (fairness,
forgetting), :mod:`.gates` (promotion gates), :mod:`.selection` (best checkpoint, early
stopping), and :mod:`.numbers` (the conventions above).
"""

from __future__ import annotations

from tuneloop_trainer.evaluation.gates import GateResult, PromotedEvaluation, evaluate_gates
from tuneloop_trainer.evaluation.limits import (
    FairnessResult,
    ForgettingResult,
    fairness_check,
    forgetting_check,
    group_metrics,
)
from tuneloop_trainer.evaluation.metrics import (
    MAX_PERPLEXITY,
    classification_metrics,
    generation_metrics,
    meteor_available,
    perplexity,
)
from tuneloop_trainer.evaluation.numbers import TOLERANCE
from tuneloop_trainer.evaluation.selection import EarlyStopper, select_best

__all__ = [
    "MAX_PERPLEXITY",
    "TOLERANCE",
    "EarlyStopper",
    "FairnessResult",
    "ForgettingResult",
    "GateResult",
    "PromotedEvaluation",
    "classification_metrics",
    "evaluate_gates",
    "fairness_check",
    "forgetting_check",
    "generation_metrics",
    "group_metrics",
    "meteor_available",
    "perplexity",
    "select_best",
]
