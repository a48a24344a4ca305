"""spec.method for VeRA, LoHa, LoKr, bottleneck adapters and DoRA: defaults from the traits
table, and the combinations that cannot work refused at the same path by the models and the CRD."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tests.harness.crd_validation import validate_custom_object
from tests.manifests import CRD_PATH, minimal_job
from tuneloop.api import FineTuneJob
from tuneloop.api.methods import DEFAULT_LEARNING_RATES, METHOD_TRAITS, PEFT_METHODS
from tuneloop.validate import format_path

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def job(method: dict[str, Any], **spec: Any) -> dict[str, Any]:
    m = copy.deepcopy(minimal_job())
    m["spec"]["method"] = method
    for key, value in spec.items():
        m["spec"][key] = {**m["spec"].get(key, {}), **value}
    return m


def refusals(m: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        FineTuneJob.from_manifest(m)
    return {format_path(tuple(e["loc"])): e["msg"] for e in info.value.errors()}


@pytest.mark.parametrize("method", ["vera", "loha", "lokr", "bottleneck"])
def test_new_methods_are_peft_methods_with_their_own_learning_rate(schema: dict[str, Any], method: str) -> None:
    m = job({"type": method})
    spec = FineTuneJob.from_manifest(m).spec
    assert method in PEFT_METHODS
    assert spec.learning_rate() == DEFAULT_LEARNING_RATES[method] == METHOD_TRAITS[method].learning_rate
    assert spec.save_format() == "adapter"
    assert validate_custom_object(schema, m) == []


def test_settings_blocks_and_their_defaults() -> None:
    method = FineTuneJob.from_manifest(job({"type": "bottleneck", "bottleneck": {"nonlinearity": "gelu"}})).spec.method
    assert method.bottleneck is not None
    assert (method.bottleneck.reduction_factor, method.bottleneck.nonlinearity) == (16, "gelu")
    dora = FineTuneJob.from_manifest(job({"type": "lora", "lora": {"useDora": True}})).spec.method
    assert dora.lora is not None and dora.lora.use_dora


@pytest.mark.parametrize(
    ("m", "path", "words"),
    [
        (job({"type": "lora", "vera": {}}), "spec.method.vera", "vera settings apply to method vera"),
        (job({"type": "loha", "lokr": {"r": 4}}), "spec.method.lokr", "lokr settings apply to method lokr"),
        (job({"type": "vera", "bottleneck": {}}), "spec.method.bottleneck", "bottleneck"),
        (job({"type": "bottleneck"}, output={"save": "merged"}), "spec.output.save", "cannot be merged"),
        (job({"type": "prompt-tuning"}, output={"save": "merged"}), "spec.output.save", "cannot be merged"),
        (job({"type": "bottleneck", "unfreezing": {}}), "spec.method.unfreezing", "full fine-tuning only"),
        (
            job({"type": "qlora", "lora": {"useDora": True}}, resources={"gpus": 1}),
            "spec.method.lora.useDora",
            "lora only",
        ),
        (
            job({"type": "bottleneck", "bottleneck": {"reductionFactor": 0}}),
            "spec.method.bottleneck.reductionFactor",
            "",
        ),
        (
            job({"type": "bottleneck", "bottleneck": {"nonlinearity": "swish"}}),
            "spec.method.bottleneck.nonlinearity",
            "",
        ),
    ],
)
def test_refused_by_the_models_and_the_crd_at_the_same_path(
    schema: dict[str, Any], m: dict[str, Any], path: str, words: str
) -> None:
    found = refusals(m)
    assert path in found, found
    assert words in found[path]
    assert path in {e.field for e in validate_custom_object(schema, m)}


@pytest.mark.parametrize("method", ["vera", "loha", "lokr", "ia3", "lora"])
def test_merged_is_accepted_where_the_method_merges(schema: dict[str, Any], method: str) -> None:
    m = job({"type": method}, output={"save": "merged"})
    assert FineTuneJob.from_manifest(m).spec.save_format() == "merged"
    assert validate_custom_object(schema, m) == []
