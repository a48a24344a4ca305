"""How a trained model is judged and when it replaces the promoted one: the metric catalogue
per task, ``spec.evaluation`` and ``spec.promotion``'s gates."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field

from tuneloop.api.types import ApiModel, ColumnName, DataUri

MetricName = Literal["accuracy", "f1", "precision", "recall", "rouge", "bleu", "perplexity"]

#: Which metrics each task can compute. F1 and friends need labels; ROUGE and BLEU need
#: generated text; perplexity needs a language-modelling head (a seq2seq model's loss is
#: conditional on the source, so its "perplexity" is not comparable across models).
TASK_METRICS: Final[dict[str, tuple[str, ...]]] = {
    "sequence-classification": ("accuracy", "f1", "precision", "recall"),
    "causal-lm": ("perplexity", "rouge", "bleu"),
    "seq2seq": ("rouge", "bleu"),
}
#: What is computed when ``evaluation.metrics`` is omitted.
DEFAULT_METRICS: Final[dict[str, tuple[str, ...]]] = {
    "sequence-classification": ("accuracy", "f1", "precision", "recall"),
    "causal-lm": ("perplexity",),
    "seq2seq": ("rouge", "bleu"),
}
#: A metric family and the names it reports (what gates and early stopping may name).
METRIC_OUTPUTS: Final[dict[str, tuple[str, ...]]] = {
    "accuracy": ("accuracy",),
    "f1": ("f1",),
    "precision": ("precision",),
    "recall": ("recall",),
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu",),
    "perplexity": ("perplexity",),
}
#: Metric families computed from generated text (one ``generate()`` per example).
GENERATION_METRICS: Final = frozenset({"rouge", "bleu"})
#: Metrics where lower is better; everything else is higher-is-better.
LOWER_IS_BETTER: Final = frozenset(
    {"eval_loss", "perplexity", "ood_eval_loss", "ood_perplexity", "forgetting_increase", "fairness_gap"}
)


def metric_direction(metric: str) -> Literal["min", "max"]:
    """Whether lower (``min``) or higher (``max``) is better for a metric name."""
    return "min" if metric in LOWER_IS_BETTER else "max"


class OutOfDomain(ApiModel):
    """A held-out set from another domain, to check generalisation."""

    uri: DataUri
    """Data in the same column layout as the training data."""


class Forgetting(ApiModel):
    """Catastrophic-forgetting check: general-domain perplexity of the tuned model
    against the base model."""

    uri: DataUri
    """General-domain text."""
    max_increase: Annotated[float, Field(ge=0.0)] = 0.10
    """Largest allowed relative perplexity increase (0.10 = 10 %)."""


class Fairness(ApiModel):
    """Per-group evaluation: the metric for each value of a column, and the largest gap."""

    group_column: ColumnName
    """Column naming each row's group (kept for evaluation, never used as a feature)."""
    metric: Annotated[str, Field(min_length=1, max_length=64)] = "f1"
    """A computed metric to compare across groups."""
    max_gap: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    """Largest allowed difference between the best and the worst group."""


class Evaluation(ApiModel):
    """How a trained model is judged."""

    metrics: Annotated[list[MetricName], Field(min_length=1, max_length=8)] | None = None
    """Metrics to compute; omit for the task's defaults (classification: accuracy, f1,
    precision, recall; causal-lm: perplexity; seq2seq: rouge, bleu). ``rouge`` reports
    ``rouge1``, ``rouge2``, ``rougeL`` and ``rougeLsum``; ``eval_loss`` is always computed."""
    every_steps: Annotated[int, Field(gt=0)] | None = None
    """Evaluate every this many steps; omit to evaluate at the end of each epoch."""
    out_of_domain: OutOfDomain | None = None
    """Out-of-domain evaluation set; its metrics are reported with an ``ood_`` prefix."""
    forgetting: Forgetting | None = None
    """Forgetting check (causal-lm, seq2seq); reported as ``forgetting_increase``."""
    fairness: Fairness | None = None
    """Fairness check per group; reported as ``fairness_gap``."""
    baselines: bool = True
    """Before training, evaluate what is cheap to know, on the split the final metrics use (test,
    else validation), with the same metrics: for sequence-classification the majority class
    (trained-split class frequencies) and a linear probe (logistic regression on the frozen base
    model's mean-pooled features; one forward pass over train and test); for causal-lm and
    seq2seq the untouched base model on that split (its first 128 rows when ROUGE or BLEU are
    computed: generation is one ``generate()`` per row). Reported as ``baseline_<name>_<metric>``
    (``majority``, ``probe``, ``base``) and ``gain_over_baseline``: the selection metric's (``earlyStopping.metric``,
    default ``eval_loss``) gain over the best baseline, in the metric's better direction
    (positive: the fine-tuned model is better). Their cost in seconds is in the report. Set
    false to skip them (``minGainOverBaseline`` then cannot be used)."""
    slices: Annotated[list[ColumnName], Field(max_length=8)] = Field(default_factory=list)
    """Columns to break the test metrics down by (a language, a source, a product line):
    the error analysis (``report/error-analysis.json`` and the model card) reports the
    metrics for each of their values, beside the fairness group column's. Read from the
    test data like the group column, never used as a feature; rows without a value count
    as ``(none)``."""


class Gate(ApiModel):
    """A promotion gate on one metric of the test split. All bounds given must hold."""

    metric: Annotated[str, Field(min_length=1, max_length=64)]
    """A computed metric, e.g. ``f1``, ``rougeL``, ``perplexity``, ``forgetting_increase``."""
    min: float | None = None
    """The metric must be at least this."""
    max: float | None = None
    """The metric must be at most this."""
    min_improvement: float | None = None
    """The metric must beat the promoted model's by at least this much (in the metric's
    better direction); passes when nothing is promoted yet."""
    min_gain_over_baseline: float | None = None
    """The metric must beat the best baseline (``evaluation.baselines``: majority class and
    linear probe for classification, the untouched base model for generation) on the same
    split by at least this much, in the metric's better direction: a run that fine-tunes for
    nothing is not promoted. ``0`` asks only to beat it; the metric must be one the baselines
    compute (``eval_loss`` or an ``evaluation.metrics`` output, not ``ood_*``, ``fairness_gap``
    or ``forgetting_increase``)."""


class Promotion(ApiModel):
    """When a new model replaces the promoted one."""

    gates: Annotated[list[Gate], Field(max_length=16)] = Field(default_factory=list)
    """Every gate must pass."""
    require_approval: bool = False
    """Human in the loop: a run that passes its gates waits (``AwaitingApproval``) for the
    annotation ``tuneloop.dev/approve=<run number>`` (promote) or ``tuneloop.dev/reject=<run
    number>`` (close it). Changing it never starts a run."""
    pin: Annotated[int, Field(ge=1)] | None = None
    """Roll back (or forward): promote this run's model (it must still exist) and keep it
    promoted while set; new runs train and are evaluated but are not promoted. Setting or
    removing it never starts a run; once removed, the next run that passes is promoted."""
