"""Baselines, gain, the gain gate and label-error detection (tuneloop_trainer.baselines)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from tuneloop.api.spec import Gate
from tuneloop_trainer.baselines import (
    Baseline,
    BaselineReport,
    apply_gain_gates,
    classification_baselines,
    find_label_issues,
    pooled_features,
)
from tuneloop_trainer.evaluation import evaluate_gates
from tuneloop_trainer.features import Feature

pytestmark = pytest.mark.unit

#: Each class has words of its own: a linear probe on mean-pooled features separates them even
#: on a randomly initialised tiny model (its embeddings of distinct tokens differ).
VOCAB = {
    0: "cat dog bird mouse horse sheep goat",
    1: "red blue green yellow purple orange pink",
    2: "run jump swim climb walk crawl fly",
}


def planted(n_per_class: int = 60, flips: int = 18, seed: int = 0) -> tuple[list[str], list[int], list[int], set[int]]:
    """Texts, their true classes, the given labels (some flipped), and the flipped positions."""
    rng = random.Random(seed)
    texts, truth = [], []
    for c, words in VOCAB.items():
        for _ in range(n_per_class):
            texts.append(" ".join(rng.choice(words.split()) for _ in range(rng.randint(4, 9))))
            truth.append(c)
    order = list(range(len(texts)))
    rng.shuffle(order)
    texts, truth = [texts[i] for i in order], [truth[i] for i in order]
    flipped = set(rng.sample(range(len(texts)), flips))
    given = [(t + rng.randint(1, 2)) % 3 if i in flipped else t for i, t in enumerate(truth)]
    return texts, truth, given, flipped


@pytest.fixture(scope="module")
def bert(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_model_dir("bert", num_labels=3)
    return AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def embed(bert, texts: list[str], labels: list[int]) -> np.ndarray:
    import torch

    model, tok = bert
    feats = [
        Feature(tok(t)["input_ids"], label, index=i) for i, (t, label) in enumerate(zip(texts, labels, strict=True))
    ]
    return pooled_features(model, feats, pad_id=int(tok.pad_token_id), device=torch.device("cpu"), batch_size=16)


def test_pooled_features_ignore_padding(bert) -> None:
    """A row's features do not depend on how long the other rows of its batch are."""
    alone = embed(bert, ["cat dog"], [0])
    batched = embed(bert, ["cat dog", "red blue green yellow purple orange pink red blue"], [0, 1])
    assert alone.shape == (1, batched.shape[1])
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)


def test_planted_label_flips_are_found_and_clean_rows_are_left_alone(bert) -> None:
    texts, truth, given, flipped = planted()
    x = embed(bert, texts, given)
    issues = find_label_issues(x, np.asarray(given), texts, ["animal", "colour", "motion"], action="report", seed=1)
    found = set(issues.indices)
    caught = len(found & flipped)
    false_alarms = len(found - flipped)
    clean = len(texts) - len(flipped)
    # Measured: 16 of 18 flips found, 2 of 162 clean rows flagged (tiny BERT, seeds 0 and 1).
    assert caught >= 0.8 * len(flipped), (caught, false_alarms)
    assert false_alarms <= 0.05 * clean, (caught, false_alarms)
    assert issues.checked == len(texts) and issues.folds == 5
    row = next(r for r in issues.listed if r.index in flipped)
    assert row.given == ["animal", "colour", "motion"][given[row.index]]
    assert row.suggested == ["animal", "colour", "motion"][truth[row.index]]
    assert row.confidence < 0.5
    assert "look mislabelled" in issues.summary_line()


def test_label_issue_excerpts_are_pii_masked_and_short() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-3, 1, (30, 4)), rng.normal(3, 1, (30, 4))])
    y = np.array([0] * 30 + [1] * 30)
    y[0] = 1  # planted: deep in class 0's cluster
    texts = ["mail jane.doe@example.com now " + "x" * 400] + ["fine"] * 59
    issues = find_label_issues(x, y, texts, ["a", "b"], action="drop", seed=0)
    assert issues.indices[0] == 0
    excerpt = issues.listed[0].excerpt
    assert "jane.doe@example.com" not in excerpt and len(excerpt) <= 160


def test_label_issues_are_skipped_with_a_reason_when_a_class_has_one_row() -> None:
    x = np.zeros((5, 2))
    issues = find_label_issues(x, np.array([0, 0, 0, 0, 1]), ["t"] * 5, ["a", "b"], action="report", seed=0)
    assert issues.indices == [] and issues.skipped == "a class has fewer than 2 training rows"
    assert "not checked" in issues.summary_line()


