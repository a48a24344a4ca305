"""The trainer's side of the S3 writer lease (tuneloop/lease.py): a writer taken over writes no
more heartbeats, the attempt comes from the operator's ``TUNELOOP_ATTEMPT``, and a commit check
that fails ends the run with exit 10 ``OutputOwned``. End to end against moto:
tests/reliability/test_bad_inputs.py ("two writers of one run in an S3 output")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.contract import ExitCode, Layout
from tuneloop.ownership import OutputOwnedError
from tuneloop.storage import FileStorage
from tuneloop_trainer.errors import failure_of
from tuneloop_trainer.main import _attempt, writer_check
from tuneloop_trainer.progress import StepReport
from tuneloop_trainer.telemetry import HeartbeatSink

pytestmark = pytest.mark.unit


def step(n: int) -> StepReport:
    return StepReport(
        step=n,
        total_steps=10,
        epoch=0.1 * n,
        loss=1.0,
        learning_rate=1e-3,
        grad_norm=None,
        tokens=10,
        samples=2,
        seconds=0.1,
        tokens_per_second=100.0,
        eta_seconds=1.0,
    )


def test_a_writer_taken_over_writes_no_more_heartbeats_not_even_its_end(tmp_path: Path) -> None:
    uri = f"{tmp_path.as_uri()}/{Layout.status(1)}"
    still_mine = [True]
    sink = HeartbeatSink(FileStorage(), uri, min_interval=0.0, writing=lambda: still_mine[0])
    sink.step(step(1))
    assert sink.flush(5)
    written = (tmp_path / Layout.status(1)).read_bytes()
    assert json.loads(written)["step"] == 1
    still_mine[0] = False  # the lease was taken over: the new writer's heartbeat is in that place
    sink.step(step(2))
    assert sink.flush(5)
    sink.end("failed", "taken over")
    assert (tmp_path / Layout.status(1)).read_bytes() == written
    assert sink.failures == 0  # not a storage failure


@pytest.mark.parametrize(("value", "attempt"), [("", 0), ("3", 3), ("-1", 0), ("two", 0)])
def test_the_attempt_comes_from_the_operator(monkeypatch: pytest.MonkeyPatch, value: str, attempt: int) -> None:
    monkeypatch.setenv("TUNELOOP_ATTEMPT", value)
    assert _attempt() == attempt


def test_a_failed_commit_check_ends_the_run_with_exit_10_output_owned() -> None:
    class Lost:
        def check(self) -> None:
            raise OutputOwnedError("run 1 under s3://b/out/ is no longer this process's to write (...)")

    with pytest.raises(Exception) as raised:
        writer_check(Lost())()
    failure = failure_of(raised.value)
    assert (failure.exit_code, failure.reason) == (int(ExitCode.INVALID_CONFIG), "OutputOwned")
    assert failure.message.startswith("run 1 under s3://b/out/ is no longer this process's to write")
