"""spec.privacy: its fields, and the combinations DP-SGD's guarantee does not cover, refused at
the field that asks for them (``tuneloop validate`` reports them before a pod starts)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from tests.manifests import minimal_job
from tuneloop.api import FineTuneJob
from tuneloop.validate import format_path

pytestmark = pytest.mark.unit


def job(privacy: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    m = copy.deepcopy(minimal_job())
    m["spec"]["privacy"] = privacy if privacy is not None else {"targetEpsilon": 8}
    for key, value in spec.items():
        m["spec"][key] = value if not isinstance(value, dict) else {**m["spec"].get(key, {}), **value}
    return m


def refusals(m: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        FineTuneJob.from_manifest(m)
    return {format_path(tuple(e["loc"])): e["msg"] for e in info.value.errors()}


def test_privacy_defaults_and_packing_off() -> None:
    spec = FineTuneJob.from_manifest(job(task="causal-lm", dataset={"columns": {}})).spec
    assert spec.privacy is not None
    assert spec.privacy.target_epsilon == 8
    assert spec.privacy.delta is None  # 1/(10 rows), decided when the data is read
    assert spec.privacy.max_grad_norm == 1.0
    assert spec.packing() is False  # packing is on by default for causal-lm, but not with privacy


@pytest.mark.parametrize(
    ("privacy", "field"),
    [
        ({"targetEpsilon": 0}, "targetEpsilon"),
        ({"targetEpsilon": 8, "delta": 1}, "delta"),
        ({"targetEpsilon": 8, "maxGradNorm": 0}, "maxGradNorm"),
        ({"delta": 1e-5}, "targetEpsilon"),
    ],
)
def test_privacy_fields_are_checked(privacy: dict[str, Any], field: str) -> None:
    assert any(path.endswith(f"privacy.{field}") for path in refusals(job(privacy)))


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({"method": {"type": "prompt-tuning"}}, "spec.method.type", "method prompt-tuning"),
        ({"method": {"type": "ia3"}}, "spec.method.type", "full and lora"),
        ({"method": {"type": "qlora"}}, "spec.method.type", "qlora"),
        (
            {"hyperparameters": {"gradientAccumulationSteps": 4}},
            "spec.hyperparameters.gradientAccumulationSteps",
            "raise hyperparameters.batchSize",
        ),
        (
            {"task": "causal-lm", "dataset": {"columns": {}}, "hyperparameters": {"packing": True}},
            "spec.hyperparameters.packing",
            "mixes several training rows",
        ),
        ({"resources": {"gpus": 2}}, "spec.resources.gpus", "one process"),
        ({"resources": {"gpus": 1, "nodes": 2}}, "spec.resources.nodes", "one process"),
        ({"method": {"type": "full", "unfreezing": {}}}, "spec.method.unfreezing", "gradual unfreezing"),
        ({"dataset": {"balance": {"strategy": "class-weights"}}}, "spec.dataset.balance.strategy", "other rows"),
        ({"dataset": {"balance": {"strategy": "oversample"}}}, "spec.dataset.balance.strategy", "repeated row"),
        ({"dataset": {"labelIssues": "drop"}}, "spec.dataset.labelIssues", "use labelIssues: report"),
    ],
)
def test_combinations_without_a_guarantee_are_refused_at_their_field(
    spec: dict[str, Any], path: str, words: str
) -> None:
    found = refusals(job(**spec))
    assert path in found, found
    assert "spec.privacy cannot be guaranteed" in found[path]
    assert words in found[path]


def test_the_same_settings_without_privacy_are_accepted() -> None:
    m = job(hyperparameters={"gradientAccumulationSteps": 4}, resources={"gpus": 2})
    del m["spec"]["privacy"]
    FineTuneJob.from_manifest(m)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_full_and_lora_are_offered(method: str) -> None:
    FineTuneJob.from_manifest(job(method={"type": method}))
