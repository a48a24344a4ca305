"""Promotion gates against the promoted model, evaluated afresh on the current test split, and
the data-drift score against the promoted run's data profile (issue #10, trainer side).

``promoted.json`` is written by hand here, as the operator (or a user of ``tuneloop run``) would."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness.trainer_jobs import manifest, rows_for, run_job, write_jsonl
from tuneloop.api import FineTuneJob
from tuneloop.contract import ExitCode, Layout, PromotedPointer
from tuneloop_trainer.progress import Sinks
from tuneloop_trainer.recipe import FineTuneRecipe, RunContext, RunResult

pytestmark = pytest.mark.integration

CLASSIFY = "sequence-classification"
#: Trains the tiny BERT well ("good"/"bad" decides the label): test accuracy above 0.8.
GOOD = {"epochs": 6, "learningRate": 3e-3}
#: Leaves it at chance.
POOR = {"epochs": 1, "learningRate": 1e-7}


def run_as(m: dict[str, Any], tmp_path: Path, run: int) -> RunResult:
    """The recipe in-process, as run ``run`` of the job."""
    job = FineTuneJob.from_manifest(m)
    ctx = RunContext(
        job=job,
        run=run,
        output_uri=job.spec.output.uri,
        work_dir=tmp_path / f"work-{run}",
        sinks=Sinks([]),
        cache_dir=tmp_path / "cache",
    )
    return FineTuneRecipe(ctx).run()


def promote(out: Path, run: int, *, model_uri: str | None = None, **fields: Any) -> None:
    """Write ``promoted.json`` under the output, pointing at ``run``'s model."""
    pointer = PromotedPointer(
        run=run,
        model_uri=model_uri or f"file://{out}/runs/{run}/model/",
        time=datetime.now(UTC),
        promoted_by="gates",
        **fields,
    )
    (out / Layout.PROMOTED).write_text(pointer.model_dump_json(by_alias=True))


def classification_manifest(
    model_dir: Path, data: Path, out: Path, method: str, hp: dict[str, Any], **spec: Any
) -> dict[str, Any]:
    return manifest(CLASSIFY, model_dir, data, out, method={"type": method}, hyperparameters=hp, **spec)


def card(out: Path, run: int) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / Layout.model_card_json(run)).read_text())
    return loaded


def test_a_worse_candidate_fails_min_improvement_against_the_promoted_model(tiny_model_dir, tmp_path) -> None:
    base = tiny_model_dir("bert")
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(CLASSIFY, "text", n=200))
    out = tmp_path / "out"
    promoted = run_as(classification_manifest(base, data, out, "full", GOOD), tmp_path, 1)
    assert promoted.metrics["accuracy"] > 0.8
    promote(out, 1, metrics=promoted.metrics)

    gates = {"gates": [{"metric": "accuracy", "minImprovement": 0.0}, {"metric": "accuracy", "min": 0.0}]}
    m = classification_manifest(base, data, out, "full", POOR, promotion=gates)
    result = run_job(m, tmp_path)

    assert result.returncode == ExitCode.GATE_FAILED, result.stderr[-3000:]
    summary = json.loads((tmp_path / "termination-log").read_text())
    candidate, fresh = summary["metrics"]["accuracy"], summary["promotedMetrics"]["accuracy"]
    assert summary["result"] == "GateFailed" and summary["promotedRun"] == 1
    assert fresh == pytest.approx(promoted.metrics["accuracy"], abs=1e-6)  # same rows, same model, same code
    assert candidate < fresh
    assert [g["passed"] for g in summary["gates"]] == [False, True]
    # Both numbers, side by side, where the user looks: the table, the failed gate, the summary.
    assert "promoted (run 1)" in result.stdout
    assert f"accuracy {candidate:.4g} vs {fresh:.4g} of the promoted model (run 1) on the same test split" in (
        result.stdout
    )
    assert "less than minImprovement 0" in summary["message"]
    assert "evaluating the promoted model (run 1" in result.stderr + result.stdout
    comparison = card(out, 2)["promoted"]
    assert comparison["run"] == 1 and comparison["error"] is None
    row = next(r for r in comparison["comparison"] if r["metric"] == "accuracy")
    assert row["candidate"] == pytest.approx(candidate, abs=1e-6) and row["promoted"] == pytest.approx(fresh)
    assert [g["passed"] for g in row["gates"]] == [False, True]
    md = (out / Layout.model_card(2)).read_text()
    assert "## Compared with the promoted model" in md and "Promoted (run 1)" in md


