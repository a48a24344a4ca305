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
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from tuneloop.api.spec import Gate, metric_direction

log = logging.getLogger(__name__)

#: Slack for comparisons against user-given bounds (see the module docstring).
TOLERANCE: Final = 1e-9
#: :func:`perplexity` never returns more than this. A perplexity above the vocabulary size
#: (at most a few hundred thousand) is already worse than guessing uniformly, so nothing is
#: lost by the cap, while ``inf`` would not survive JSON and ``math.exp`` overflows past a
#: mean NLL of about 709.
MAX_PERPLEXITY: Final = 1e9
#: Names reported by each generation family (``meteor`` is ours; the API has no METEOR yet).
GENERATION_OUTPUTS: Final[dict[str, tuple[str, ...]]] = {
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("bleu",),
    "meteor": ("meteor",),
}


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _check_lengths(kind: str, a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{kind}: {len(a)} predictions but {len(b)} references; they must pair up one to one")
    if not a:
        raise ValueError(f"{kind}: no examples to evaluate")


# --- classification ---------------------------------------------------------------------


def classification_metrics(
    predictions: Sequence[int], labels: Sequence[int], label_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy and macro-averaged precision, recall and F1, per-class scores and the
    confusion matrix, computed by scikit-learn's ``sklearn.metrics``.

    Macro, not micro: fine-tuning data is often imbalanced, and a micro average (which for
    single-label classification equals accuracy) lets a model that ignores a rare class
    look good. Each class counts once, whatever its size.

    The macro average runs over the classes present in ``labels`` or ``predictions``
    (scikit-learn's default): a class that occurs in neither has precision and recall 0/0
    and says nothing about this model on this split. 0/0 elsewhere (a class never
    predicted, so no precision) counts as 0, scikit-learn's ``zero_division=0``. Macro F1
    is the mean of per-class F1 scores, not the harmonic mean of macro precision and recall.

    ``per_class`` and the ``confusion_matrix`` (rows: true class, columns: predicted class)
    cover every class id from 0 to the largest of ``len(label_names)`` and the largest id
    seen, so that a class missing from the split shows up with support 0. Ids without a name
    are named by their number; ``confusion_labels`` gives the row and column names.
    """
    from sklearn.metrics import (  # type: ignore[import-untyped]  # noqa: PLC0415
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    _check_lengths("classification", predictions, labels)
    pred = np.asarray(predictions, dtype=np.int64)
    true = np.asarray(labels, dtype=np.int64)
    if (pred < 0).any() or (true < 0).any():
        raise ValueError("class ids must be non-negative integers")
    n = max(len(label_names), int(max(pred.max(), true.max())) + 1)
    names = [label_names[i] if i < len(label_names) else str(i) for i in range(n)]
    every = list(range(n))

    # Per class over every id (absent ones get 0 and support 0); the macro average over the
    # ids present in either list (scikit-learn's own default, passed explicitly).
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=every, average=None, zero_division=0
    )
    present = np.union1d(true, pred).tolist()
    macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(
        true, pred, labels=present, average="macro", zero_division=0
    )
    with warnings.catch_warnings():  # a 1x1 matrix is right when the split has one class
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        matrix = confusion_matrix(true, pred, labels=every)

    return {
        "accuracy": float(accuracy_score(true, pred)),
        "f1": float(macro_f1),
        "precision": float(macro_p),
        "recall": float(macro_r),
        "per_class": {
            names[i]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(n)
        },
        "confusion_matrix": matrix.tolist(),
        "confusion_labels": names,
    }


# --- generation -------------------------------------------------------------------------


@functools.cache
def meteor_available() -> tuple[bool, str]:
    """Whether METEOR can be computed here, and why not.

    METEOR matches synonyms through WordNet, which NLTK does not ship: it is a separate
    download (``nltk.download("wordnet")``), and trainer pods usually have no network. So
    METEOR is computed only when the data is already on disk; nothing is ever downloaded.
    """
    try:
        import nltk  # type: ignore[import-untyped]  # noqa: PLC0415
        from nltk.corpus import wordnet  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError as exc:
        return False, f"nltk is not installed ({exc})"
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            nltk.data.find("corpora/wordnet.zip")
        except LookupError:
            return False, (
                "NLTK's WordNet data is not installed (run nltk.download('wordnet') where there is a network, "
                "or set NLTK_DATA to a directory that holds corpora/wordnet)"
            )
    try:
        wordnet.ensure_loaded()
    except Exception as exc:  # a corrupt or partial download
        return False, f"NLTK's WordNet data could not be loaded: {exc}"
    return True, "nltk and WordNet are installed"


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # type: ignore[import-untyped]  # noqa: PLC0415

    return rouge_scorer.RougeScorer(list(GENERATION_OUTPUTS["rouge"]), use_stemmer=True)


def _rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from rouge_score import tokenizers  # noqa: PLC0415

    scorer = _rouge_scorer()
    totals = dict.fromkeys(GENERATION_OUTPUTS["rouge"], 0.0)
    plain = tokenizers.DefaultTokenizer(use_stemmer=False)
    untokenizable = 0
    for pred, ref in zip(predictions, references, strict=True):
        if ref.strip() and not plain.tokenize(ref):
            untokenizable += 1
        for name, score in scorer.score(ref, pred).items():  # (target, prediction): reference first
            totals[name] += float(score.fmeasure)
    if untokenizable:
        log.warning(
            "ROUGE: %d of %d references have no [a-z0-9] tokens (non-Latin script?); rouge_score's tokenizer "
            "drops such text, so their ROUGE is 0 whatever the prediction",
            untokenizable,
            len(references),
        )
    return {name: total / len(predictions) for name, total in totals.items()}


def _bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from sacrebleu.metrics.bleu import BLEU  # noqa: PLC0415

    # Newlines would be taken as sentence breaks by some tokenizers; one example is one segment.
    preds = [" ".join(p.split("\n")) for p in predictions]
    refs = [" ".join(r.split("\n")) for r in references]
    return {"bleu": float(BLEU().corpus_score(preds, [refs]).score)}


def _meteor(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from nltk.translate.meteor_score import meteor_score  # type: ignore[import-untyped]  # noqa: PLC0415

    # Whitespace tokens: NLTK's word_tokenize needs the punkt data, which is as unlikely to be
    # installed as WordNet. METEOR's own preprocessing lower-cases.
    scores = [meteor_score([ref.split()], pred.split()) for pred, ref in zip(predictions, references, strict=True)]
    return {"meteor": float(sum(scores) / len(scores))}


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], families: Sequence[str]
) -> dict[str, float]:
    """Metrics of generated text against one reference per example.

    * ``rouge`` → ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``: F-measures in [0, 1]
      from ``rouge_score`` with Porter stemming, averaged over examples. ``rougeLsum`` is
      the summary-level LCS over sentences split at newlines (the convention of the
      summarization literature), so keep newlines between sentences. Its tokenizer keeps
      only ``[a-z0-9]``: text in non-Latin scripts scores 0 (a warning is logged).
    * ``bleu`` → ``bleu``: sacreBLEU's corpus BLEU with its default ``13a`` tokenizer, on
      sacreBLEU's **0-100 scale** (not 0-1 like ROUGE), so the number matches published
      sacreBLEU scores and gates are written as e.g. ``min: 25``. It is a corpus statistic,
      not a mean over examples, and is 0 when no output has four tokens.
    * ``meteor`` → ``meteor`` in [0, 1], mean over examples; only when
      :func:`meteor_available` says so. Otherwise it is left out (with a warning) rather
      than failing a run over an optional metric.
    """
    unknown = [f for f in families if f not in GENERATION_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown generation metric families {unknown}; known: {', '.join(GENERATION_OUTPUTS)}")
    if not families:
        return {}
    _check_lengths("generation", predictions, references)
    metrics: dict[str, float] = {}
    for family in dict.fromkeys(families):
        if family == "rouge":
            metrics.update(_rouge(predictions, references))
        elif family == "bleu":
            metrics.update(_bleu(predictions, references))
        else:
            ok, why = meteor_available()
            if ok:
                metrics.update(_meteor(predictions, references))
            else:
                log.warning("METEOR is not computed: %s", why)
    return metrics


# --- perplexity -------------------------------------------------------------------------


def perplexity(total_nll: float, total_tokens: int) -> float:
    """``exp`` of the mean negative log-likelihood per token (in nats).

    Summed NLL and token counts are passed, not a mean of per-batch means: batches hold
    different numbers of tokens, and only the token-weighted mean is the perplexity of the
    data. The result is capped at :data:`MAX_PERPLEXITY` (a diverged model stays a finite,
    JSON-safe, gate-failing number); a NaN loss gives NaN, which fails every gate.
    """
    if total_tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got {total_tokens}")
    if math.isnan(total_nll):
        return math.nan
    if total_nll < -TOLERANCE * max(1, total_tokens):
        raise ValueError(f"a negative log-likelihood cannot be negative, got {total_nll}")
    mean = max(0.0, total_nll / total_tokens)
    if mean >= math.log(MAX_PERPLEXITY):
        return MAX_PERPLEXITY
    return math.exp(mean)


# --- fairness ---------------------------------------------------------------------------


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
            "perGroup": {k: _finite_or_none(v) for k, v in self.per_group.items()},
            "counts": dict(self.counts),
            "gap": _finite_or_none(self.gap),
            "maxGap": _finite_or_none(self.max_gap),
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


# --- forgetting -------------------------------------------------------------------------


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
            "base": _finite_or_none(self.base),
            "tuned": _finite_or_none(self.tuned),
            "relativeIncrease": _finite_or_none(self.relative_increase),
            "maxIncrease": _finite_or_none(self.max_increase),
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


# --- promotion gates --------------------------------------------------------------------


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
            "value": _finite_or_none(self.value),
            "min": self.min,
            "max": self.max,
            "minImprovement": self.min_improvement,
            "promotedValue": _finite_or_none(self.promoted_value),
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
            "metrics": {k: _finite_or_none(v) for k, v in self.metrics.items()},
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


# --- model selection and early stopping -------------------------------------------------


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