def test_majority_and_probe_baselines() -> None:
    rng = np.random.default_rng(0)
    train_x = np.concatenate([rng.normal(-2, 1, (70, 3)), rng.normal(2, 1, (30, 3))])
    train_y = np.array([0] * 70 + [1] * 30)
    eval_x = np.concatenate([rng.normal(-2, 1, (20, 3)), rng.normal(2, 1, (20, 3))])
    eval_y = np.array([0] * 20 + [1] * 20)
    majority, probe = classification_baselines(
        train_x, train_y, eval_x, eval_y, label_names=["neg", "pos"], wanted=["accuracy", "f1"]
    )
    assert majority.metrics["accuracy"] == pytest.approx(0.5)  # always "neg"
    assert majority.metrics["f1"] == pytest.approx((2 / 3 + 0) / 2)
    # eval_loss: the cross-entropy of the training frequencies 0.7 / 0.3
    assert majority.metrics["eval_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    assert "neg" in majority.description
    assert probe.metrics["accuracy"] > 0.9 and probe.metrics["eval_loss"] < majority.metrics["eval_loss"]


def report(**metrics: dict[str, float]) -> BaselineReport:
    out = BaselineReport("f1", "test")
    out.baselines = [Baseline(name, m, 10, 0.1, name) for name, m in metrics.items()]
    return out


def test_gain_is_over_the_best_baseline_in_the_metric_direction() -> None:
    r = report(majority={"f1": 0.33, "eval_loss": 0.69}, probe={"f1": 0.70, "eval_loss": 0.55})
    got = r.summary_metrics({"f1": 0.82, "eval_loss": 0.40})
    assert got["gain_over_baseline"] == pytest.approx(0.12)
    assert got["baseline_probe_f1"] == 0.70 and got["baseline_majority_eval_loss"] == 0.69
    loss = BaselineReport("eval_loss", "test", r.baselines)
    assert loss.summary_metrics({"eval_loss": 0.60})["gain_over_baseline"] == pytest.approx(-0.05)
    card = r.to_dict({"f1": 0.82})
    assert card["gain"] == {"value": pytest.approx(0.12), "over": "probe", "metric": "f1"}


def test_min_gain_over_baseline_gate() -> None:
    r = report(majority={"f1": 0.33}, probe={"f1": 0.70})
    gates = [
        Gate(metric="f1", min_gain_over_baseline=0.05),
        Gate(metric="f1", min=0.5, min_gain_over_baseline=0.2),
        Gate(metric="eval_loss", max=1.0),
    ]
    metrics = {"f1": 0.78, "eval_loss": 0.4}
    judged = apply_gain_gates(gates, evaluate_gates(gates, metrics, None), r)
    assert [g.passed for g in judged] == [True, False, True]
    assert "gain +0.08, at least minGainOverBaseline 0.05" in judged[0].message
    assert judged[1].message.startswith("f1 0.78 >= min 0.5; ")
    assert "less than minGainOverBaseline 0.2" in judged[1].message and "probe baseline" in judged[1].message
    # no baselines measured: the gain cannot be checked, the gate fails
    none = apply_gain_gates(gates[:1], evaluate_gates(gates[:1], metrics, None), None)
    assert not none[0].passed and "cannot be checked" in none[0].message


def test_spec_refuses_what_cannot_be_acted_on() -> None:
    from pydantic import ValidationError

    from tuneloop.api.spec import FineTuneJobSpec

    def spec(task: str, **extra: object) -> dict[str, object]:
        body: dict[str, object] = {
            "task": task,
            "model": {"uri": "hf://org/model"},
            "dataset": {"uri": "s3://bucket/d.jsonl"},
            "output": {"uri": "s3://bucket/out/"},
        }
        for key, value in extra.items():
            body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value  # type: ignore[dict-item]
        return body

    with pytest.raises(ValidationError, match="label-error detection needs class labels"):
        FineTuneJobSpec.model_validate(spec("causal-lm", dataset={"labelIssues": "report"}))
    gate = {"gates": [{"metric": "f1", "minGainOverBaseline": 0.01}]}
    with pytest.raises(ValidationError, match="needs the baselines it compares with"):
        FineTuneJobSpec.model_validate(spec("sequence-classification", evaluation={"baselines": False}, promotion=gate))
    ok = FineTuneJobSpec.model_validate(
        spec("sequence-classification", dataset={"labelIssues": "drop"}, promotion=gate)
    )
    assert ok.dataset.label_issues == "drop" and ok.evaluation.baselines
