"""A promotion gate's bounds: the API server's CEL rule and `tuneloop validate` agree.

Regression: a gate with only ``minGainOverBaseline`` passed `tuneloop validate` (the operator
acts on it) but the CRD's CEL rule asked for min, max or minImprovement, so the API server
refused the same manifest.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tests.harness.crd_validation import validate_custom_object
from tests.manifests import CRD_PATH, minimal_job
from tuneloop.api import FineTuneJob

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def with_gate(gate: dict[str, Any]) -> dict[str, Any]:
    manifest = copy.deepcopy(minimal_job())
    manifest["spec"]["promotion"] = {"gates": [gate]}
    return manifest


@pytest.mark.parametrize("bound", [{"min": 0.5}, {"max": 0.9}, {"minImprovement": 0.01}, {"minGainOverBaseline": 0.0}])
def test_any_one_bound_is_enough_for_both(schema: dict[str, Any], bound: dict[str, Any]) -> None:
    manifest = with_gate({"metric": "f1", **bound})
    FineTuneJob.from_manifest(manifest)
    assert validate_custom_object(schema, manifest) == []


def test_a_gate_without_bounds_is_refused_by_both_with_the_same_words(schema: dict[str, Any]) -> None:
    manifest = with_gate({"metric": "f1"})
    with pytest.raises(ValidationError) as refused:
        FineTuneJob.from_manifest(manifest)
    words = "a gate needs at least one of min, max, minImprovement or minGainOverBaseline"
    assert words in str(refused.value)
    admission = validate_custom_object(schema, manifest)
    assert [error.field for error in admission] == ["spec.promotion.gates[0]"]
    assert words in admission[0].message