def test_a_better_candidate_passes_against_fresh_numbers_not_the_stored_ones(tiny_model_dir, tmp_path) -> None:
    """promoted.json claims an accuracy of 0.99 (from some older test split); the gate compares
    with the promoted model's accuracy measured now, on this run's test split."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneloop_trainer.data import prepare_data
    from tuneloop_trainer.sources import Sources

    base = tiny_model_dir("bert")
    out = tmp_path / "out"
    old_data = write_jsonl(tmp_path / "old" / "d.jsonl", rows_for(CLASSIFY, "text", n=120))
    run_as(classification_manifest(base, old_data, out, "full", POOR), tmp_path, 1)
    promote(out, 1, metrics={"accuracy": 0.99, "f1": 0.99})

    # New data arrived: the test split is not the one run 1 was measured on.
    new_data = write_jsonl(tmp_path / "new" / "d.jsonl", rows_for(CLASSIFY, "text", n=120, seed=7))
    gates = {"gates": [{"metric": "accuracy", "minImprovement": 0.05}]}
    m = classification_manifest(base, new_data, out, "full", GOOD, promotion=gates)
    result = run_as(m, tmp_path, 2)

    assert result.passed, [g.message for g in result.gates]
    fresh = result.summary()["promotedMetrics"]
    assert fresh["accuracy"] != 0.99 and fresh["f1"] != 0.99
    assert result.gates[0].promoted_value == pytest.approx(fresh["accuracy"], abs=1e-6)

    # Run 1's model evaluated independently (plain transformers) on run 2's test split.
    job = FineTuneJob.from_manifest(m)
    test = prepare_data(job.spec, Sources(None, tmp_path / "cache2").fetch_data).test
    tokenizer = AutoTokenizer.from_pretrained(out / "runs" / "1" / "model")
    model = AutoModelForSequenceClassification.from_pretrained(out / "runs" / "1" / "model").eval()
    import torch

    with torch.no_grad():
        predicted = [
            int(
                model(
                    **tokenizer(e.fields["text"], return_tensors="pt", truncation=True, max_length=48)
                ).logits.argmax()
            )
            for e in test
        ]
    accuracy = sum(p == e.fields["label"] for p, e in zip(predicted, test, strict=True)) / len(test)
    assert fresh["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert card(tmp_path / "out", 2)["validationReport"]["split"]["sizes"]["test"] == len(test)


@pytest.mark.parametrize(
    ("task", "method", "save"),
    [
        (CLASSIFY, "full", None),
        (CLASSIFY, "lora", None),
        (CLASSIFY, "lora", "merged"),
        ("causal-lm", "lora", None),
        ("causal-lm", "prompt-tuning", None),
    ],
    ids=["classify-full", "classify-lora-adapter", "classify-lora-merged", "lm-lora-adapter", "lm-prompt-tuning"],
)
def test_adapter_and_full_promoted_models_load_and_measure_what_their_run_measured(
    tiny_model_dir, tmp_path, task: str, method: str, save: str | None
) -> None:
    """Same data, so the same test split: the promoted model evaluated by run 2 must score what
    it scored in its own run (it is the same model, through the same code)."""
    layout = "prompt" if task == "causal-lm" else "text"
    base = tiny_model_dir("gpt2" if task == "causal-lm" else "bert", base_only=task == "causal-lm")
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(task, layout))
    out = tmp_path / "out"
    extra: dict[str, Any] = {"output": {"save": save}} if save else {}
    if task == "causal-lm":
        extra["evaluation"] = {"metrics": ["perplexity", "rouge"]}
    first = manifest(task, base, data, out, layout, method={"type": method}, hyperparameters={"epochs": 1}, **extra)
    promoted = run_as(first, tmp_path, 1)
    promote(out, 1, base_model_uri=f"file://{base}")

    second = manifest(task, base, data, out, layout, method={"type": "lora"}, hyperparameters={"epochs": 1}, **extra)
    second["spec"]["promotion"] = {"gates": [{"metric": "eval_loss", "minImprovement": -100.0}]}
    result = run_as(second, tmp_path, 2)

    assert result.promoted is not None and result.promoted.error is None, result.promoted
    assert result.passed
    fresh = result.promoted.metrics
    # Baselines and the gain over them describe run 1, not its model: nothing to measure again.
    measured = {k: v for k, v in promoted.metrics.items() if not k.startswith(("baseline_", "gain_over_baseline"))}
    assert set(measured) <= set(fresh)
    for name, value in measured.items():
        assert fresh[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_the_candidate_leaves_memory_before_the_promoted_model_loads(tiny_model_dir, tmp_path, monkeypatch) -> None:
    import gc
    import weakref

    import tuneloop_trainer.recipe.promoted as promoted_module

    base = tiny_model_dir("bert")
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(CLASSIFY, "text"))
    out = tmp_path / "out"
    run_as(classification_manifest(base, data, out, "full", {"epochs": 1}), tmp_path, 1)
    promote(out, 1)

    candidate: list[weakref.ref[Any]] = []
    alive_when_promoted_loads: list[bool] = []
    setup_optimizer, load = FineTuneRecipe._setup_optimizer, promoted_module.load_trained_model

    def watch_candidate(self: FineTuneRecipe) -> None:
        setup_optimizer(self)
        candidate.append(weakref.ref(self.accelerator.unwrap_model(self.model)))

    def load_promoted(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive_when_promoted_loads.append(candidate[0]() is not None)
        return load(*args, **kwargs)

    monkeypatch.setattr(FineTuneRecipe, "_setup_optimizer", watch_candidate)
    monkeypatch.setattr(promoted_module, "load_trained_model", load_promoted)
    result = run_as(classification_manifest(base, data, out, "full", {"epochs": 1}), tmp_path, 2)
    assert alive_when_promoted_loads == [False]
    assert result.promoted is not None and result.promoted.error is None
    assert (out / "runs" / "2" / "model" / "model.safetensors").is_file()  # written before it was freed


def test_a_promoted_model_that_no_longer_exists_fails_min_improvement_only(tiny_model_dir, tmp_path) -> None:
    base = tiny_model_dir("bert")
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(CLASSIFY, "text"))
    out = tmp_path / "out"
    gone = f"file://{tmp_path}/deleted/runs/1/model/"
    out.mkdir()
    promote(out, 1, model_uri=gone, metrics={"accuracy": 0.5})
    gates = {"gates": [{"metric": "accuracy", "minImprovement": 0.0}, {"metric": "accuracy", "min": 0.0}]}
    result = run_as(classification_manifest(base, data, out, "lora", {"epochs": 1}, promotion=gates), tmp_path, 2)

    assert not result.passed
    improvement, floor = result.gates
    assert floor.passed  # the other gates are judged as usual
    assert not improvement.passed
    for expected in ("promoted model (run 1)", gone, "could not be evaluated", "no longer exists"):
        assert expected in improvement.message
    assert "spec.promotion.pin" in improvement.message and "delete promoted.json" in improvement.message
    summary = result.summary()
    assert summary["promotedRun"] == 1 and summary["promotedMetrics"] == {}
    assert "accuracy" in summary["metrics"]  # the candidate was still evaluated and saved
    assert (out / "runs" / "2" / "model" / "adapter_config.json").is_file()
    assert "could not be evaluated" in (out / Layout.model_card(2)).read_text()


def test_promoted_model_and_profile_on_s3(tiny_model_dir, tmp_path, s3) -> None:
    """In a pod the output, the promoted model and the profiles are in S3."""
    base = tiny_model_dir("bert")
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(CLASSIFY, "text"))
    m = classification_manifest(base, data, tmp_path / "unused", "lora", {"epochs": 1})
    m["spec"]["output"]["uri"] = s3.uri("jobs/reviews/")
    first = run_as(m, tmp_path, 1)
    pointer = PromotedPointer(run=1, model_uri=first.model_uri, time=datetime.now(UTC), metrics={"accuracy": 0.01})
    s3.put_bytes("jobs/reviews/promoted.json", pointer.model_dump_json(by_alias=True).encode())
    m["spec"]["promotion"] = {"gates": [{"metric": "accuracy", "minImprovement": 0.0}]}
    result = run_as(m, tmp_path, 2)
    assert result.promoted is not None and result.promoted.error is None, result.promoted.error
    assert result.promoted.metrics["accuracy"] == pytest.approx(first.metrics["accuracy"])
    assert result.passed  # the same data and settings: no worse than itself
    assert result.data_drift is not None and result.data_drift.score == pytest.approx(0.0, abs=1e-9)
    assert "jobs/reviews/runs/2/report/data-profile.json" in s3.list_keys("jobs/reviews/runs/2/")


def test_nothing_promoted_passes_min_improvement_and_says_so(tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(CLASSIFY, "text"))
    gates = {"gates": [{"metric": "accuracy", "minImprovement": 0.5}]}
    m = classification_manifest(tiny_model_dir("bert"), data, tmp_path / "out", "lora", {"epochs": 1}, promotion=gates)
    result = run_as(m, tmp_path, 1)
    assert result.passed and "no promoted model yet" in result.gates[0].message
    summary = result.summary()
    assert "promotedRun" not in summary and "dataDrift" not in summary
    assert (tmp_path / "out" / Layout.data_profile(1)).is_file()  # for the next run to compare with


def test_a_malformed_promoted_pointer_exits_10_naming_it(tiny_model_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(CLASSIFY, "text"))
    out = tmp_path / "out"
    out.mkdir()
    (out / Layout.PROMOTED).write_text(json.dumps({"run": "latest", "modelUri": "file:///x"}))
    result = run_job(classification_manifest(tiny_model_dir("bert"), data, out, "lora", {"epochs": 1}), tmp_path)
    assert result.returncode == ExitCode.INVALID_CONFIG, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert f"{out}/promoted.json is not a valid promoted-model pointer" in line
    assert "run" in line and "time" in line  # what is wrong with it
    assert "Traceback" not in result.stderr


def test_promoted_classes_that_differ_from_the_data_are_matched_by_name(tiny_model_dir, tmp_path) -> None:
    """A new class appears after promotion: the promoted adapter's head has two outputs; their
    names come from its run's data profile, and the new class counts as never predicted."""
    base = tiny_model_dir("bert", base_only=True)  # no head: the second run has three classes
    out = tmp_path / "out"
    two = write_jsonl(tmp_path / "two" / "d.jsonl", rows_for(CLASSIFY, "text"))
    run_as(classification_manifest(base, two, out, "lora", {"epochs": 1}), tmp_path, 1)
    promote(out, 1)
    rows = rows_for(CLASSIFY, "text") + [
        {"text": f"so so meh {i}", "label": "meh", "group": "a"} for i in range(40)
    ]  # sorted names: meh, neg, pos: every id moves
    three = write_jsonl(tmp_path / "three" / "d.jsonl", rows)
    result = run_as(classification_manifest(base, three, out, "lora", {"epochs": 1}), tmp_path, 2)
    assert result.promoted is not None and result.promoted.error is None, result.promoted.error
    assert 0.0 <= result.promoted.metrics["accuracy"] <= 1.0
    assert math.isinf(result.promoted.metrics["eval_loss"])  # it gives the new class probability 0
    assert "eval_loss" not in result.summary()["promotedMetrics"]  # finite values only


