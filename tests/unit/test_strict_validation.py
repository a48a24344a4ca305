"""The models are as strict as the CRD: a value of the wrong JSON type is refused by
``tuneloop validate`` (and so by ``tuneloop run`` and the trainer) exactly where the API
server refuses it, and a manifest the API server accepts is accepted here too.

Also: how manifests are read (duplicate keys, numbers written the way kubectl reads them)
and the message for a missing ``apiVersion``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.crd_validation import validate_custom_object
from tests.manifests import CRD_PATH, ROOT, load_examples, minimal_job
from tuneloop.manifests import ManifestError, read_manifests
from tuneloop.validate import validate_manifest

pytestmark = pytest.mark.unit

SCHEMA: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

Path_ = tuple[str | int, ...]


def _leaves(value: Any, schema: dict[str, Any], path: Path_) -> Iterator[tuple[Path_, dict[str, Any], Any]]:
    """Every scalar of a manifest with the CRD schema node that types it."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in value.items():
            yield from _leaves(sub, schema["properties"][key], (*path, key))
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, sub in value.items():
            yield from _leaves(sub, schema["additionalProperties"], (*path, key))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            yield from _leaves(sub, schema["items"], (*path, i))
    else:
        yield path, schema, value


def _kind(schema: dict[str, Any]) -> str:
    return "int-or-string" if schema.get("x-kubernetes-int-or-string") else str(schema.get("type"))


#: Values of the wrong JSON type for each CRD type: what YAML makes of `true`, `"3"`, `1.5`...
WRONG: dict[str, list[Any]] = {
    "integer": [True, False, "3", "x", 1.5, [1], {"a": 1}],
    "number": [True, "0.5", "5e-3", [0.1], {"a": 1}],
    "string": [3, 1.5, True, ["x"], {"a": "b"}],
    "boolean": ["true", "yes", 1, 0, ["x"]],
    "int-or-string": [True, 1.5, ["4"], {"a": 1}],
}


def _same_type_variants(kind: str, value: Any) -> list[Any]:
    """Values of another Python type that JSON (and so the API server) accepts for the field."""
    if kind == "integer":
        return [float(value)]  # 3.0: a JSON integer as far as the API server is concerned
    if kind == "number" and isinstance(value, float) and value.is_integer():
        return [int(value)]
    if kind == "number" and isinstance(value, int):
        return [float(value)]
    if kind == "int-or-string":
        return [4, "4", 4.0, "500m"]
    return []


@dataclass(frozen=True)
class Case:
    """A field of an example manifest, the values of the wrong type to try there, and values of
    another Python type that are still the right JSON type."""

    example: str
    path: Path_
    kind: str
    variants: list[Any]

    @property
    def field(self) -> str:
        return _dotted(self.path)


def _cases() -> list[Case]:
    seen: set[Path_] = set()
    cases = []
    for name, manifest in load_examples():
        for path, schema, value in _leaves(manifest["spec"], SCHEMA["properties"]["spec"], ("spec",)):
            generic = tuple("*" if isinstance(p, int) else p for p in path)
            if generic in seen:
                continue
            seen.add(generic)
            kind = _kind(schema)
            cases.append(Case(name, path, kind, _same_type_variants(kind, value)))
    return cases


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _set(manifest: dict[str, Any], path: Path_, value: Any) -> dict[str, Any]:
    m = copy.deepcopy(manifest)
    node: Any = m
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return m


def _models_refuse_at(manifest: dict[str, Any], field: str) -> bool:
    _job, problems = validate_manifest(manifest)
    return any(p.path == field or p.path.startswith((field + ".", field + "[")) for p in problems)


def _crd_refuses_at(manifest: dict[str, Any], field: str) -> bool:
    errors = validate_custom_object(SCHEMA, manifest)
    return any(e.field == field or e.field.startswith((field + ".", field + "[")) for e in errors)


CASES = _cases()


def test_the_cases_cover_every_kind_of_field() -> None:
    assert len(CASES) > 80
    assert {case.kind for case in CASES} == set(WRONG)


