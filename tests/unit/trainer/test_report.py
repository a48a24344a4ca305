"""The model card, the curves and the summary table carry the run's numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tuneloop.api.spec import Gate
from tuneloop_trainer.evaluation import evaluate_gates, fairness_check, forgetting_check
from tuneloop_trainer.report import ModelCard, TrainingHistory, format_summary_table, plot_curves, write_model_card

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_card(**overrides: object) -> ModelCard:
    metrics = {"eval_loss": 0.4321, "f1": 0.8123, "accuracy": 0.9, "ood_f1": 0.7012, "fairness_gap": 0.0667}
    gates = evaluate_gates(
        [Gate(metric="f1", min=0.8), Gate(metric="accuracy", min=0.95)], metrics, {"f1": 0.8, "accuracy": 0.88}
    )
    groups = ["en", "en", "de", "de", "fr | ch"]
    fairness = fairness_check(
        "f1", groups, lambda idx: {"en": 0.8, "de": 0.7333, "fr | ch": 0.75}[groups[idx[0]]], 0.05
    )
    fields: dict[str, object] = {
        "job": "reviews",
        "run": 3,
        "task": "sequence-classification",
        "base_model": "hf://org/tiny-bert",
        "method": "lora",
        "created": "2025-01-02T03:04:05+00:00",
        "data_fingerprint": "sha256:abc123",
        "validation_report": {"rowsRead": 1000, "dropped": {"empty": 3, "duplicate": 12}},
        "hyperparameters": {"learningRate": 2e-4, "epochs": 3, "batchSize": 16},
        "metrics": metrics,
        "validation_metrics": {"eval_loss": 0.41, "f1": 0.8256},
        "per_class": {"positive": {"precision": 0.85, "recall": 0.8, "f1": 0.8242, "support": 60}},
        "out_of_domain": {"ood_f1": 0.7012},
        "forgetting": forgetting_check(10.0, 11.5, 0.10).to_dict(),
        "fairness": fairness.to_dict(),
        "gates": [g.to_dict() for g in gates],
        "passed": False,
        "notes": ["class weights were used (imbalance 12:1)"],
        "model_uri": "s3://bucket/reviews/runs/3/model/",
        "save_format": "adapter",
    }
    fields.update(overrides)
    return ModelCard(**fields)  # type: ignore[arg-type]


def test_model_card_files_carry_the_numbers(tmp_path: Path) -> None:
    md_path, json_path = write_model_card(make_card(), tmp_path / "out")
    assert md_path.name == "model-card.md" and json_path.name == "model-card.json"
    md = md_path.read_text()
    for expected in (
        "# Model card: reviews, run 3",
        "must not be promoted",
        "accuracy failed",
        "forgetting limit",
        "hf://org/tiny-bert",
        "sha256:abc123",
        "0.8123",  # test f1
        "0.8256",  # validation f1
        "0.7012",  # out of domain
        "| positive | 0.8500 | 0.8000 | 0.8242 | 60 |",
        "| 10.0000 | 11.5000 | +15.0% | 10.0% | FAIL |",  # forgetting: increase and limit
        "fr \\| ch",  # pipes in names do not break tables
        "class weights were used",
        "Intended use",
    ):
        assert expected in md, expected
    assert "| f1 | 0.8123 | 0.8000 | — | — | 0.8000 | PASS |" in md
    assert "| accuracy | 0.9000 | 0.9500 | — | — | 0.8800 | FAIL |" in md

    data = json.loads(json_path.read_text())
    assert data["metrics"]["f1"] == 0.8123
    assert data["forgetting"]["passed"] is False
    assert data["fairness"]["perGroup"]["en"] == 0.8
    assert [g["passed"] for g in data["gates"]] == [True, False]
    assert ModelCard.from_dict(data) == make_card()


def test_model_card_without_optional_sections_and_with_nan(tmp_path: Path) -> None:
    card = make_card(
        task="causal-lm",
        metrics={"eval_loss": math.nan, "perplexity": 12.5, "bleu": 31.4159},
        validation_metrics={},
        per_class=None,
        out_of_domain=None,
        forgetting=None,
        fairness=None,
        gates=[],
        passed=True,
        notes=[],
    )
    md_path, json_path = write_model_card(card, tmp_path)
    md = md_path.read_text()
    assert "**Result: passed.**" in md
    assert "Not checked (`evaluation.forgetting` is not set)" in md
    assert "No promotion gates are configured" in md
    assert "| bleu | 31.4159 |" in md and "0-100 scale" in md
    assert "| eval_loss | NaN |" in md
    data = json.loads(json_path.read_text())  # strict JSON: NaN written as null
    assert data["metrics"]["eval_loss"] is None


def history(steps: int = 60) -> TrainingHistory:
    h = TrainingHistory()
    for step in range(1, steps + 1):
        h.append_train(
            step=step,
            epoch=step / 20,
            loss=2.0 / step**0.5,
            learning_rate=1e-4 * min(1.0, step / 6),
            grad_norm=1.0 + (step % 7) / 10,
            tokens_per_second=1000.0,
        )
        if step % 20 == 0:
            h.append_eval(step=step, epoch=step / 20, eval_loss=1.5 / step**0.3, f1=0.5 + step / 200, bleu=10.0 + step)
    return h


def test_plots_are_png_files(tmp_path: Path) -> None:
    paths = plot_curves(history(), tmp_path / "report")
    assert sorted(p.name for p in paths) == ["grad_norm.png", "learning_rate.png", "loss.png", "metrics.png"]
    for path in paths:
        content = path.read_bytes()
        assert content.startswith(PNG_SIGNATURE), path
        assert len(content) > 5_000, path


def test_plots_without_data_are_skipped(tmp_path: Path) -> None:
    assert plot_curves(TrainingHistory(), tmp_path) == []
    h = TrainingHistory()
    h.append_train(step=1, epoch=0.1, loss=math.nan, learning_rate=1e-4)
    h.append_eval(step=1, epoch=0.1, eval_loss=1.0)
    names = sorted(p.name for p in plot_curves(h, tmp_path))
    assert names == ["learning_rate.png", "loss.png"]  # no grad norms, no metrics besides eval_loss


def test_history_round_trips_as_json() -> None:
    h = history(20)
    h.append_train(step=21, epoch=1.05, loss=math.nan, learning_rate=1e-4)
    data = json.loads(json.dumps(h.to_dict(), allow_nan=False))
    back = TrainingHistory.from_dict(data)
    assert back.eval == h.eval
    assert back.train[-1]["loss"] is None
    assert h.eval_metric_names() == ["eval_loss", "f1", "bleu"]


def test_summary_table() -> None:
    metrics = {"eval_loss": 0.4321, "f1": 0.8123}
    gates = evaluate_gates(
        [Gate(metric="f1", min=0.8), Gate(metric="f1", min_improvement=0.05), Gate(metric="rougeL", min=0.3)],
        metrics,
        {"f1": 0.8},
    )
    table = format_summary_table(metrics, gates)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value", "gate"]
    assert any(line.startswith("eval_loss") and line.rstrip().endswith("0.4321") for line in lines)
    assert any("f1" in line and "PASS  >= 0.8" in line for line in lines)
    assert any("f1" in line and "FAIL  improve +0.05 vs 0.8000" in line for line in lines)
    assert any(line.startswith("rougeL") and "FAIL" in line for line in lines)
    assert "gates: 1 of 3 passed" in table
    assert "FAIL rougeL: rougeL was not computed" in table
    assert table.isascii()
    assert "gates: none configured" in format_summary_table(metrics, [])