def test_data_drift_is_reported_against_the_promoted_run(tiny_model_dir, tmp_path) -> None:
    base = tiny_model_dir("bert")
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(CLASSIFY, "text"))
    run_as(classification_manifest(base, data, out, "lora", {"epochs": 1}), tmp_path, 1)
    promote(out, 1)

    same = run_as(classification_manifest(base, data, out, "lora", {"epochs": 1}), tmp_path, 2)
    assert same.data_drift is not None and same.data_drift.score == pytest.approx(0.0, abs=1e-9)
    assert same.summary()["dataDriftDetail"] == {"labels": 0.0, "lengths": 0.0, "tokens": 0.0}

    # Other words, and only positive rows: labels, lengths and tokens all move.
    shifted_rows = [
        {"text": "river tree house night " * 6 + str(i), "label": "pos" if i % 5 else "neg"} for i in range(80)
    ]
    shifted = write_jsonl(tmp_path / "shifted" / "d.jsonl", shifted_rows)
    m = classification_manifest(base, shifted, out, "lora", {"epochs": 1})
    result = run_job(m, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "termination-log").read_text())
    detail = summary["dataDriftDetail"]
    assert set(detail) == {"labels", "lengths", "tokens"}
    assert summary["dataDrift"] == max(detail.values()) > 0.5
    assert 0 < detail["labels"] < detail["tokens"] <= 1
    assert f"data drift vs promoted run 1: {summary['dataDrift']:.3f}" in result.stdout + result.stderr
    report = json.loads((out / "runs" / "3" / "report" / "validation-report.json").read_text())
    assert report["dataDrift"]["score"] == summary["dataDrift"]
    assert report["dataDrift"]["againstRun"] == 1
    card_json = card(out, 3)
    assert card_json["dataDrift"]["distances"] == detail
    assert "## Data drift" in (out / Layout.model_card(3)).read_text()
    profile = json.loads((out / Layout.data_profile(3)).read_text())
    train_rows = report["split"]["sizes"]["train"]
    assert profile["rows"] == sum(profile["labels"].values()) == sum(profile["lengths"].values()) == train_rows


