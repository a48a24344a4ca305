"""Classification metrics come from scikit-learn now and must not move a single number.

``_numpy_reference`` is the trainer's previous hand-written implementation (up to the
scikit-learn switch), kept here only as the oracle: every model card and gate written before
the switch was judged by it, so the same predictions must give the same metrics, names and
shapes, including the corners (a class never predicted, a class absent from the split,
ids past the named labels, a single class).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from tuneloop_trainer.evaluation import classification_metrics

pytestmark = pytest.mark.unit


def _numpy_reference(predictions: Sequence[int], labels: Sequence[int], label_names: Sequence[str]) -> dict[str, Any]:
    pred = np.asarray(predictions, dtype=np.int64)
    true = np.asarray(labels, dtype=np.int64)
    n = max(len(label_names), int(max(pred.max(), true.max())) + 1)
    names = [label_names[i] if i < len(label_names) else str(i) for i in range(n)]
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (true, pred), 1)
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    present = (support > 0) | (predicted > 0)
    return {
        "accuracy": float((pred == true).mean()),
        "f1": float(f1[present].mean()),
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
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


def _assert_same(new: dict[str, Any], old: dict[str, Any]) -> None:
    assert list(new) == list(old)  # same names, same order (the card and summary list them)
    for name in ("accuracy", "f1", "precision", "recall"):
        assert type(new[name]) is float
        assert new[name] == pytest.approx(old[name], rel=1e-12, abs=1e-15), name
    assert list(new["per_class"]) == list(old["per_class"])
    for cls, scores in old["per_class"].items():
        assert list(new["per_class"][cls]) == list(scores)
        for key, value in scores.items():
            assert new["per_class"][cls][key] == pytest.approx(value, rel=1e-12, abs=1e-15), (cls, key)
        assert type(new["per_class"][cls]["support"]) is int
    assert new["confusion_matrix"] == old["confusion_matrix"]
    assert all(type(v) is int for row in new["confusion_matrix"] for v in row)
    assert new["confusion_labels"] == old["confusion_labels"]


CORNERS = [
    pytest.param([0, 1, 1, 0], [0, 1, 0, 1], ["neg", "pos"], id="binary"),
    pytest.param([0, 0, 0, 0], [0, 1, 0, 1], ["neg", "pos"], id="one-class-never-predicted"),
    pytest.param([1, 1], [0, 0], ["neg", "pos"], id="all-wrong-zero-f1"),
    pytest.param([0, 1], [0, 1], ["a", "b", "c", "d"], id="named-classes-absent-from-split"),
    pytest.param([2, 2, 0], [0, 0, 0], ["a", "b", "c"], id="label-set-missing-from-predictions"),
    pytest.param([0, 0, 0], [0, 0, 0], ["only"], id="single-class-perfect"),
    pytest.param([0, 4, 1], [0, 1, 4], ["a", "b"], id="ids-past-the-names"),
    pytest.param([1, 0], [0, 1], [], id="no-names"),
]


@pytest.mark.parametrize(("preds", "labels", "names"), CORNERS)
def test_same_metrics_as_the_numpy_implementation_on_corners(
    preds: list[int], labels: list[int], names: list[str]
) -> None:
    _assert_same(classification_metrics(preds, labels, names), _numpy_reference(preds, labels, names))


def test_same_metrics_on_random_imbalanced_predictions() -> None:
    rng = random.Random(7)
    for trial in range(40):
        n_classes = rng.randint(2, 9)
        size = rng.randint(1, 300)
        weights = [rng.random() ** 3 for _ in range(n_classes)]  # skewed: rare classes are common here
        labels = rng.choices(range(n_classes), weights=weights, k=size)
        # Mostly right, sometimes wrong, sometimes a class that never occurs in labels.
        preds = [y if rng.random() < 0.6 else rng.randrange(n_classes) for y in labels]
        names = [f"c{i}" for i in range(n_classes - (trial % 3 == 0))]  # some runs name fewer ids than seen
        _assert_same(classification_metrics(preds, labels, names), _numpy_reference(preds, labels, names))


def test_zero_division_gives_zero_not_nan_and_no_warning(recwarn: pytest.WarningsRecorder) -> None:
    # "b" is a label but never predicted: precision 0/0 is 0 (not NaN, which JSON cannot hold),
    # and scikit-learn's UndefinedMetricWarning stays quiet because zero_division is explicit.
    m = classification_metrics([0, 0, 0], [0, 1, 1], ["a", "b"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["precision"] == pytest.approx(1 / 3 / 2)
    assert not [w for w in recwarn if "UndefinedMetric" in type(w.message).__name__]


def test_the_numbers_come_from_scikit_learn() -> None:
    classification_metrics([0, 1], [0, 1], ["a", "b"])
    assert "sklearn.metrics" in sys.modules
