"""Baselines, gain and label-error detection: measure before fine-tuning.

Before training, the recipe asks what costs little to know, on the split its final metrics
use (test, else validation), with the same metrics:

- sequence-classification: the **majority** class (its ``eval_loss`` is the cross-entropy of the
  training-split class frequencies) and a linear **probe**: logistic regression on the frozen base
  model's mean-pooled last hidden states (one forward pass over train and the evaluated split);
- causal-lm and seq2seq: the untouched **base** model, through the recipe's own evaluation
  (the first :data:`MAX_GENERATION_ROWS` rows when ROUGE or BLEU need ``generate()``).

After training, :meth:`BaselineReport.summary_metrics` gives ``baseline_<name>_<metric>`` and
``gain_over_baseline`` (the selection metric's gain over the best baseline, positive when the
fine-tuned model is better), and :func:`apply_gain_gates` judges ``minGainOverBaseline``.

The probe's features also feed label-error detection (``dataset.labelIssues``): out-of-fold
predicted probabilities (``cross_val_predict``) go to Cleanlab's ``find_label_issues``; the
suspected rows are listed in the validation report and, with ``drop``, removed from the
training split only. Every stage's cost in seconds is recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import torch

from tuneloop.api.spec import metric_direction
from tuneloop_trainer.batching import collate_padded, eval_batches
from tuneloop_trainer.data.pii import masked_excerpt
from tuneloop_trainer.evaluation import TOLERANCE, GateResult, classification_metrics
from tuneloop_trainer.features import Feature

#: Rows of the evaluated split the untouched base model generates for (ROUGE, BLEU).
MAX_GENERATION_ROWS: Final = 128
#: Suspected label errors listed in the report (the total is always given).
MAX_LISTED_ISSUES: Final = 50
#: Characters of a row's text shown for a suspected label error (after PII masking).
EXCERPT_CHARS: Final = 160
#: Folds of the out-of-fold probabilities (fewer when a class has fewer training rows).
FOLDS: Final = 5
#: Smallest probability the log losses take (a probe certain of the wrong class is not infinite).
_EPS: Final = 1e-12


def selection_metric(spec: Any) -> str:
    """The metric the run selects its checkpoint on: what ``gain_over_baseline`` is measured on."""
    es = spec.early_stopping
    return str(es.metric) if es is not None else "eval_loss"


# --- features -------------------------------------------------------------------------------


@contextlib.contextmanager
def untouched(model: Any) -> Iterator[Any]:
    """The base model inside a peft model, with every adapter disabled; otherwise the model
    itself (full fine-tuning has not changed it yet when the baselines run)."""
    if not (hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")):
        yield model
    elif getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        # Prefix/prompt tuning leave the base model's layers alone (the virtual tokens live in
        # the peft wrapper), and disabling them fails on models that do not generate.
        yield model.get_base_model()
    else:
        with model.disable_adapter():
            yield model.get_base_model()


@torch.no_grad()
def pooled_features(
    model: Any,
    features: Sequence[Feature],
    *,
    pad_id: int,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> np.ndarray:
    """Mean-pooled last hidden states (padding left out), one row per feature, float32."""
    model.eval()
    out: np.ndarray | None = None
    for batch_idx in eval_batches([f.length for f in features], batch_size):
        tensors = collate_padded([features[i] for i in batch_idx], pad_id, "sequence-classification")
        tensors.pop("labels")
        tensors = {k: v.to(device) for k, v in tensors.items()}
        with autocast():
            hidden = model(**tensors, output_hidden_states=True).hidden_states[-1].float()
        mask = tensors["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if out is None:
            out = np.zeros((len(features), pooled.shape[-1]), dtype=np.float32)
        out[batch_idx] = pooled.cpu().numpy()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


# --- baselines ------------------------------------------------------------------------------


@dataclass
class Baseline:
    """One baseline's metrics on the evaluated split."""

    name: str
    """``majority``, ``probe`` or ``base``."""
    metrics: dict[str, float]
    rows: int
    """Rows of the evaluated split it was measured on."""
    seconds: float
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "metrics": {k: v for k, v in self.metrics.items() if math.isfinite(v)},
        }


def _probe() -> Any:
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def _class_metrics(
    proba: np.ndarray, labels: np.ndarray, label_names: Sequence[str], wanted: Sequence[str]
) -> dict[str, float]:
    """``eval_loss`` (mean cross-entropy) and the wanted classification metrics of class
    probabilities (columns: every class id)."""
    picked = proba[np.arange(len(labels)), labels]
    metrics = {"eval_loss": float(-np.log(np.clip(picked, _EPS, 1.0)).mean())}
    cls = classification_metrics(proba.argmax(1).tolist(), labels.tolist(), label_names)
    metrics.update({k: float(cls[k]) for k in wanted if k in cls})
    return metrics


