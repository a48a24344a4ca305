"""The Prometheus endpoint (scraped over HTTP) and the status.json heartbeat (on file://)."""

from __future__ import annotations

import json
import math
import sys
import threading
import types
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.request import ProxyHandler, build_opener

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from tuneloop.api.status import CheckpointRef
from tuneloop.contract import Heartbeat, Layout
from tuneloop.storage import FileStorage, StorageError
from tuneloop_trainer.progress import Sinks, StepReport
from tuneloop_trainer.telemetry import HeartbeatSink, PrometheusSink

pytestmark = pytest.mark.unit

LABELS = {"finetunejob": "sentiment", "run": "3"}


def report(step: int = 10, **overrides: Any) -> StepReport:
    values: dict[str, Any] = {
        "step": step,
        "total_steps": 40,
        "epoch": 0.25,
        "loss": 1.5,
        "learning_rate": 2e-4,
        "grad_norm": 0.75,
        "tokens": 1000,
        "samples": 8,
        "seconds": 0.5,
        "tokens_per_second": 2000.0,
        "eta_seconds": 15.4,
    }
    values.update(overrides)
    return StepReport(**values)


# --- Prometheus ------------------------------------------------------------------------------------


def scrape(sink: PrometheusSink) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` from the sink's HTTP endpoint."""
    opener = build_opener(ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{sink.port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **extra: str) -> float:
    return samples[(name, frozenset({**LABELS, **extra}.items()))]


@pytest.fixture
def prom() -> Iterator[PrometheusSink]:
    sink = PrometheusSink(port=0, job="sentiment", run=3, addr="127.0.0.1")
    yield sink
    sink.close()


def test_step_metrics_are_exported(prom: PrometheusSink) -> None:
    assert prom.port
    prom.step(report(step=1))
    prom.step(report(step=2, loss=1.25, grad_norm=None, tokens=500, samples=4, seconds=0.25))
    m = scrape(prom)
    assert value(m, "tuneloop_trainer_loss") == 1.25
    assert value(m, "tuneloop_trainer_learning_rate") == 2e-4
    assert value(m, "tuneloop_trainer_grad_norm") == 0.75  # None leaves the last value
    assert value(m, "tuneloop_trainer_step") == 2
    assert value(m, "tuneloop_trainer_total_steps") == 40
    assert value(m, "tuneloop_trainer_epoch") == 0.25
    assert value(m, "tuneloop_trainer_tokens_per_second") == 2000.0
    assert value(m, "tuneloop_trainer_samples_per_second") == 16.0
    assert value(m, "tuneloop_trainer_eta_seconds") == 15.4
    assert value(m, "tuneloop_trainer_tokens_total") == 1500
    assert value(m, "tuneloop_trainer_samples_total") == 12
    assert value(m, "tuneloop_trainer_steps_total") == 2
    assert value(m, "tuneloop_trainer_step_duration_seconds_count") == 2
    assert value(m, "tuneloop_trainer_step_duration_seconds_sum") == 0.75
    # No series carries a "job" label: Prometheus would rename it to exported_job.
    assert all("job" not in dict(labels) for _, labels in m)


def test_counters_start_at_zero(prom: PrometheusSink) -> None:
    m = scrape(prom)
    for name in ("tokens", "samples", "steps", "checkpoints", "checkpoint_bytes", "data_rows_read"):
        assert value(m, f"tuneloop_trainer_{name}_total") == 0


def test_phase_is_info_style(prom: PrometheusSink) -> None:
    prom.phase("validating")
    prom.phase("training")
    m = scrape(prom)
    assert value(m, "tuneloop_trainer_phase", phase="training") == 1
    assert value(m, "tuneloop_trainer_phase", phase="validating") == 0
    assert value(m, "tuneloop_trainer_phase", phase="evaluating") == 0
    prom.phase("compacting")  # a phase this module does not know of
    m = scrape(prom)
    assert value(m, "tuneloop_trainer_phase", phase="compacting") == 1
    assert value(m, "tuneloop_trainer_phase", phase="training") == 0
    assert sum(v for (n, _), v in m.items() if n == "tuneloop_trainer_phase") == 1


def test_evaluation_metrics_by_name_and_split(prom: PrometheusSink) -> None:
    prom.evaluation(10, "validation", {"loss": 0.5, "accuracy": 0.8})
    prom.evaluation(40, "test", {"accuracy": 0.9, "note": "x"})  # type: ignore[dict-item]
    m = scrape(prom)
    assert value(m, "tuneloop_trainer_eval_metric", metric="loss", split="validation") == 0.5
    assert value(m, "tuneloop_trainer_eval_metric", metric="accuracy", split="validation") == 0.8
    assert value(m, "tuneloop_trainer_eval_metric", metric="accuracy", split="test") == 0.9
    assert not any(dict(labels).get("metric") == "note" for _, labels in m)


def test_checkpoints_and_data_report(prom: PrometheusSink) -> None:
    prom.record_checkpoint(2.0, 3.0, 1_000_000)
    prom.record_checkpoint(4.0, None, 500)
    prom.record_data_report({"rowsRead": 405, "dropped": {"empty": 1, "duplicate_exact": 3, "bad": "x"}})
    m = scrape(prom)
    assert value(m, "tuneloop_trainer_checkpoints_total") == 2
    assert value(m, "tuneloop_trainer_checkpoint_bytes_total") == 1_000_500
    assert value(m, "tuneloop_trainer_checkpoint_save_seconds_count") == 2
    assert value(m, "tuneloop_trainer_checkpoint_save_seconds_sum") == 6.0
    assert value(m, "tuneloop_trainer_checkpoint_upload_seconds_count") == 1
    assert value(m, "tuneloop_trainer_checkpoint_upload_seconds_bucket", le="5.0") == 1
    assert value(m, "tuneloop_trainer_data_rows_read_total") == 405
    assert value(m, "tuneloop_trainer_data_rows_dropped_total", reason="empty") == 1
    assert value(m, "tuneloop_trainer_data_rows_dropped_total", reason="duplicate_exact") == 3
    assert not any(dict(labels).get("reason") == "bad" for _, labels in m)
    prom.record_data_report({"dropped": None})  # malformed or empty reports are not errors
    prom.record_data_report({"dropped": ["empty"]})


def test_gpu_memory_is_read_from_an_imported_torch(prom: PrometheusSink, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 2,
        memory_allocated=lambda i: 1000 * (i + 1),
        memory_reserved=lambda i: 4000 * (i + 1),
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    prom.step(report())
    m = scrape(prom)
    assert value(m, "tuneloop_trainer_gpu_memory_allocated_bytes", device="1") == 2000
    assert value(m, "tuneloop_trainer_gpu_memory_reserved_bytes", device="0") == 4000


def test_no_gpu_no_gpu_series(prom: PrometheusSink, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    prom.step(report())
    assert not any(n.startswith("tuneloop_trainer_gpu_") for n, _ in scrape(prom))


def test_two_sinks_in_one_process_do_not_collide() -> None:
    a = PrometheusSink(port=0, job="a", run=1, addr="127.0.0.1")
    b = PrometheusSink(port=0, job="b", run=2, addr="127.0.0.1")
    try:
        assert a.port != b.port
        a.step(report(loss=1.0))
        b.step(report(loss=2.0))
        ma, mb = scrape(a), scrape(b)
        losses_a = [v for (n, labels), v in ma.items() if n == "tuneloop_trainer_loss"]
        assert losses_a == [1.0]
        assert mb[("tuneloop_trainer_loss", frozenset({"finetunejob": "b", "run": "2"}.items()))] == 2
    finally:
        a.close()
        b.close()


def test_no_port_no_server_and_close_stops_it() -> None:
    quiet = PrometheusSink(port=None, job="j", run=1)
    assert quiet.port is None
    quiet.step(report())
    quiet.close()
    served = PrometheusSink(port=0, job="j", run=1, addr="127.0.0.1")
    port = served.port
    served.close()
    served.close()
    with pytest.raises(OSError):
        build_opener(ProxyHandler({})).open(f"http://127.0.0.1:{port}/metrics", timeout=2)


# --- Heartbeat -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def status_uri(tmp_path: Path, run: int = 3) -> str:
    return f"{tmp_path.as_uri()}/{Layout.status(run)}"


def read(tmp_path: Path, run: int = 3) -> Heartbeat:
    path = tmp_path / Layout.status(run)
    return Heartbeat.model_validate(json.loads(path.read_text()))


class CountingStorage(FileStorage):
    """FileStorage that counts writes and can be made to fail or block."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[dict[str, Any]] = []
        self.fail = False
        self.gate: threading.Event | None = None

    def write_json(self, uri: str, obj: Any) -> None:
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail:
            raise StorageError("boom", uri=uri)
        super().write_json(uri, obj)
        self.written.append(obj)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_throttled_to_min_interval(tmp_path: Path, clock: FakeClock) -> None:
    storage = CountingStorage()
    sink = HeartbeatSink(storage, status_uri(tmp_path), min_interval=5.0, clock=clock)
    sink.step(report(step=1))  # the first one is written at once
    assert sink.flush(5)
    for step in range(2, 6):
        clock.now += 1.0
        sink.step(report(step=step))
    assert sink.flush(5)
    assert [w["step"] for w in storage.written] == [1]  # 4 s later: nothing yet
    clock.now += 1.0
    sink.step(report(step=6))  # 5 s after the first write
    assert sink.flush(5)
    assert [w["step"] for w in storage.written] == [1, 6]
    sink.close()
    assert [w["step"] for w in storage.written] == [1, 6, 6]  # close always writes
    assert sink.writes == 3


def test_contents_and_wire_names(tmp_path: Path, clock: FakeClock) -> None:
    sink = HeartbeatSink(FileStorage(), status_uri(tmp_path), clock=clock)
    sink.phase("training")
    sink.step(report(step=10, eta_seconds=15.6))
    sink.set_checkpoint(10, "s3://b/out/runs/3/checkpoints/step-00000010")
    sink.message("saved")
    sink.close()
    raw = json.loads((tmp_path / Layout.status(3)).read_text())
    assert raw["run"] == 3
    assert raw["phase"] == "training"
    assert raw["totalSteps"] == 40
    assert raw["progressPercentage"] == 25
    assert raw["estimatedRemainingSeconds"] == 16
    assert raw["tokensPerSecond"] == 2000.0
    assert raw["lastCheckpoint"] == {"step": 10, "uri": "s3://b/out/runs/3/checkpoints/step-00000010"}
    assert raw["message"] == "saved"
    assert raw["lastUpdatedTime"].endswith("Z")
    when = datetime.fromisoformat(raw["lastUpdatedTime"])
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60


def test_phase_change_and_evaluation_force_a_write(tmp_path: Path, clock: FakeClock) -> None:
    storage = CountingStorage()
    sink = HeartbeatSink(storage, status_uri(tmp_path), min_interval=60.0, clock=clock)
    sink.phase("validating")
    sink.flush(5)
    sink.phase("validating")  # no change: throttled
    sink.flush(5)
    assert len(storage.written) == 1
    sink.phase("training")
    sink.flush(5)
    assert storage.written[-1]["phase"] == "training"
    sink.evaluation(10, "validation", {"loss": 0.5, "accuracy": 0.8})
    sink.flush(5)
    sink.evaluation(40, "test", {"accuracy": 0.9})
    sink.flush(5)
    sink.evaluation(40, "out-of-domain", {"accuracy": 0.4})
    sink.flush(5)
    assert len(storage.written) == 5
    last = read(tmp_path)
    assert last.metrics == {"loss": 0.5, "accuracy": 0.9}  # out-of-domain is kept apart
    assert last.splits["out-of-domain"] == {"accuracy": 0.4}
    assert last.splits["validation"] == {"loss": 0.5, "accuracy": 0.8}
    sink.close()


def test_writes_coalesce_behind_a_slow_store(tmp_path: Path, clock: FakeClock) -> None:
    storage = CountingStorage()
    storage.gate = threading.Event()  # the store hangs until released
    sink = HeartbeatSink(storage, status_uri(tmp_path), min_interval=0.0, clock=clock)
    sink.step(report(step=1))
    for step in range(2, 50):
        sink.step(report(step=step))  # returns at once although the store is stuck
    assert not sink.flush(0.05)
    storage.gate.set()
    assert sink.flush(5)
    steps = [w["step"] for w in storage.written]
    assert steps[-1] == 49
    assert len(steps) <= 3  # the one in flight, maybe one more, then only the latest
    sink.close()


def test_storage_errors_are_logged_not_raised(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    storage = CountingStorage()
    storage.fail = True
    sink = HeartbeatSink(storage, status_uri(tmp_path), clock=clock)
    sink.phase("training")  # raises nothing
    assert sink.flush(5)
    sink.evaluation(1, "validation", {"loss": 1.0})
    assert sink.flush(5)
    assert sink.failures == 2
    assert "heartbeat" in caplog.text
    storage.fail = False  # the store recovers: the next heartbeat goes through
    sink.close()
    assert sink.writes == 1
    assert read(tmp_path).metrics == {"loss": 1.0}


def test_non_finite_values_are_null(tmp_path: Path, clock: FakeClock) -> None:
    sink = HeartbeatSink(FileStorage(), status_uri(tmp_path), clock=clock)
    sink.step(report(loss=math.nan, tokens_per_second=math.inf, eta_seconds=math.inf))
    sink.evaluation(1, "validation", {"loss": math.inf, "accuracy": 0.5})
    sink.close()
    text = (tmp_path / Layout.status(3)).read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    raw = json.loads(text)
    assert raw["loss"] is None
    assert raw["tokensPerSecond"] is None
    assert raw["estimatedRemainingSeconds"] is None
    assert raw["metrics"] == {"loss": None, "accuracy": 0.5}
    assert read(tmp_path).progress().metrics == {"accuracy": 0.5}


def test_close_is_idempotent_and_later_reports_are_ignored(tmp_path: Path, clock: FakeClock) -> None:
    storage = CountingStorage()
    sink = HeartbeatSink(storage, status_uri(tmp_path), clock=clock)
    Sinks([sink]).close()
    sink.close()
    sink.step(report())
    sink.phase("late")
    assert len(storage.written) == 1


def test_run_comes_from_the_uri_or_the_caller(tmp_path: Path) -> None:
    assert HeartbeatSink(FileStorage(), status_uri(tmp_path, run=12))._state["run"] == 12
    with pytest.raises(ValueError, match="runs/<n>"):
        HeartbeatSink(FileStorage(), f"{tmp_path.as_uri()}/status.json")
    sink = HeartbeatSink(FileStorage(), f"{tmp_path.as_uri()}/status.json", run=2)
    sink.close()
    assert json.loads((tmp_path / "status.json").read_text())["run"] == 2


def test_heartbeat_model_round_trips() -> None:
    beat = Heartbeat(
        run=2,
        phase="training",
        step=5,
        total_steps=10,
        epoch=0.5,
        progress_percentage=50,
        estimated_remaining_seconds=30,
        loss=None,
        tokens_per_second=10.5,
        metrics={"accuracy": 0.9, "loss": None},
        splits={"test": {"accuracy": 0.9}},
        last_checkpoint=CheckpointRef(step=4, uri="file:///tmp/c"),
        last_updated_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        message="hi",
    )
    wire = json.loads(json.dumps(beat.model_dump(mode="json", by_alias=True)))
    assert {"totalSteps", "progressPercentage", "estimatedRemainingSeconds", "lastCheckpoint"} <= wire.keys()
    assert Heartbeat.model_validate(wire) == beat
    # A newer trainer's extra fields are ignored; invalid values are refused.
    assert Heartbeat.model_validate({**wire, "gpuTemperature": 70}) == beat
    with pytest.raises(ValidationError):
        Heartbeat.model_validate({**wire, "progressPercentage": 101})
    progress = beat.progress()
    assert progress.step == 5
    assert progress.metrics == {"accuracy": 0.9}
