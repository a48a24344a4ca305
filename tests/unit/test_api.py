"""The FineTuneJob models: defaults, per-field validation and cross-field rules."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from tests.manifests import BROKEN, Broken, load_examples, minimal_job
from tuneloop.api import FineTuneJob, derive_phase, parse_duration
from tuneloop.api.status import Condition, ConditionType, Reason
from tuneloop.api.types import check_uri, expand_cron
from tuneloop.validate import format_path, validate_manifest

pytestmark = pytest.mark.unit


def paths_of(error: ValidationError) -> set[str]:
    return {format_path(tuple(e["loc"])) for e in error.errors()}


@pytest.mark.parametrize(("name", "manifest"), load_examples(), ids=[n for n, _ in load_examples()])
def test_every_example_is_valid(name: str, manifest: dict) -> None:
    job = FineTuneJob.from_manifest(manifest)
    assert job.metadata.name


def test_minimal_job_gets_sane_defaults() -> None:
    spec = FineTuneJob.from_manifest(minimal_job()).spec
    assert spec.method.type == "lora"
    assert spec.learning_rate() == pytest.approx(2e-4)
    assert spec.hyperparameters.epochs == 3
    assert spec.dataset.split.validation == pytest.approx(0.1)
    assert spec.dataset.screening.pii == "mask"  # PII screening is on unless turned off
    assert spec.resources.gpus == 1
    assert spec.retrain.on_spec_change is True
    assert spec.columns() == {"text": "text", "label": "label"}
    assert spec.computed_metrics() == {"eval_loss", "accuracy", "f1", "precision", "recall"}
    assert spec.save_format() == "adapter"
    assert spec.packing() is False


def test_full_fine_tuning_defaults_to_a_small_learning_rate() -> None:
    m = minimal_job()
    m["spec"]["method"] = {"type": "full"}
    spec = FineTuneJob.from_manifest(m).spec
    assert spec.learning_rate() == pytest.approx(2e-5)
    assert spec.save_format() == "full"


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (None, {"text": "text"}),
        ({"messages": "conversation"}, {"messages": "conversation"}),
        ({"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "a"}),
    ],
)
def test_causal_lm_column_layouts(columns: dict | None, expected: dict) -> None:
    m = minimal_job("causal-lm")
    if columns:
        m["spec"]["dataset"]["columns"] = columns
    spec = FineTuneJob.from_manifest(m).spec
    assert spec.columns() == expected
    assert spec.packing() is True
    assert spec.computed_metrics() == {"eval_loss", "perplexity"}


def test_seq2seq_rouge_expands_to_its_variants() -> None:
    spec = FineTuneJob.from_manifest(minimal_job("seq2seq")).spec
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"} <= spec.computed_metrics()


def test_derived_metrics_can_be_gated() -> None:
    m = minimal_job("causal-lm")
    m["spec"]["evaluation"] = {
        "outOfDomain": {"uri": "s3://ood-bucket/x.jsonl"},
        "forgetting": {"uri": "s3://general-bucket/wiki.jsonl"},
        "fairness": {"groupColumn": "lang", "metric": "perplexity"},
    }
    m["spec"]["promotion"] = {
        "gates": [
            {"metric": "ood_perplexity", "max": 20},
            {"metric": "forgetting_increase", "max": 0.1},
            {"metric": "fairness_gap", "max": 0.05},
        ]
    }
    FineTuneJob.from_manifest(m)


@pytest.mark.parametrize("broken", BROKEN, ids=[b.name for b in BROKEN])
def test_broken_manifest_is_rejected_at_its_field(broken: Broken) -> None:
    with pytest.raises(ValidationError) as info:
        FineTuneJob.from_manifest(broken.manifest())
    assert broken.path in paths_of(info.value)


def test_all_cross_field_problems_are_reported_at_once() -> None:
    m = minimal_job("causal-lm")
    m["spec"]["method"] = {"type": "qlora", "unfreezing": {}}
    m["spec"]["resources"] = {"gpus": 0}
    m["spec"]["dataset"]["balance"] = {}
    m["spec"]["promotion"] = {"gates": [{"metric": "f1", "min": 0.5}]}
    with pytest.raises(ValidationError) as info:
        FineTuneJob.from_manifest(m)
    assert paths_of(info.value) == {
        "spec.method.unfreezing",
        "spec.resources.gpus",
        "spec.dataset.balance",
        "spec.promotion.gates[0].metric",
    }


def test_messages_explain_what_to_do() -> None:
    m = minimal_job()
    m["spec"]["method"] = {"type": "qlora"}
    m["spec"]["resources"] = {"gpus": 0}
    _, problems = validate_manifest(m)
    (problem,) = problems
    assert problem.path == "spec.resources.gpus"
    assert "set resources.gpus >= 1" in problem.message


def test_unknown_field_suggests_the_right_spelling() -> None:
    m = minimal_job()
    m["spec"]["hyperparameters"] = {"learningrate": 1e-4}
    _, problems = validate_manifest(m)
    (problem,) = problems
    assert problem.path == "spec.hyperparameters.learningrate"
    assert "unknown field" in problem.message
    assert "learningRate" in problem.hint


def test_unknown_top_level_spec_field_lists_the_known_ones() -> None:
    m = minimal_job()
    m["spec"]["zzz"] = 1
    _, problems = validate_manifest(m)
    assert problems[0].path == "spec.zzz"
    assert "hyperparameters" in problems[0].hint


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/a/b.jsonl",
        "s3://my.bucket-1/",
        "file:///data/x.csv",
        "hf://org/name",
        "hf://org/name@v1.0",
        "hf://gpt2",
    ],
)
def test_good_uris(uri: str) -> None:
    assert check_uri(uri, ("s3", "hf", "file")) == uri


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("s3://b/../x", "'..'"),
        ("s3://bucket/a/..", "'..'"),
        ("s3:///key", "empty bucket"),
        ("s3://Bucket/x", "not a valid S3 bucket"),
        ("gs://bucket/x", "not supported"),
        ("/data/x", "not a URI"),
        ("file://relative/x", "absolute"),
        ("s3://bucket/a b", "whitespace"),
        ("s3://bucket/a\nb", "whitespace"),
        ("hf://org/name/extra", "hf://<org>/<name>"),
    ],
)
def test_bad_uris(uri: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_uri(uri, ("s3", "hf", "file"))


def test_dots_inside_a_name_are_fine() -> None:
    assert check_uri("s3://bucket/v1..2/model", ("s3",))


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1h30m", 5400), ("7d", 604800)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "1 hour", "m5", "5m1h", "-5m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_zero_duration_is_refused() -> None:
    m = minimal_job()
    m["spec"]["retrain"] = {"cooldown": "0s"}
    with pytest.raises(ValidationError, match="longer than zero"):
        FineTuneJob.from_manifest(m)


@pytest.mark.parametrize("cron", ["0 3 * * 0", "*/15 * * * *", "0 3 * * MON-FRI", "@daily", "@weekly"])
def test_cron_expressions_that_parse(cron: str) -> None:
    m = minimal_job()
    m["spec"]["retrain"] = {"schedule": cron}
    assert FineTuneJob.from_manifest(m).spec.retrain.schedule == cron


def test_cron_macros_expand() -> None:
    assert expand_cron("@hourly") == "0 * * * *"


@pytest.mark.parametrize(("value", "ok"), [(4, True), ("500m", True), ("16Gi", True), ("16 GB", False), ("-1", False)])
def test_quantities(value: object, ok: bool) -> None:
    m = minimal_job()
    m["spec"]["resources"] = {"memory": value}
    if ok:
        assert FineTuneJob.from_manifest(m).spec.resources.memory == str(value)
    else:
        with pytest.raises(ValidationError, match="quantity"):
            FineTuneJob.from_manifest(m)


def test_separate_validation_set_frees_the_split() -> None:
    m = minimal_job()
    m["spec"]["dataset"]["split"] = {"validation": 0.6, "test": 0.5, "validationUri": "s3://val-bucket/v.jsonl"}
    FineTuneJob.from_manifest(m)  # validation fraction is ignored, 0.5 remains for training


def test_round_trip_to_wire_form_is_stable() -> None:
    for _, manifest in load_examples():
        job = FineTuneJob.from_manifest(manifest)
        again = FineTuneJob.from_manifest(job.to_wire())
        assert again == job
        assert "learning_rate" not in str(job.to_wire())  # camelCase on the wire


def test_spec_is_not_mutated_by_validation() -> None:
    m = minimal_job()
    before = copy.deepcopy(m)
    FineTuneJob.from_manifest(m)
    assert m == before


def _cond(type_: str, status: str, reason: str = "X") -> Condition:
    return Condition.model_validate(
        {"type": type_, "status": status, "reason": reason, "lastTransitionTime": "2026-01-01T00:00:00Z"}
    )


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        ([], "Pending"),
        ([_cond("Running", "True"), _cond("DataValid", "Unknown")], "Validating"),
        ([_cond("Running", "True", Reason.POD_CREATED), _cond("DataValid", "Unknown")], "Pending"),
        ([_cond("Running", "True", Reason.POD_STUCK), _cond("DataValid", "True")], "Pending"),
        ([_cond("Running", "True"), _cond("DataValid", "True")], "Running"),
        ([_cond("Running", "True", Reason.EVALUATING)], "Evaluating"),
        ([_cond("Running", "False"), _cond("Complete", "True")], "Succeeded"),
        ([_cond("Failed", "True"), _cond("Complete", "True")], "Failed"),
        ([_cond("Suspended", "True"), _cond("Running", "True")], "Suspended"),
    ],
)
def test_phase_is_derived_from_conditions(conditions: list[Condition], phase: str) -> None:
    assert derive_phase(conditions) == phase


def test_condition_reason_must_be_camel_case() -> None:
    with pytest.raises(ValidationError):
        _cond(ConditionType.READY, "True", "not camel case")


def test_reason_constants_are_valid_condition_reasons() -> None:
    reasons = [v for k, v in vars(Reason).items() if k.isupper()]
    assert len(reasons) > 20
    for reason in reasons:
        _cond(ConditionType.READY, "True", reason)
