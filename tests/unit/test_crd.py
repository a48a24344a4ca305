"""The generated CRD: in sync with the models, structural, valid, and as strict as the models."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.harness.crd_validation import validate_custom_object
from tests.manifests import BROKEN, CRD_PATH, ROOT, Broken, load_examples, minimal_job
from tuneloop import cel, crd
from tuneloop.apidoc import render_api_reference

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def schema(committed: dict[str, Any]) -> dict[str, Any]:
    return committed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_models() -> None:
    assert CRD_PATH.read_text() == crd.render_crd(), "run `tuneloop crd` and commit crds/ and docs/api.md"


def test_committed_api_reference_matches_the_models() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == render_api_reference(), "run `tuneloop crd`"


def test_crd_check_command_reports_drift(tmp_path) -> None:
    assert crd.main(["--root", str(tmp_path), "--check"]) == 1
    assert crd.main(["--root", str(tmp_path)]) == 0
    assert crd.main(["--root", str(tmp_path), "--check"]) == 0


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    """The rules of a structural schema (apiextensions.k8s.io/v1), as the API server checks them."""
    for path, node in _walk(schema):
        if path.endswith("x-kubernetes-validations") or "/x-kubernetes-validations" in path:
            continue
        if "/properties/" in path and path.rsplit("/", 1)[-1] in ("properties",):
            continue
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs", "const"):
            assert forbidden not in node or path.endswith("/properties"), f"{forbidden} at {path}"
        is_schema = any(k in node for k in ("type", "x-kubernetes-int-or-string", "description"))
        if not is_schema or path.endswith("/properties"):
            continue
        if not node.get("x-kubernetes-int-or-string") and not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "type" in node, f"no type at {path}"
        if "properties" in node:
            assert "additionalProperties" not in node, f"properties and additionalProperties at {path}"
        if isinstance(node.get("default"), dict | list):
            pytest.fail(f"object default at {path}")


def test_every_field_has_a_description(schema: dict[str, Any]) -> None:
    missing = []

    def visit(node: dict[str, Any], path: str) -> None:
        for name, child in node.get("properties", {}).items():
            if path == "" and name in ("metadata",):
                continue
            if not child.get("description"):
                missing.append(f"{path}.{name}".lstrip("."))
            target = child.get("items", child)
            visit(target, f"{path}.{name}")

    visit(schema, "")
    assert not missing, f"fields without a description: {missing}"


def test_crd_is_a_valid_apiextensions_object() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(CRD_PATH)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout + result.stderr


def test_crd_names_subresources_and_printer_columns(committed: dict[str, Any]) -> None:
    spec = committed["spec"]
    assert spec["names"]["shortNames"] == ["ftj"]
    assert spec["names"]["categories"] == ["tuneloop"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Run", "Progress", "Loss", "Promoted", "Metric", "Age"]


def test_task_is_immutable_in_the_crd(schema: dict[str, Any]) -> None:
    old = minimal_job()
    new = copy.deepcopy(old)
    new["spec"]["task"] = "causal-lm"
    errors = validate_custom_object(schema, new, old)
    assert [e.field for e in errors] == ["spec.task"]
    assert "immutable" in errors[0].message
    assert validate_custom_object(schema, copy.deepcopy(old), old) == []


@pytest.mark.parametrize(("name", "manifest"), load_examples(), ids=[n for n, _ in load_examples()])
def test_examples_pass_the_crd_schema(schema: dict[str, Any], name: str, manifest: dict[str, Any]) -> None:
    assert validate_custom_object(schema, manifest) == []


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm", "seq2seq"])
def test_minimal_jobs_pass_the_crd_schema(schema: dict[str, Any], task: str) -> None:
    assert validate_custom_object(schema, minimal_job(task)) == []


@pytest.mark.parametrize("broken", BROKEN, ids=[b.name for b in BROKEN])
def test_crd_rejects_what_the_models_reject_at_the_same_path(schema: dict[str, Any], broken: Broken) -> None:
    fields = {e.field for e in validate_custom_object(schema, broken.manifest())}
    if broken.crd_catches:
        assert broken.path in fields, f"CRD reported {fields}"
    else:
        assert fields == set(), "documented as operator-only; update OPERATOR_ONLY_RULES if the CRD catches it"


def test_operator_only_rules_are_documented() -> None:
    documented = " ".join(cel.OPERATOR_ONLY_RULES)
    for broken in BROKEN:
        if not broken.crd_catches:
            assert broken.path.split("[")[0].split(".")[-1] in documented or "promotion.gates" in documented