@pytest.mark.parametrize("case", CASES, ids=[case.field for case in CASES])
def test_models_and_crd_agree_on_values_of_another_type(case: Case) -> None:
    manifest = dict(load_examples())[case.example]
    field = case.field
    assert not _models_refuse_at(manifest, field) and not _crd_refuses_at(manifest, field)
    disagreements = []
    for value in WRONG[case.kind]:
        m = _set(manifest, case.path, value)
        models, crd = _models_refuse_at(m, field), _crd_refuses_at(m, field)
        if not (models and crd):
            disagreements.append(f"{field}: {value!r} ({case.kind}): models refuse: {models}, CRD refuses: {crd}")
    for value in case.variants:
        m = _set(manifest, case.path, value)
        models, crd = _models_refuse_at(m, field), _crd_refuses_at(m, field)
        if models != crd:
            disagreements.append(f"{field}: {value!r} ({case.kind}): models refuse: {models}, CRD refuses: {crd}")
    assert not disagreements, "\n".join(disagreements)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("metadata", "name"), 3),
        (("metadata", "labels"), {"team": 5}),
        (("metadata", "annotations"), {"tuneloop.dev/approve": 3}),
        (("metadata", "namespace"), True),
    ],
)
def test_metadata_is_typed_like_the_api_server_types_it(path: Path_, value: Any) -> None:
    m = _set(minimal_job(), path, value)
    field = _dotted(path)
    assert _models_refuse_at(m, field)


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuneloop", *args], capture_output=True, text=True, cwd=ROOT, check=False, timeout=60
    )


def _job_yaml(hyperparameters: str) -> str:
    return (
        "apiVersion: tuneloop.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: job}\nspec:\n"
        "  task: sequence-classification\n  model: {uri: 'hf://org/model'}\n"
        "  dataset: {uri: 's3://data-bucket/train/'}\n  output: {uri: 's3://model-bucket/out/'}\n"
        f"  hyperparameters:\n{hyperparameters}"
    )


def test_validate_refuses_the_values_the_api_server_refuses(tmp_path: Path) -> None:
    """The issue's reproduction: these passed and trained; kubectl apply refuses them."""
    cases = {
        "    epochs: true\n": "spec.hyperparameters.epochs",
        '    epochs: "3"\n': "spec.hyperparameters.epochs",
        '    learningRate: "5e-3"\n': "spec.hyperparameters.learningRate",
        "    batchSize: 8.5\n": "spec.hyperparameters.batchSize",
        "    packing: 'yes'\n": "spec.hyperparameters.packing",
    }
    for text, field in cases.items():
        result = run_cli("validate", write(tmp_path, _job_yaml(text)))
        assert result.returncode == 1, (text, result.stdout)
        assert f"{field}: must be" in result.stderr, (text, result.stderr)
        assert "Traceback" not in result.stderr


def test_quoted_number_says_to_remove_the_quotes(tmp_path: Path) -> None:
    result = run_cli("validate", write(tmp_path, _job_yaml('    epochs: "3"\n')))
    assert "spec.hyperparameters.epochs: must be a valid integer (got '3')" in result.stderr
    assert "without quotes" in result.stderr


def test_numbers_written_as_kubectl_reads_them_are_accepted(tmp_path: Path) -> None:
    """`5e-3` is a number for kubectl (and YAML 1.2) though PyYAML's YAML 1.1 reads it as a string."""
    text = "    learningRate: 5e-3\n    epochs: 3.0\n    warmupRatio: 1e-1\n    weightDecay: 0\n"
    result = run_cli("validate", write(tmp_path, _job_yaml(text)))
    assert result.returncode == 0, result.stderr
    doc = read_manifests(write(tmp_path, _job_yaml(text), "again.yaml"))[0]
    assert doc.body["spec"]["hyperparameters"]["learningRate"] == pytest.approx(0.005)
    job, problems = validate_manifest(doc.body)
    assert not problems and job is not None
    assert job.spec.hyperparameters.epochs == 3
    assert job.spec.hyperparameters.learning_rate == pytest.approx(0.005)


def test_quantities_accept_integers_and_strings_like_kubernetes(tmp_path: Path) -> None:
    for cpu, memory in (("4", "16Gi"), ("'500m'", "'1.5Gi'"), ("2.0", "1024")):
        m = _job_yaml("    epochs: 1\n") + f"  resources: {{cpu: {cpu}, memory: {memory}, gpus: 0}}\n"
        result = run_cli("validate", write(tmp_path, m))
        assert result.returncode == 0, (cpu, memory, result.stderr)