def test_a_promoted_run_without_a_profile_gives_no_score_said_once(tiny_model_dir, tmp_path) -> None:
    base = tiny_model_dir("bert")
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", rows_for(CLASSIFY, "text"))
    run_as(classification_manifest(base, data, out, "lora", {"epochs": 1}), tmp_path, 1)
    (out / Layout.data_profile(1)).unlink()  # as if written by an older trainer
    promote(out, 1)
    result = run_job(classification_manifest(base, data, out, "lora", {"epochs": 1}), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    said = (result.stdout + result.stderr).count(
        "data drift vs promoted run 1: not measured: run 1 has no data profile"
    )
    assert said == 1
    summary = json.loads((tmp_path / "termination-log").read_text())
    assert "dataDrift" not in summary and summary["promotedRun"] == 1
    report = json.loads((out / "runs" / "2" / "report" / "validation-report.json").read_text())
    assert report["dataDrift"]["score"] is None and "no data profile" in report["dataDrift"]["reason"]


def test_the_termination_message_keeps_what_the_operator_needs_when_trimmed(tmp_path, monkeypatch) -> None:
    from tuneloop_trainer.main import termination_message

    gates = [{"metric": f"metric_{i}", "passed": i % 2 == 0, "value": i / 3} for i in range(16)]
    metrics = {f"metric_{i}": i / 7 for i in range(300)}
    summary = {
        "result": "GateFailed",
        "reason": "GateFailed",
        "message": "not to be promoted: gate f1: f1 0.7 vs 0.8 of the promoted model (run 4) " + "x" * 5000,
        "metrics": metrics,
        "promotedRun": 4,
        "promotedMetrics": metrics,
        "dataDrift": 0.25,
        "dataDriftDetail": {"labels": 0.25},
        "modelUri": "s3://bucket/jobs/x/runs/5/model/",
        "gates": gates,
    }
    text = termination_message(summary)
    assert len(text.encode()) <= 4096
    short = json.loads(text)
    assert short["truncated"] is True
    assert (short["result"], short["reason"], short["promotedRun"], short["dataDrift"]) == ("GateFailed",) * 2 + (
        4,
        0.25,
    )
    assert short["modelUri"] == summary["modelUri"]
    assert [(g["metric"], g["passed"]) for g in short["gates"]] == [(g["metric"], g["passed"]) for g in gates]
    assert short["message"].startswith("not to be promoted: gate f1: f1 0.7 vs 0.8")

    # A little too long: only detail goes, the numbers the operator records stay.
    medium = {**summary, "message": "not to be promoted", "metrics": {"f1": 0.7}, "promotedMetrics": {"f1": 0.8}}
    medium["dataDriftDetail"] = {f"d{i}": 0.1 for i in range(300)}
    kept = json.loads(termination_message(medium))
    assert "dataDriftDetail" not in kept and kept["promotedMetrics"] == {"f1": 0.8} and kept["metrics"] == {"f1": 0.7}
