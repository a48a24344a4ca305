"""`tuneloop validate` as a user runs it: exit codes and messages, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.manifests import BROKEN, EXAMPLES, ROOT, minimal_job
from tuneloop.cli import main

pytestmark = pytest.mark.unit


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "tuneloop", *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=ROOT,
        check=False,
        timeout=60,
    )


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def test_examples_are_valid() -> None:
    result = run_cli("validate", *[str(p) for p in EXAMPLES])
    assert result.returncode == 0, result.stderr
    assert f"{len(EXAMPLES)} manifests checked: {len(EXAMPLES)} valid, 0 invalid" in result.stdout
    assert "Traceback" not in result.stderr


def test_broken_manifest_names_each_bad_field(tmp_path: Path) -> None:
    m = minimal_job()
    m["spec"]["method"] = {"type": "lora", "lora": {"r": 0}}
    m["spec"]["hyperparameters"] = {"learningrate": 0.1, "epochs": 0}
    path = write(tmp_path, "bad.yaml", yaml.safe_dump(m))
    result = run_cli("validate", path)
    assert result.returncode == 1
    err = result.stderr
    assert "document 1 (FineTuneJob 'job'" in err
    assert "spec.method.lora.r: must be greater than 0 (got 0)" in err
    assert "spec.hyperparameters.learningrate: unknown field" in err
    assert "did you mean 'learningRate'?" in err
    assert "spec.hyperparameters.epochs" in err
    assert "Traceback" not in err


def test_multi_document_file_reports_each_document(tmp_path: Path) -> None:
    good = minimal_job(name="good")
    bad = minimal_job(name="bad")
    bad["spec"]["task"] = "translation"
    path = write(tmp_path, "jobs.yaml", yaml.safe_dump_all([good, bad]))
    result = run_cli("validate", path)
    assert result.returncode == 1
    assert "ok: " in result.stdout and "document 1 (FineTuneJob 'good'" in result.stdout
    assert "document 2 (FineTuneJob 'bad'" in result.stderr
    assert "spec.task" in result.stderr
    assert "2 manifests checked: 1 valid, 1 invalid" in result.stderr


def test_every_broken_variant_fails_with_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "all.yaml", yaml.safe_dump_all([b.manifest() for b in BROKEN]))
    result = run_cli("validate", "-o", "json", path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["invalid"] == len(BROKEN)
    for broken, doc in zip(BROKEN, report["reports"], strict=True):
        assert broken.path in {p["path"] for p in doc["problems"]}, broken.name


def test_other_kinds_are_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = run_cli("validate", path)
    assert result.returncode == 1
    assert "'ConfigMap' is not a FineTuneJob" in result.stderr


def test_wrong_api_version(tmp_path: Path) -> None:
    m = minimal_job()
    m["apiVersion"] = "tuneloop.dev/v1"
    result = run_cli("validate", write(tmp_path, "v.yaml", yaml.safe_dump(m)))
    assert result.returncode == 1
    assert "apiVersion: tuneloop.dev/v1alpha1" in result.stderr


def test_malformed_yaml_says_where(tmp_path: Path) -> None:
    result = run_cli("validate", write(tmp_path, "broken.yaml", "spec:\n  task: [unclosed\n"))
    assert result.returncode == 2
    assert "invalid YAML at line" in result.stderr
    assert "Traceback" not in result.stderr


def test_documents_before_a_malformed_one_are_still_checked(tmp_path: Path) -> None:
    text = yaml.safe_dump(minimal_job()) + "---\nkey: [\n"
    result = run_cli("validate", write(tmp_path, "mixed.yaml", text))
    assert result.returncode == 2
    assert "ok: " in result.stdout
    assert "invalid YAML" in result.stderr


def test_yaml_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    result = run_cli("validate", write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n"))
    assert result.returncode == 2
    assert "billion laughs" in result.stderr


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    result = run_cli("validate", write(tmp_path, "deep.yaml", "[" * 5000 + "]" * 5000 + "\n"))
    assert result.returncode == 2
    assert "nesting" in result.stderr
    assert "Traceback" not in result.stderr


def test_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("wb") as f:
        f.write(b"x: '")
        f.write(b"a" * (50 * 1024 * 1024))
        f.write(b"'\n")
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert "larger than 4 MiB" in result.stderr


def test_binary_file(tmp_path: Path) -> None:
    result = run_cli("validate", write(tmp_path, "model.bin", b"\x89PNG\r\n\x1a\n\xff\xfe\x00"))
    assert result.returncode == 2
    assert "not UTF-8" in result.stderr


def test_missing_file_and_directory(tmp_path: Path) -> None:
    result = run_cli("validate", str(tmp_path / "nope.yaml"), str(tmp_path))
    assert result.returncode == 2
    assert "no such file" in result.stderr
    assert "is a directory" in result.stderr


def test_empty_file(tmp_path: Path) -> None:
    result = run_cli("validate", write(tmp_path, "empty.yaml", "# nothing\n"))
    assert result.returncode == 2
    assert "no YAML documents" in result.stderr


def test_scalar_document(tmp_path: Path) -> None:
    result = run_cli("validate", write(tmp_path, "s.yaml", "just a string\n"))
    assert result.returncode == 1
    assert "must be a mapping" in result.stderr


def test_stdin() -> None:
    result = run_cli("validate", "-", stdin=yaml.safe_dump(minimal_job()))
    assert result.returncode == 0
    assert "<stdin>" in result.stdout


def test_quiet_prints_nothing_when_valid() -> None:
    assert main(["validate", "-q", str(EXAMPLES[0])]) == 0


def test_no_arguments_is_a_usage_error() -> None:
    result = run_cli("validate")
    assert result.returncode == 2
    assert "usage:" in result.stderr