def _full_proba(partial: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over the classes a probe saw, spread to every class id (0 elsewhere)."""
    full = np.zeros((partial.shape[0], n_classes), dtype=np.float64)
    full[:, classes.astype(np.int64)] = partial
    return full


def classification_baselines(
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    *,
    label_names: Sequence[str],
    wanted: Sequence[str],
) -> list[Baseline]:
    """The majority class and the linear probe, scored on ``(eval_x, eval_y)``."""
    n_classes = max(len(label_names), int(train_y.max()) + 1, int(eval_y.max()) + 1)
    t0 = time.monotonic()
    prior = np.bincount(train_y, minlength=n_classes).astype(np.float64)
    prior /= prior.sum()
    # The majority class wins argmax; the prior's cross-entropy is its eval_loss.
    proba = np.tile(prior, (len(eval_y), 1))
    majority = Baseline(
        "majority",
        _class_metrics(proba, eval_y, label_names, wanted),
        len(eval_y),
        time.monotonic() - t0,
        f"always the most frequent training class ({label_names[int(prior.argmax())]})",
    )
    t0 = time.monotonic()
    out = [majority]
    if len(np.unique(train_y)) >= 2:
        probe = _probe().fit(train_x, train_y)
        proba = _full_proba(probe.predict_proba(eval_x), probe.classes_, n_classes)
        out.append(
            Baseline(
                "probe",
                _class_metrics(proba, eval_y, label_names, wanted),
                len(eval_y),
                time.monotonic() - t0,
                "logistic regression on the frozen base model's mean-pooled features",
            )
        )
    return out


@dataclass
class BaselineReport:
    """The baselines of one run, and what each pre-training stage cost."""

    metric: str
    """The selection metric: what ``gain_over_baseline`` is measured on."""
    split: str
    """The split they were measured on (``test`` or ``validation``)."""
    baselines: list[Baseline] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    """Cost per stage: ``features`` (the forward pass), ``majority``, ``probe``, ``base``, ``labelIssues``."""
    notes: list[str] = field(default_factory=list)

    def best(self, metric: str) -> tuple[Baseline, float] | None:
        """The best baseline on ``metric`` (in its better direction), with its value."""
        scored = [(b, b.metrics[metric]) for b in self.baselines if math.isfinite(b.metrics.get(metric, math.nan))]
        if not scored:
            return None
        pick = min if metric_direction(metric) == "min" else max
        return pick(scored, key=lambda bv: bv[1])

    def gain(self, metric: str, value: float) -> tuple[float, Baseline] | None:
        """How much ``value`` beats the best baseline on ``metric`` (positive: better)."""
        best = self.best(metric)
        if best is None or not math.isfinite(value):
            return None
        baseline, theirs = best
        return (theirs - value if metric_direction(metric) == "min" else value - theirs), baseline

    def summary_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """``baseline_<name>_<metric>`` for every baseline metric, and ``gain_over_baseline`` on
        the selection metric (when the candidate and a baseline both have it)."""
        out = {f"baseline_{b.name}_{k}": v for b in self.baselines for k, v in b.metrics.items()}
        gained = self.gain(self.metric, float(metrics.get(self.metric, math.nan)))
        if gained is not None:
            out["gain_over_baseline"] = gained[0]
        return out

    def to_dict(self, metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric,
            "split": self.split,
            "baselines": [b.to_dict() for b in self.baselines],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "notes": list(self.notes),
        }
        if metrics is not None:
            gained = self.gain(self.metric, float(metrics.get(self.metric, math.nan)))
            if gained is not None:
                out["gain"] = {"value": gained[0], "over": gained[1].name, "metric": self.metric}
        return out

    def lines(self) -> list[str]:
        """One line per baseline, for the run log."""
        out = []
        for b in self.baselines:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in b.metrics.items())
            out.append(f"baseline {b.name} ({b.rows:,} {self.split} rows, {b.seconds:.1f} s): {shown}")
        return out + self.notes


def apply_gain_gates(
    gates: Sequence[Any], results: Sequence[GateResult], report: BaselineReport | None
) -> list[GateResult]:
    """Judge each gate's ``minGainOverBaseline`` on top of its other bounds (``results`` from
    :func:`~tuneloop_trainer.evaluation.evaluate_gates`, in the order of ``gates``). A gate whose
    metric has no baseline value fails: a gain that cannot be measured must not promote."""
    out: list[GateResult] = []
    for gate, result in zip(gates, results, strict=True):
        wanted = getattr(gate, "min_gain_over_baseline", None)
        if wanted is None:
            out.append(result)
            continue
        gained = None
        if report is not None and result.value is not None:
            gained = report.gain(gate.metric, float(result.value))
        if gained is None:
            ok = False
            check = f"minGainOverBaseline cannot be checked: no baseline measured {gate.metric}"
        else:
            gain, baseline = gained
            ok = gain >= wanted - TOLERANCE
            check = (
                f"{gate.metric} {result.value:.4g} vs {baseline.metrics[gate.metric]:.4g} of the {baseline.name} "
                f"baseline: gain {gain:+.4g}, {'at least' if ok else 'less than'} minGainOverBaseline {wanted:g}"
            )
        earlier = "" if result.message == "no bounds given" else result.message + "; "
        out.append(dataclasses.replace(result, passed=result.passed and ok, message=earlier + check))
    return out


# --- label errors ---------------------------------------------------------------------------


@dataclass
class LabelIssue:
    """One training row whose given label the probe finds unlikely."""

    index: int
    """Position in the training split (before any are dropped)."""
    excerpt: str
    """The start of its text, PII masked."""
    given: str
    suggested: str
    confidence: float
    """The probe's out-of-fold probability of the given label."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "excerpt": self.excerpt,
            "given": self.given,
            "suggested": self.suggested,
            "confidence": round(self.confidence, 4),
        }


