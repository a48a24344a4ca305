"""Preemption-safe resume: train, interrupt (crash, SIGTERM, SIGKILL), resume, compare."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.trainer_jobs import heartbeat_step, job_file, manifest, rows_for, run_recipe, wait_for, write_jsonl
from tests.manifests import ROOT
from tuneloop_trainer.progress import StepReport

pytestmark = pytest.mark.integration


def job(tiny_model_dir, tmp_path: Path, out: Path) -> dict[str, Any]:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        write_jsonl(data, rows_for("causal-lm", "text", n=96))
    m = manifest(
        "causal-lm",
        tiny_model_dir("gpt2"),
        data,
        out,
        method={"type": "full"},
        hyperparameters={"epochs": 3, "batchSize": 8},
    )
    m["spec"]["output"]["checkpoint"] = {"everySteps": 2, "keep": 2}
    return m


class CrashAt:
    """A sink that kills the run (an exception, like a crash) when a step is reached."""

    def __init__(self, step: int | None) -> None:
        self.at = step
        self.steps: list[int] = []

    def phase(self, name: str) -> None: ...
    def evaluation(self, *a: Any) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...

    def step(self, report: StepReport) -> None:
        self.steps.append(report.step)
        if report.step == self.at:
            raise RuntimeError("simulated crash")


def run_with(m: dict[str, Any], work: Path, sink: CrashAt):
    return run_recipe(m, work, sink, work_dir=work)


def test_crash_then_resume_matches_the_uninterrupted_run(tiny_model_dir, tmp_path) -> None:
    reference = run_recipe(job(tiny_model_dir, tmp_path, tmp_path / "ref"), tmp_path / "w0")

    m = job(tiny_model_dir, tmp_path, tmp_path / "out")
    first = CrashAt(7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_with(m, tmp_path / "w1", first)
    second = CrashAt(None)
    resumed = run_with(m, tmp_path / "w2", second)

    assert second.steps[0] == 7  # resumed after the checkpoint at step 6: step 7 is trained again, nothing earlier
    assert resumed.steps == reference.steps
    assert resumed.metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], rel=1e-5)
    ref_history = json.loads((tmp_path / "ref/runs/1/report/history.json").read_text())
    new_history = json.loads((tmp_path / "out/runs/1/report/history.json").read_text())
    ref_losses = [r["loss"] for r in ref_history["train"]]
    new_losses = [r["loss"] for r in new_history["train"]]
    assert [r["step"] for r in new_history["train"]] == list(range(1, reference.steps + 1))
    assert new_losses == pytest.approx(ref_losses, rel=1e-5)  # the loss curve continues where it stopped


def start(job_path: Path, delay: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TUNELOOP_FAULT_STEP_DELAY": delay}
    return subprocess.Popen(
        [sys.executable, "-m", "tuneloop_trainer", "run", str(job_path), "--run", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def manifests(out: Path) -> list[Path]:
    return sorted((out / "runs" / "1" / "checkpoints").glob("step-*/manifest.json"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_process_resumes_to_the_same_end(tiny_model_dir, tmp_path, sig) -> None:
    out = tmp_path / "out"
    m = job(tiny_model_dir, tmp_path, out)
    job_path = job_file(tmp_path, m)
    proc = start(job_path, "0.3")
    try:
        wait_for(lambda: manifests(out) and heartbeat_step(out) >= 5, timeout=120)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, stderr[-2000:]
        assert "checkpoint saved" in stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    saved = [int(p.parent.name.removeprefix("step-")) for p in manifests(out)]
    assert saved, "no complete checkpoint"

    rerun = start(job_path, "0")
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    assert "resumed from the checkpoint at step" in stdout + stderr
    card = json.loads((out / "runs/1/model-card.json").read_text())
    assert card["hyperparameters"]["stepsTrained"] == card["hyperparameters"]["totalSteps"]
    reference = run_recipe(job(tiny_model_dir, tmp_path, tmp_path / "ref"), tmp_path / "w-ref")
    assert card["hyperparameters"]["stepsTrained"] == reference.steps
    assert card["metrics"]["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], rel=1e-3)
