"""A kill never loses more than one checkpoint interval, with uploads still in the background.

The recipe runs in a thread with every checkpoint upload held at the gate until the test lets it
through: the loop must stop at ``D + everySteps`` (D: the newest checkpoint whose upload finished)
and say what it waits for, then go on once the upload is released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.trainer_jobs import manifest, rows_for, run_recipe, write_jsonl
from tuneloop_trainer.checkpoints import CheckpointManager
from tuneloop_trainer.progress import StepReport

pytestmark = pytest.mark.integration

EVERY = 4


class Watch:
    """A sink that keeps steps and messages, and lets the test await what it reports."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.messages: list[str] = []
        self.changed = threading.Condition()

    def phase(self, name: str) -> None: ...
    def evaluation(self, *a: Any) -> None: ...
    def close(self) -> None: ...

    def step(self, report: StepReport) -> None:
        with self.changed:
            self.steps.append(report.step)
            self.changed.notify_all()

    def message(self, text: str) -> None:
        with self.changed:
            self.messages.append(text)
            self.changed.notify_all()

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 120) -> None:
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise AssertionError(f"no {what} within {timeout} s; steps {self.steps}, messages {self.messages}")


class HeldUploads:
    """Holds every checkpoint upload until :meth:`release` lets that step's through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: list[int] = []
        self.gates: dict[int, threading.Event] = {}
        self.open = False
        self.lock = threading.Lock()
        upload = CheckpointManager._upload

        def held(manager: CheckpointManager, step: int, *args: Any) -> None:
            with self.lock:
                self.started.append(step)
                gate = self.gates.setdefault(step, threading.Event())
                if self.open:
                    gate.set()
            gate.wait(120)
            upload(manager, step, *args)

        monkeypatch.setattr(CheckpointManager, "_upload", held)

    def release(self, step: int | None = None) -> None:
        """Let ``step``'s upload through (``None``: every upload, now and later)."""
        with self.lock:
            if step is None:
                self.open = True
            for s, gate in self.gates.items():
                if step is None or s == step:
                    gate.set()
            if step is not None:
                self.gates.setdefault(step, threading.Event()).set()


def full_fine_tune(tiny_model_dir: Any, tmp_path: Path, out: Path) -> dict[str, Any]:
    """A full fine-tune of the tiny GPT-2 for 2 epochs, a checkpoint every ``EVERY`` steps."""
    data = write_jsonl(tmp_path / "data.jsonl", rows_for("causal-lm", "text", n=80))
    m = manifest(
        "causal-lm",
        tiny_model_dir("gpt2"),
        data,
        out,
        method={"type": "full"},
        hyperparameters={"epochs": 2, "batchSize": 8},
    )
    m["spec"]["output"]["checkpoint"] = {"everySteps": EVERY, "keep": 2}
    return m


def waiting_for(step: int) -> Callable[[str], bool]:
    return lambda text: f"waiting for the checkpoint at step {step} to finish uploading" in text


def test_the_loop_waits_at_one_interval_past_the_durable_checkpoint(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    m = full_fine_tune(tiny_model_dir, tmp_path, out)
    uploads = HeldUploads(monkeypatch)
    watch = Watch()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = run_recipe(m, tmp_path, watch)
        except BaseException as exc:
            outcome["error"] = exc

    trainer = threading.Thread(target=run, name="recipe", daemon=True)
    trainer.start()
    try:
        # D = 0: the first snapshot (step 4, no upload timed yet, so not early) is held; the loop
        # may not start step 5 while it uploads.
        watch.wait_for("wait at step 4", lambda: any(map(waiting_for(EVERY), watch.messages)))
        assert watch.steps[-1] == EVERY, watch.steps
        assert uploads.started == [EVERY]
        uploads.release(EVERY)

        # D = 4 once that upload is done. The next snapshot comes early by that upload's duration
        # (over a second, many steps), never before D + 1; held too, it stops the loop at D + 4.
        watch.wait_for("a second upload", lambda: len(uploads.started) == 2)
        second = uploads.started[1]
        assert EVERY < second <= 2 * EVERY, uploads.started
        watch.wait_for(f"wait at step {2 * EVERY}", lambda: any(map(waiting_for(second), watch.messages)))
        assert watch.steps[-1] == 2 * EVERY, (second, watch.steps)
        uploads.release()
        trainer.join(300)
    finally:
        uploads.release()
        trainer.join(300)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert watch.steps == list(range(1, result.steps + 1))  # it went on to the end, every step once
    assert result.steps > 2 * EVERY + 1
    waits = [t for t in watch.messages if "to finish uploading" in t]
    assert waits == [
        f"   waiting for the checkpoint at step {s} to finish uploading "
        f"(bounds the work a kill can lose to everySteps: {EVERY} steps)"
        for s in (EVERY, second)
    ]


class CrashAt(Watch):
    """A watch that crashes the run (like a killed attempt) once ``step`` is done."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.at = step

    def step(self, report: StepReport) -> None:
        super().step(report)
        if report.step == self.at:
            raise RuntimeError("simulated crash")


def test_a_resumed_attempt_snapshots_early_by_the_upload_time_its_checkpoint_recorded(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without it, a resumed attempt's first checkpoint would wait for a whole untimed upload."""
    import json

    out = tmp_path / "out"
    m = full_fine_tune(tiny_model_dir, tmp_path, out)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(m, tmp_path / "w1", CrashAt(EVERY + 1), work_dir=tmp_path / "w1")
    manifest_path = out / f"runs/1/checkpoints/step-{EVERY:08d}/manifest.json"
    recorded = json.loads(manifest_path.read_text())
    assert "uploadSeconds" in recorded
    # As if that upload had taken far longer than a step: the next attempt must snapshot early.
    recorded["uploadSeconds"] = 600.0
    manifest_path.write_text(json.dumps(recorded))

    uploads = HeldUploads(monkeypatch)
    uploads.release()  # nothing held: only which steps are snapshotted matters here
    watch = Watch()
    result = run_recipe(m, tmp_path / "w2", watch, work_dir=tmp_path / "w2")
    assert watch.steps[0] == EVERY + 1  # resumed from step 4
    # D = 4 and the recorded upload spans many steps: the lead is capped at everySteps - 1, so the
    # first snapshot is at D + 1 rather than on the next multiple (8).
    assert uploads.started[0] == EVERY + 1, uploads.started
    assert result.steps > 2 * EVERY