@dataclass
class LabelIssues:
    """Cleanlab's verdict on the training labels."""

    action: str
    """``report`` or ``drop``."""
    checked: int
    """Training rows checked."""
    folds: int
    indices: list[int] = field(default_factory=list)
    """Every suspected row (training-split positions), most suspicious first."""
    listed: list[LabelIssue] = field(default_factory=list)
    """The first :data:`MAX_LISTED_ISSUES` of them, described."""
    dropped: int = 0
    seconds: float = 0.0
    skipped: str | None = None
    """Why detection did not run (too few rows of a class), else ``None``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "checked": self.checked,
            "found": len(self.indices),
            "folds": self.folds,
            "dropped": self.dropped,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
            "rows": [i.to_dict() for i in self.listed],
        }

    def summary_line(self) -> str:
        if self.skipped is not None:
            return f"label issues: not checked ({self.skipped})"
        pct = 100 * len(self.indices) / max(1, self.checked)
        line = (
            f"label issues ({self.action}): {len(self.indices):,} of {self.checked:,} training rows ({pct:.1f} %) "
            f"look mislabelled ({self.folds}-fold probe, Cleanlab, {self.seconds:.1f} s)"
        )
        if self.dropped:
            line += f"; {self.dropped:,} dropped from training"
        return line


def find_label_issues(
    x: np.ndarray,
    y: np.ndarray,
    texts: Sequence[str],
    label_names: Sequence[str],
    *,
    action: str,
    seed: int,
) -> LabelIssues:
    """Out-of-fold probe probabilities on the training rows, judged by Cleanlab."""
    from cleanlab.filter import find_label_issues as cleanlab_find  # noqa: PLC0415
    from sklearn.model_selection import StratifiedKFold, cross_val_predict  # noqa: PLC0415

    t0 = time.monotonic()
    classes, compact = np.unique(y, return_inverse=True)
    counts = np.bincount(compact)
    folds = int(min(FOLDS, counts.min())) if len(classes) >= 2 else 0
    if folds < 2:
        why = "fewer than 2 classes in training" if len(classes) < 2 else "a class has fewer than 2 training rows"
        return LabelIssues(action, len(y), 0, skipped=why, seconds=time.monotonic() - t0)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(_probe(), x, compact, cv=cv, method="predict_proba")
    # n_jobs=1: with more, Cleanlab forks a multiprocessing pool from this process, whose torch,
    # heartbeat and upload threads may hold a lock at the fork: the child then waits forever (a run
    # hung intermittently that way). One process ranks an (n × classes) table in well under a second.
    ranked = cleanlab_find(labels=compact, pred_probs=proba, return_indices_ranked_by="self_confidence", n_jobs=1)
    indices = [int(i) for i in ranked]

    def name(class_id: int) -> str:
        return label_names[class_id] if class_id < len(label_names) else str(class_id)

    listed = [
        LabelIssue(
            index=i,
            excerpt=masked_excerpt(texts[i], EXCERPT_CHARS),
            given=name(int(classes[compact[i]])),
            suggested=name(int(classes[int(proba[i].argmax())])),
            confidence=float(proba[i, compact[i]]),
        )
        for i in indices[:MAX_LISTED_ISSUES]
    ]
    return LabelIssues(action, len(y), folds, indices, listed, seconds=time.monotonic() - t0)


# --- the stage ------------------------------------------------------------------------------


@dataclass
class BeforeTraining:
    """What the stage found: the baselines, the label issues, and the training rows to keep."""

    baselines: BaselineReport | None = None
    label_issues: LabelIssues | None = None
    keep: list[int] | None = None
    """Training-split positions to train on (``dataset.labelIssues: drop``); ``None``: all."""


def _row_text(example: Any) -> str:
    return " ".join(str(v) for k, v in example.fields.items() if k != "label")


def run_before_training(
    spec: Any,
    *,
    model: Any,
    train: tuple[Sequence[Any], Sequence[Feature]],
    evaluated: tuple[Sequence[Any], Sequence[Feature], str],
    label_names: Sequence[str] | None,
    pad_id: int,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    evaluate_base: Callable[[Sequence[Feature], Sequence[Any]], Mapping[str, float]],
) -> BeforeTraining:
    """Baselines (``evaluation.baselines``) and label-error detection (``dataset.labelIssues``),
    sharing one forward pass over the data. ``model`` is the model about to be trained (its
    adapters are disabled here); ``evaluate_base`` evaluates the untouched base model on some
    rows with the recipe's own code (generation tasks). ``train`` and ``evaluated`` are
    (examples, features) of the training split and of the split the final metrics use."""
    want_baselines = bool(spec.evaluation.baselines)
    label_action = spec.dataset.label_issues
    result = BeforeTraining()
    eval_examples, eval_features, split = evaluated
    report = BaselineReport(selection_metric(spec), split) if want_baselines else None
    result.baselines = report
    wanted = [m for f in spec.metric_families() for m in ("accuracy", "f1", "precision", "recall") if m == f]
    if spec.task != "sequence-classification":
        if report is None or not eval_features:
            return result
        generates = bool(set(spec.metric_families()) & {"rouge", "bleu"})
        rows = min(len(eval_features), MAX_GENERATION_ROWS) if generates else len(eval_features)
        t0 = time.monotonic()
        metrics = dict(evaluate_base(eval_features[:rows], eval_examples[:rows]))  # adapters off there
        report.seconds["base"] = time.monotonic() - t0
        what = f"the first {rows:,} rows" if rows < len(eval_features) else "every row"
        report.baselines.append(
            Baseline("base", metrics, rows, report.seconds["base"], f"the untouched base model ({what})")
        )
        if rows < len(eval_features):
            report.notes.append(
                f"the base model was evaluated on the first {rows:,} of {len(eval_features):,} {split} rows "
                "(generation is one generate() per row); the fine-tuned model on all of them"
            )
        return result
    if (report is None or not eval_features) and label_action == "off":
        return result
    train_examples, train_features = train
    names = list(label_names or [])
    t0 = time.monotonic()
    with untouched(model) as base:

        def embed(features: Sequence[Feature]) -> np.ndarray:
            return pooled_features(
                base, features, pad_id=pad_id, device=device, batch_size=batch_size, autocast=autocast
            )

        train_x = embed(train_features)
        eval_x = embed(eval_features) if report is not None and eval_features else None
    features_seconds = time.monotonic() - t0
    train_y = np.asarray([int(f.labels) for f in train_features], dtype=np.int64)  # type: ignore[arg-type]
    if report is not None and eval_x is not None:
        report.seconds["features"] = features_seconds
        eval_y = np.asarray([int(f.labels) for f in eval_features], dtype=np.int64)  # type: ignore[arg-type]
        report.baselines = classification_baselines(train_x, train_y, eval_x, eval_y, label_names=names, wanted=wanted)
        report.seconds.update({b.name: b.seconds for b in report.baselines})
    if label_action != "off":
        issues = find_label_issues(
            train_x,
            train_y,
            [_row_text(e) for e in train_examples],
            names,
            action=label_action,
            seed=int(spec.hyperparameters.seed),
        )
        issues.seconds += 0.0 if report is not None else features_seconds
        if report is not None:
            report.seconds["labelIssues"] = issues.seconds
        if label_action == "drop" and issues.indices:
            flagged = set(issues.indices)
            result.keep = [i for i in range(len(train_features)) if i not in flagged]
            issues.dropped = len(flagged)
        result.label_issues = issues
    return result
