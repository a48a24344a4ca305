"""The spec's cross-field rules and their CEL twins, and facts the API documents from one home:
every rule the table says the API server checks has a CEL twin in the CRD and every CEL rule
names its rule; the learning-rate defaults in the docs are the traits table's."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
import yaml

from tests.manifests import CRD_PATH, ROOT
from tuneloop.api.methods import DEFAULT_LEARNING_RATES
from tuneloop.api.spec.rules import RULES
from tuneloop.cel import CEL_RULES

pytestmark = pytest.mark.unit


def test_rule_names_are_unique() -> None:
    assert [name for name, n in Counter(rule.name for rule in RULES).items() if n > 1] == []


def test_every_cel_rule_names_a_rule_the_api_server_checks() -> None:
    checked_by_the_api_server = {rule.name for rule in RULES if rule.cel}
    unknown = [(c.at, c.field_path, c.twin) for c in CEL_RULES if c.twin is not None]
    assert [u for u in unknown if u[2] not in checked_by_the_api_server] == []


def test_every_rule_the_api_server_checks_has_a_cel_twin() -> None:
    twins = {c.twin for c in CEL_RULES}
    assert [rule.name for rule in RULES if rule.cel and rule.name not in twins] == []


def test_cel_rules_without_a_twin_check_one_field() -> None:
    """The metadata.name length (the models check it on the field) and task immutability (it
    needs the old object, which the models never see)."""
    assert {(c.at, c.field_path) for c in CEL_RULES if c.twin is None} == {
        ((), ".metadata.name"),
        (("spec", "task"), None),
    }


def _learning_rate_description(text: str) -> dict[str, float]:
    listed = re.search(r"omit for the method's default \((.*)\)\.", text)
    assert listed is not None, text
    rates: dict[str, float] = {}
    for part in listed.group(1).split(", "):
        rate, names = part.split(" ")
        rates.update(dict.fromkeys(names.split("/"), float(rate)))
    return rates


def test_learning_rate_defaults_in_the_crd_and_docs_are_the_traits_table() -> None:
    crd: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    field = schema["properties"]["spec"]["properties"]["hyperparameters"]["properties"]["learningRate"]
    assert _learning_rate_description(field["description"]) == DEFAULT_LEARNING_RATES
    row = next(line for line in (ROOT / "docs" / "api.md").read_text().splitlines() if "`learningRate`" in line)
    assert _learning_rate_description(row) == DEFAULT_LEARNING_RATES