def test_a_quantity_of_the_wrong_type_is_one_problem_at_its_field(tmp_path: Path) -> None:
    m = _job_yaml("    epochs: 1\n") + "  resources: {cpu: true}\n"
    result = run_cli("validate", write(tmp_path, m))
    assert result.returncode == 1
    assert "spec.resources.cpu: must be an integer or a string (got true)" in result.stderr
    assert "spec.resources.cpu.int" not in result.stderr and "cpu.str" not in result.stderr
    assert "1 problem" in result.stderr


def test_timestamps_and_dates_read_from_yaml_are_strings_as_for_kubectl(tmp_path: Path) -> None:
    """An unquoted date is a string for kubectl; a label value may look like one."""
    text = _job_yaml("    epochs: 1\n").replace(
        "metadata: {name: job}", "metadata: {name: job, labels: {day: 2024-01-31}}"
    )
    result = run_cli("validate", write(tmp_path, text))
    assert result.returncode == 0, result.stderr


def test_not_a_number_is_refused(tmp_path: Path) -> None:
    result = run_cli("validate", write(tmp_path, _job_yaml("    learningRate: .nan\n")))
    assert result.returncode == 1
    assert "spec.hyperparameters.learningRate" in result.stderr
    assert "finite" in result.stderr


# --- apiVersion, duplicate keys --------------------------------------------------------------


def test_missing_api_version_says_it_is_missing(tmp_path: Path) -> None:
    m = minimal_job()
    del m["apiVersion"]
    result = run_cli("validate", write(tmp_path, yaml.safe_dump(m)))
    assert result.returncode == 1
    assert "apiVersion is missing" in result.stderr
    assert "None" not in result.stderr


def test_missing_api_version_in_tuneloop_run_says_it_is_missing(tmp_path: Path) -> None:
    m = minimal_job()
    del m["apiVersion"]
    result = run_cli("run", write(tmp_path, yaml.safe_dump(m)))
    assert result.returncode == 10
    assert "apiVersion is missing" in result.stderr
    assert "None" not in result.stderr


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines(tmp_path: Path) -> None:
    text = _job_yaml("    epochs: 3\n    batchSize: 8\n    epochs: 30\n")
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        read_manifests(path)
    message = str(caught.value)
    assert "duplicate key 'epochs' in spec.hyperparameters" in message
    assert "lines 10 and 12" in message
    assert "30" not in message  # never the values
    result = run_cli("validate", path)
    assert result.returncode == 2
    assert "duplicate key 'epochs'" in result.stderr
    result = run_cli("run", path)
    assert result.returncode == 10
    assert "duplicate key 'epochs'" in result.stderr


def test_duplicate_top_level_keys_and_keys_in_lists(tmp_path: Path) -> None:
    text = yaml.safe_dump(minimal_job()) + "kind: FineTuneJob\n"
    with pytest.raises(ManifestError, match="duplicate key 'kind' at the top level"):
        read_manifests(write(tmp_path, text))
    m = minimal_job()
    m["spec"]["promotion"] = {"gates": [{"metric": "f1", "min": 0.5}]}
    text = yaml.safe_dump(m).replace("min: 0.5", "min: 0.5\n      metric: accuracy")
    with pytest.raises(ManifestError, match=r"duplicate key 'metric' in spec\.promotion\.gates\[0\]"):
        read_manifests(write(tmp_path, text, "gates.yaml"))


def test_the_same_key_in_sibling_mappings_is_fine(tmp_path: Path) -> None:
    docs = read_manifests(write(tmp_path, yaml.safe_dump(minimal_job())))
    assert len(docs) == 1  # "uri" under model, dataset and output: not duplicates


def test_documents_before_a_duplicate_key_are_still_checked(tmp_path: Path) -> None:
    text = yaml.safe_dump(minimal_job()) + "---\n" + "a: 1\na: 2\n"
    result = run_cli("validate", write(tmp_path, text))
    assert result.returncode == 2
    assert "ok: " in result.stdout
    assert "duplicate key 'a' at the top level" in result.stderr
