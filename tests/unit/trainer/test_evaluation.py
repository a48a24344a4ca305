"""Evaluation functions give the numbers worked out by hand, and judge gates as documented."""

from __future__ import annotations

import math

import pytest

from tuneloop.api.spec import Gate
from tuneloop_trainer.evaluation import (
    MAX_PERPLEXITY,
    EarlyStopper,
    classification_metrics,
    evaluate_gates,
    fairness_check,
    forgetting_check,
    generation_metrics,
    group_metrics,
    meteor_available,
    perplexity,
    select_best,
)

pytestmark = pytest.mark.unit

# A 3-class example worked out by hand. Confusion (rows true, columns predicted):
#   cat  [2, 1, 0]    precision: cat 2/3, dog 2/4, bird 1/2
#   dog  [1, 2, 1]    recall:    cat 2/3, dog 2/4, bird 1/2
#   bird [0, 1, 1]    f1:        cat 2/3, dog 1/2, bird 1/2
LABELS = [0, 0, 0, 1, 1, 1, 1, 2, 2]
PREDS = [0, 0, 1, 0, 1, 1, 2, 1, 2]
NAMES = ["cat", "dog", "bird"]


def test_classification_metrics_by_hand() -> None:
    m = classification_metrics(PREDS, LABELS, NAMES)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 2, 1], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(5 / 9)
    assert m["precision"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert m["recall"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert m["f1"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert m["per_class"]["dog"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 4}
    assert m["per_class"]["cat"]["f1"] == pytest.approx(2 / 3)


def test_macro_average_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    preds = [0, 2, 2, 2, 1, 0, 3, 3, 2, 0]
    labels = [0, 1, 2, 2, 1, 1, 3, 0, 2, 0]
    m = classification_metrics(preds, labels, ["a", "b", "c", "d"])
    assert m["f1"] == pytest.approx(metrics.f1_score(labels, preds, average="macro", zero_division=0))
    assert m["precision"] == pytest.approx(metrics.precision_score(labels, preds, average="macro", zero_division=0))
    assert m["recall"] == pytest.approx(metrics.recall_score(labels, preds, average="macro", zero_division=0))
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(labels, preds))


def test_macro_average_skips_absent_classes_but_per_class_lists_them() -> None:
    # Class 2 ("bird") is neither a label nor a prediction: it does not drag the average to 2/3.
    m = classification_metrics([0, 1], [0, 1], NAMES)
    assert m["f1"] == 1.0
    assert m["per_class"]["bird"]["support"] == 0
    assert len(m["confusion_matrix"]) == 3
    # Never predicted: precision 0/0 counts as 0 (zero_division=0).
    m = classification_metrics([0, 0], [0, 1], ["a", "b"])
    assert m["per_class"]["b"]["precision"] == 0.0
    assert m["precision"] == pytest.approx((0.5 + 0.0) / 2)


def test_classification_without_names_and_bad_input() -> None:
    m = classification_metrics([0, 1], [0, 1], [])
    assert set(m["per_class"]) == {"0", "1"}
    with pytest.raises(ValueError, match="pair up"):
        classification_metrics([0], [0, 1], NAMES)
    with pytest.raises(ValueError, match="no examples"):
        classification_metrics([], [], NAMES)


def test_rouge_identical_and_disjoint() -> None:
    same = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"], ["rouge"])
    assert same == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0})
    disjoint = generation_metrics(["alpha beta gamma"], ["one two three"], ["rouge"])
    assert disjoint == pytest.approx({"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0})
    # Averaged over examples, not pooled.
    mixed = generation_metrics(["a b c", "x y z"], ["a b c", "p q r"], ["rouge"])
    assert mixed["rouge1"] == pytest.approx(0.5)


def test_rouge_uses_stemming() -> None:
    got = generation_metrics(["cats running"], ["cat run"], ["rouge"])
    assert got["rouge1"] == pytest.approx(1.0)


def test_bleu_is_on_the_0_to_100_scale() -> None:
    sentence = "the quick brown fox jumps over the lazy dog"
    assert generation_metrics([sentence], [sentence], ["bleu"])["bleu"] == pytest.approx(100.0)
    assert generation_metrics(["alpha beta gamma delta"], [sentence], ["bleu"])["bleu"] == pytest.approx(0.0)


def test_generation_families() -> None:
    got = generation_metrics(["a b c d e"], ["a b c d e"], ["rouge", "bleu"])
    assert set(got) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"}
    assert generation_metrics(["a"], ["a"], []) == {}
    with pytest.raises(ValueError, match="unknown"):
        generation_metrics(["a"], ["a"], ["cider"])


def test_meteor_is_reported_or_left_out_with_a_reason() -> None:
    ok, why = meteor_available()
    assert why
    got = generation_metrics(["a cat sat"], ["a cat sat"], ["meteor"])
    if ok:
        assert 0.9 < got["meteor"] <= 1.0
    else:
        assert got == {}
        assert "WordNet" in why or "nltk" in why


def test_perplexity() -> None:
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == MAX_PERPLEXITY
    assert perplexity(math.inf, 3) == MAX_PERPLEXITY
    assert math.isnan(perplexity(math.nan, 3))
    with pytest.raises(ValueError, match="at least one token"):
        perplexity(1.0, 0)


def test_fairness_gap_on_known_groups() -> None:
    groups = ["a", "a", "b", "b", "b", None, "c"]
    correct = [1, 1, 1, 0, 0, 1, 1]

    def accuracy(idx: list[int]) -> float:
        return sum(correct[i] for i in idx) / len(idx)

    result = fairness_check("accuracy", groups, accuracy, max_gap=0.5, min_group_size=2)
    assert result.per_group == pytest.approx({"a": 1.0, "b": 1 / 3})
    assert result.counts == {"a": 2, "b": 3}
    assert result.too_small == {"c": 1}
    assert result.missing_group == 1
    assert result.gap == pytest.approx(2 / 3)
    assert not result.passed
    assert fairness_check("accuracy", groups, accuracy, max_gap=0.7, min_group_size=2).passed
    as_json = result.to_dict()
    assert as_json["maxGap"] == 0.5 and as_json["perGroup"]["a"] == 1.0


def test_fairness_gap_for_a_lower_is_better_metric_is_still_max_minus_min() -> None:
    values = {"x": 12.0, "y": 10.0, "z": 11.0}
    groups = ["x", "y", "z"]
    result = fairness_check("perplexity", groups, lambda idx: values[groups[idx[0]]], max_gap=1.5)
    assert result.gap == pytest.approx(2.0)
    assert not result.passed


def test_fairness_with_one_group_passes_and_says_why() -> None:
    result = group_metrics(["a", "a"], lambda idx: 0.5, metric="f1")
    assert result.passed and result.gap == 0.0
    assert "fewer than two groups" in result.message


def test_forgetting() -> None:
    result = forgetting_check(10.0, 11.5, 0.10)
    assert result.relative_increase == pytest.approx(0.15)
    assert not result.passed
    assert forgetting_check(10.0, 11.0, 0.10).passed  # exactly at the limit, despite binary rounding
    assert forgetting_check(10.0, 9.0, 0.0).passed
    assert not forgetting_check(10.0, math.nan, 0.10).passed
    assert forgetting_check(10.0, 11.5, 0.10).to_dict()["relativeIncrease"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="positive"):
        forgetting_check(0.0, 1.0, 0.1)


def gate(metric: str, **kw: float) -> Gate:
    return Gate(metric=metric, **kw)


def test_gates_min_and_max() -> None:
    metrics = {"f1": 0.82, "perplexity": 12.0}
    f1_ok, f1_bad, ppl_ok, ppl_bad, band = evaluate_gates(
        [
            gate("f1", min=0.8),
            gate("f1", min=0.85),
            gate("perplexity", max=15),
            gate("perplexity", max=10),
            gate("f1", min=0.8, max=0.9),
        ],
        metrics,
        None,
    )
    assert f1_ok.passed and not f1_bad.passed and ppl_ok.passed and not ppl_bad.passed and band.passed
    assert f1_bad.value == 0.82
    assert "0.82 < min 0.85" in f1_bad.message
    assert evaluate_gates([gate("f1", min=0.82)], metrics, None)[0].passed  # at the bound


def test_gates_min_improvement_in_both_directions() -> None:
    promoted = {"f1": 0.80, "perplexity": 12.0}
    higher = evaluate_gates([gate("f1", min_improvement=0.05)], {"f1": 0.85}, promoted)[0]
    assert higher.passed and higher.promoted_value == 0.80  # 0.85 - 0.80 < 0.05 in binary: tolerated
    assert not evaluate_gates([gate("f1", min_improvement=0.05)], {"f1": 0.84}, promoted)[0].passed
    # Perplexity is lower-is-better: it must fall by minImprovement.
    assert evaluate_gates([gate("perplexity", min_improvement=1.0)], {"perplexity": 10.5}, promoted)[0].passed
    worse = evaluate_gates([gate("perplexity", min_improvement=1.0)], {"perplexity": 13.0}, promoted)[0]
    assert not worse.passed
    assert "decrease" in worse.message
    # A negative minImprovement allows a bounded regression.
    assert evaluate_gates([gate("f1", min_improvement=-0.02)], {"f1": 0.79}, promoted)[0].passed


def test_gates_without_a_promoted_model_or_metric() -> None:
    first = evaluate_gates([gate("f1", min_improvement=0.05)], {"f1": 0.5}, None)[0]
    assert first.passed and "no promoted model" in first.message
    other = evaluate_gates([gate("f1", min_improvement=0.05)], {"f1": 0.5}, {"accuracy": 0.9})[0]
    assert other.passed and "has no f1" in other.message


def test_missing_or_nan_metric_fails() -> None:
    missing = evaluate_gates([gate("rougeL", min=0.2)], {"f1": 0.9}, None)[0]
    assert not missing.passed and missing.value is None
    assert "rougeL was not computed" in missing.message and "f1" in missing.message
    nan = evaluate_gates([gate("f1", min=0.2)], {"f1": math.nan}, None)[0]
    assert not nan.passed
    assert nan.to_dict()["value"] is None


def test_select_best() -> None:
    history = [{"eval_loss": 1.0, "f1": 0.5}, {"eval_loss": 0.7, "f1": 0.7}, {"eval_loss": 0.7}, {"f1": math.nan}]
    assert select_best(history, "eval_loss", "min") == 1  # ties: the earliest
    assert select_best(history, "f1", "max") == 1
    with pytest.raises(ValueError, match="no evaluation"):
        select_best(history, "bleu", "max")


def test_early_stopping_with_patience_and_min_delta() -> None:
    stopper = EarlyStopper("eval_loss", "min", patience=2, min_delta=0.01)
    assert not stopper.update(1.0, step=10)
    assert not stopper.update(0.95, step=20)  # improvement
    assert not stopper.update(0.945, step=30)  # within min_delta: not an improvement
    assert stopper.bad_evals == 1
    assert stopper.update(0.944, step=40)  # second bad eval: stop
    assert stopper.best == 0.95 and stopper.best_step == 20


def test_early_stopping_max_mode_resets_and_resumes() -> None:
    stopper = EarlyStopper("f1", "max", patience=2)
    for value in (0.5, 0.4, 0.6, 0.6):
        assert not stopper.update(value)
    assert stopper.best_step == 2 and stopper.bad_evals == 1
    resumed = EarlyStopper("f1", "max", patience=2)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.update(math.nan)  # NaN never improves
    with pytest.raises(ValueError, match="eval_loss"):
        EarlyStopper("eval_loss", "min", patience=2).load_state_dict(stopper.state_dict())
