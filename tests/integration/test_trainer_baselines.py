"""Baselines and label-error detection through the trainer: the gain reaches the results, the
model card and the termination summary; minGainOverBaseline fails a run that gains nothing."""

from __future__ import annotations

import json

import pytest

from tests.harness.trainer_jobs import manifest, rows_for, run_recipe, tiny_job, write_jsonl

pytestmark = pytest.mark.integration


def test_gain_over_baseline_and_label_issues_reach_the_results(tiny_model_dir, tmp_path) -> None:
    rows = rows_for("sequence-classification", "text", n=160)
    for i in range(0, 160, 20):  # plant label flips
        rows[i]["label"] = "neg" if rows[i]["label"] == "pos" else "pos"
    out = tmp_path / "out"
    m = tiny_job(
        "sequence-classification",
        tiny_model_dir("bert"),
        tmp_path,
        rows=rows,
        dataset={"labelIssues": "drop"},
        earlyStopping={"metric": "f1", "patience": 5},
        hyperparameters={"epochs": 3},
        promotion={"gates": [{"metric": "f1", "minGainOverBaseline": -1.0}]},
    )
    result = run_recipe(m, tmp_path)

    assert result.passed
    for name in ("majority", "probe"):
        assert {f"baseline_{name}_f1", f"baseline_{name}_accuracy", f"baseline_{name}_eval_loss"} <= set(result.metrics)
    best = max(result.metrics["baseline_majority_f1"], result.metrics["baseline_probe_f1"])
    assert result.metrics["gain_over_baseline"] == pytest.approx(result.metrics["f1"] - best, abs=1e-9)
    assert "gain_over_baseline" in result.summary()["metrics"]
    assert "minGainOverBaseline -1" in result.gates[0].message

    run_dir = out / "runs" / "1"
    card = json.loads((run_dir / "model-card.json").read_text())
    assert card["baselines"]["gain"]["metric"] == "f1"
    assert {"features", "majority", "probe", "labelIssues"} <= set(card["baselines"]["seconds"])
    assert "### Baselines" in (run_dir / "model-card.md").read_text()
    issues = json.loads((run_dir / "report" / "validation-report.json").read_text())["labelIssues"]
    assert issues["action"] == "drop" and issues["found"] == issues["dropped"] >= 1
    assert issues["checked"] - issues["dropped"] == card["validationReport"]["split"]["sizes"]["train"]
    assert all({"index", "excerpt", "given", "suggested"} <= set(r) for r in issues["rows"])


def test_a_run_that_does_not_beat_the_baseline_fails_its_gate(tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for("sequence-classification", "text", n=160))
    m = manifest(
        "sequence-classification",
        tiny_model_dir("bert"),
        data,
        tmp_path / "out",
        # one step at a negligible learning rate: the model is still the random head it started with
        hyperparameters={"epochs": 1, "maxSteps": 1, "learningRate": 1e-9},
        promotion={"gates": [{"metric": "accuracy", "minGainOverBaseline": 0.0}]},
    )
    result = run_recipe(m, tmp_path)

    assert not result.passed
    assert result.metrics["baseline_probe_accuracy"] > result.metrics["accuracy"]
    gate = result.gates[0]
    assert not gate.passed and "less than minGainOverBaseline 0" in gate.message
    assert result.summary()["result"] == "GateFailed"
    assert "minGainOverBaseline" in result.message()


def test_generation_compares_with_the_untouched_base_model(tiny_model_dir, tmp_path) -> None:
    m = tiny_job(
        "seq2seq",
        tiny_model_dir("t5", base_only=True),
        tmp_path,
        n=80,
        hyperparameters={"epochs": 1},
        evaluation={"metrics": ["rouge"]},
        earlyStopping={"metric": "rougeL"},
    )
    result = run_recipe(m, tmp_path)

    assert {"baseline_base_rougeL", "baseline_base_eval_loss"} <= set(result.metrics)
    assert result.metrics["gain_over_baseline"] == pytest.approx(
        result.metrics["rougeL"] - result.metrics["baseline_base_rougeL"], abs=1e-9
    )
