"""The trainer claims its output and run number, and resumes only its own checkpoints (issue #9).

Each test reproduces what a user saw: two `tuneloop run` on one output both took run 1 and one
result was lost; a job resumed and overwrote another job's run; a re-created job resumed the old
job's checkpoint with the old optimizer state; `--run 0` trained silently as run 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.trainer_jobs import job_file, run_cli, tiny_job
from tests.manifests import ROOT
from tuneloop.contract import ExitCode, Layout
from tuneloop.ownership import JobIdentity, claim_output, claim_run
from tuneloop.storage import Storage

pytestmark = pytest.mark.integration


def tuneloop_run(job: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tuneloop", "run", str(job), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.fixture
def classification(tiny_model_dir: Any, tmp_path: Path) -> dict[str, Any]:
    m = tiny_job(
        "sequence-classification",
        tiny_model_dir("bert"),
        tmp_path,
        n=60,
        method={"type": "lora"},
        hyperparameters={"epochs": 1},
    )
    m["metadata"]["namespace"] = "ml"
    return m


def test_two_local_runs_on_one_output_take_different_runs(classification: dict[str, Any], tmp_path: Path) -> None:
    job = job_file(tmp_path, classification)
    first, second = tuneloop_run(job), tuneloop_run(job)
    results = [finish(first), finish(second)]
    for code, _out, err in results:
        assert code == 0, err[-2000:]
    models = sorted(line.split()[-1] for _, out, _ in results for line in out.splitlines() if line.startswith("model:"))
    out = tmp_path / "out"
    assert models == [f"file://{out}/runs/1/model/", f"file://{out}/runs/2/model/"]
    for run in (1, 2):
        card = json.loads((out / "runs" / str(run) / "model-card.json").read_text())
        assert card["run"] == run
        claim = json.loads((out / Layout.run_claim(run)).read_text())
        assert claim["job"] == {"namespace": "ml", "name": "t", "uid": None}


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_a_run_number_below_1_is_refused_with_a_message(
    classification: dict[str, Any], tmp_path: Path, bad: str
) -> None:
    code, _out, err = finish(tuneloop_run(job_file(tmp_path, classification), "--run", bad))
    assert code == ExitCode.INVALID_CONFIG, err
    assert "--run must be a run number (1, 2, 3...)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "runs").exists()


def test_a_local_run_into_a_cluster_jobs_output_is_refused(classification: dict[str, Any], tmp_path: Path) -> None:
    out_uri = classification["spec"]["output"]["uri"]
    owner = JobIdentity(namespace="ml", name="t", uid="0b9c-uid")
    claim_output(Storage.for_uri(out_uri), out_uri, owner, continue_lineage=False, by="operator")
    code, _out, err = finish(tuneloop_run(job_file(tmp_path, classification)))
    assert code == ExitCode.INVALID_CONFIG
    assert "OutputOwned" in err and "FineTuneJob ml/t (uid 0b9c-uid)" in err and "pass --output" in err
    assert not (tmp_path / "out" / "runs").exists(), "nothing may be written into another job's output"


def test_a_pod_of_another_job_may_not_write_a_claimed_run(classification: dict[str, Any], tmp_path: Path) -> None:
    """The trainer in a pod: run 1 was claimed by job uid-1; a pod of uid-2 (a re-created job of the
    same name, an old pod still running on a lost node...) stops before writing anything."""
    out_uri = classification["spec"]["output"]["uri"]
    storage = Storage.for_uri(out_uri)
    first = JobIdentity(namespace="ml", name="t", uid="uid-1")
    claim_output(storage, out_uri, first, continue_lineage=False, by="operator")
    claim_run(storage, out_uri, first, 1, spec_hash="x", by="operator")
    storage.write_bytes(out_uri + Layout.status(1), b'{"run": 1, "phase": "training", "jobUid": "uid-1"}')
    config = tmp_path / "job.json"
    config.write_text(json.dumps(classification))
    termination = tmp_path / "termination-log"
    result = run_cli(
        ["--config", str(config), "--run", "1"],
        module="tuneloop_trainer",
        env={**os.environ, "TUNELOOP_JOB_UID": "uid-2", "TUNELOOP_TERMINATION_LOG": str(termination)},
    )
    assert result.returncode == ExitCode.INVALID_CONFIG, result.stderr[-2000:]
    summary = json.loads(termination.read_text())
    assert summary["reason"] == "OutputOwned"
    assert "FineTuneJob ml/t (uid uid-1)" in summary["message"]
    # The other job's heartbeat and run are untouched.
    assert json.loads(storage.read_bytes(out_uri + Layout.status(1)))["jobUid"] == "uid-1"
    assert not (tmp_path / "out" / "runs" / "1" / "model").exists()


def test_resume_only_from_checkpoints_of_the_same_spec(classification: dict[str, Any], tmp_path: Path) -> None:
    """`--run 1` again with the same spec resumes its checkpoint; with new hyperparameters it does
    not (the old optimizer and scheduler state would continue the old schedule) and says so."""
    classification["spec"]["output"]["checkpoint"] = {"everySteps": 1, "keep": 2}
    job = job_file(tmp_path, classification)
    code, _out, err = finish(tuneloop_run(job))
    assert code == 0, err[-2000:]
    checkpoints = tmp_path / "out" / "runs" / "1" / "checkpoints"
    assert any(checkpoints.iterdir())

    code, _out, err = finish(tuneloop_run(job, "--run", "1"))
    assert code == 0, err[-2000:]
    assert "resumed from the checkpoint at step" in err  # the progress log is on stderr

    classification["spec"]["hyperparameters"]["learningRate"] = 1e-3
    code, _out, err = finish(tuneloop_run(job_file(tmp_path, classification, "changed.yaml"), "--run", "1"))
    assert code == 0, err[-2000:]
    assert "resumed from" not in err
    assert "not resuming the checkpoint(s) at step" in err
    assert "the spec (hyperparameters, data, model...)" in err
    card = json.loads((tmp_path / "out" / "runs" / "1" / "model-card.json").read_text())
    assert card["hyperparameters"]["stepsTrained"] == card["hyperparameters"]["totalSteps"]
    assert card["hyperparameters"]["learningRate"] == 1e-3
