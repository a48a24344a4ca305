"""The per-job series (``tuneloop_operator_job_*``) and ``runs_finished``, as a scrape of the
operator's ``/metrics`` shows them, for jobs driven through the planner (planner_helpers.World)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.contract import Heartbeat
from tuneloop_operator.metrics import OperatorMetrics
from tuneloop_operator.observe import Observer
from tuneloop_operator.runtime import Runtime

from .planner_helpers import T0, UID, World, job_manifest

pytestmark = pytest.mark.unit

NS, NAME = "default", "job"
JOB = {"namespace": NS, "finetunejob": NAME}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def scrape(metrics: OperatorMetrics) -> Samples:
    """Every sample of ``/metrics`` as Prometheus reads the text."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset({**JOB, **labels}.items())))


def names_for_job(samples: Samples) -> set[str]:
    return {name for name, labels in samples if ("finetunejob", NAME) in labels}


def summary(run: int, f1: float, *, passed: bool = True) -> str:
    return json.dumps(
        {
            "result": "Succeeded" if passed else "GateFailed",
            "metrics": {"f1": f1},
            "modelUri": f"s3://model-bucket/out/runs/{run}/model/",
            "dataFingerprint": f"data-{run}",
            "gates": [{"metric": "f1", "passed": passed, "value": f1}],
        }
    )


def finish_run(w: World, run: int, f1: float, *, passed: bool = True) -> None:
    pod = f"job-r{run}-a1-n0"
    w.start(pod)
    w.reconcile()
    if passed:
        w.succeed(pod, summary(run, f1))
    else:
        w.terminate(pod, 13, summary(run, f1, passed=False))
    w.reconcile()


def gated(**promotion: Any) -> dict[str, Any]:
    return job_manifest(promotion={"gates": [{"metric": "f1", "minImprovement": 0.0}], **promotion})


def beat(step: int, *, at: datetime, total: int = 20, phase: str = "training") -> Heartbeat:
    return Heartbeat(run=1, phase=phase, step=step, total_steps=total, last_updated_time=at, job_uid=UID)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def metrics(clock: Clock) -> OperatorMetrics:
    return OperatorMetrics(clock=clock)


def runtime(metrics: OperatorMetrics) -> Runtime:
    """A Runtime whose accounting is under test (it makes no API call and reads no storage)."""
    return Runtime(
        settings=None,  # type: ignore[arg-type]
        kube=None,  # type: ignore[arg-type]
        metrics=metrics,
        heartbeats=None,  # type: ignore[arg-type]
        outputs=None,  # type: ignore[arg-type]
        observer=Observer(None, metrics),  # type: ignore[arg-type]
    )


def test_phase_is_one_for_the_current_phase_and_zero_for_the_others(metrics: OperatorMetrics) -> None:
    w = World(job_manifest())
    w.reconcile()
    metrics.job_series.set(NS, NAME, w.status)
    samples = scrape(metrics)
    phases = {p: value(samples, "tuneloop_operator_job_phase", phase=p) for p in ("Pending", "Running", "Failed")}
    assert phases == {"Pending": 1.0, "Running": 0.0, "Failed": 0.0}
    assert value(samples, "tuneloop_operator_job_current_run") == 1.0
    assert value(samples, "tuneloop_operator_job_promoted_run") is None  # nothing promoted yet
    # pods are not running yet: no trainer is expected to write heartbeats
    assert value(samples, "tuneloop_operator_job_heartbeat_age_seconds") is None


def test_heartbeat_age_and_progress_while_training(metrics: OperatorMetrics, clock: Clock) -> None:
    w = World(job_manifest())
    w.reconcile()
    w.start()
    w.reconcile()
    w.heartbeat = beat(5, at=T0 + timedelta(seconds=30))
    w.advance(40)
    w.reconcile()
    metrics.job_series.set(NS, NAME, w.status)
    clock.now = T0 + timedelta(seconds=30 + 600)
    samples = scrape(metrics)
    assert value(samples, "tuneloop_operator_job_phase", phase="Running") == 1.0
    assert value(samples, "tuneloop_operator_job_heartbeat_age_seconds") == 600.0
    assert value(samples, "tuneloop_operator_job_progress_ratio") == 0.25
    clock.now += timedelta(seconds=60)  # the age grows between reconciles, on every scrape
    assert value(scrape(metrics), "tuneloop_operator_job_heartbeat_age_seconds") == 660.0


def test_a_retry_restarts_the_heartbeat_clock(metrics: OperatorMetrics, clock: Clock) -> None:
    w = World(job_manifest(backoffLimit=3))
    w.reconcile()
    w.start()
    w.reconcile()
    w.heartbeat = beat(5, at=T0)
    w.reconcile()
    w.fail("job-r1-a1-n0", 1)
    p = w.reconcile()
    metrics.job_series.set(NS, NAME, w.status)
    # backing off: no pods, no trainer expected
    assert value(scrape(metrics), "tuneloop_operator_job_heartbeat_age_seconds") is None
    w.advance(3600)  # a long backoff; the old heartbeat is an hour old
    assert p.requeue_after is not None
    w.reconcile()  # the second attempt's pod is created now
    w.start()
    w.reconcile()
    metrics.job_series.set(NS, NAME, w.status)
    clock.now = w.now + timedelta(seconds=20)
    age = value(scrape(metrics), "tuneloop_operator_job_heartbeat_age_seconds")
    assert age is not None and age < 60, age


def test_a_failed_run_shows_its_condition_and_reason(metrics: OperatorMetrics) -> None:
    w = World(job_manifest(backoffLimit=0))
    w.reconcile()
    w.start()
    w.reconcile()
    w.fail("job-r1-a1-n0", 1)
    w.reconcile()
    assert w.phase == "Failed"
    metrics.job_series.set(NS, NAME, w.status)
    samples = scrape(metrics)
    assert value(samples, "tuneloop_operator_job_phase", phase="Failed") == 1.0
    assert (
        value(
            samples, "tuneloop_operator_job_condition", condition="Failed", status="True", reason="BackoffLimitExceeded"
        )
        == 1.0
    )
    assert value(samples, "tuneloop_operator_job_heartbeat_age_seconds") is None
    assert value(samples, "tuneloop_operator_job_progress_ratio") is None


def test_promoted_run_and_a_candidate_that_waits_for_approval(metrics: OperatorMetrics, clock: Clock) -> None:
    w = World(gated(requireApproval=True))
    w.reconcile()
    finish_run(w, 1, 0.9)
    metrics.job_series.set(NS, NAME, w.status)
    assert w.status.awaiting_approval is not None and w.status.awaiting_approval.since is not None
    clock.now = w.status.awaiting_approval.since + timedelta(hours=5)
    samples = scrape(metrics)
    assert value(samples, "tuneloop_operator_job_awaiting_approval_seconds") == 5 * 3600
    assert value(samples, "tuneloop_operator_job_promoted_run") is None
    promoted = ("tuneloop_operator_job_condition", "Promoted", "Unknown", "AwaitingApproval")
    assert value(samples, promoted[0], condition=promoted[1], status=promoted[2], reason=promoted[3]) == 1.0

    w.body["metadata"].setdefault("annotations", {})["tuneloop.dev/approve"] = "1"
    w.reconcile()
    metrics.job_series.set(NS, NAME, w.status)
    samples = scrape(metrics)
    assert value(samples, "tuneloop_operator_job_promoted_run") == 1.0
    assert value(samples, "tuneloop_operator_job_awaiting_approval_seconds") is None


def test_a_candidate_that_fails_its_gates_is_not_promoted(metrics: OperatorMetrics) -> None:
    w = World(gated())
    w.reconcile()
    finish_run(w, 1, 0.9)
    w.body["metadata"].setdefault("annotations", {})["tuneloop.dev/retrain"] = "again"
    w.reconcile()
    finish_run(w, 2, 0.7, passed=False)
    metrics.job_series.set(NS, NAME, w.status)
    samples = scrape(metrics)
    assert value(samples, "tuneloop_operator_job_promoted_run") == 1.0  # the old model stays
    assert value(samples, "tuneloop_operator_job_current_run") == 2.0
    not_promoted = {
        dict(labels)["reason"]
        for name, labels in samples
        if name == "tuneloop_operator_job_condition" and ("condition", "Promoted") in labels
    }
    assert not_promoted == {"NotPromoted"}
    assert value(samples, "tuneloop_operator_job_condition", condition="Failed", status="True", reason="GateFailed")


def test_runs_finished_by_trigger_and_result_and_suppressed_triggers(metrics: OperatorMetrics) -> None:
    rt = runtime(metrics)
    key = (NS, NAME)
    w = World(gated())
    rt._account(key, w.reconcile())
    pod = "job-r1-a1-n0"
    w.start(pod)
    rt._account(key, w.reconcile())
    # two manual requests while run 1 is active: the first waits, the second joins it
    for request in ("first", "second"):
        w.body["metadata"].setdefault("annotations", {})["tuneloop.dev/retrain"] = request
        rt._account(key, w.reconcile())
    w.succeed(pod, summary(1, 0.9))
    rt._account(key, w.reconcile())
    p = w.reconcile()  # run 2, the waiting manual request, starts
    rt._account(key, p)
    assert p.started_run == 2
    w.start("job-r2-a1-n0")
    w.terminate("job-r2-a1-n0", 13, summary(2, 0.7, passed=False))
    rt._account(key, w.reconcile())

    samples = scrape(metrics)
    finished = {
        (dict(labels)["trigger"], dict(labels)["result"]): v
        for (name, labels), v in samples.items()
        if name == "tuneloop_operator_runs_finished_total"
    }
    assert finished == {("Created", "Succeeded"): 1.0, ("Manual", "GateFailed"): 1.0}
    suppressed = value(samples, "tuneloop_operator_job_triggers_suppressed_total", trigger="Manual")
    assert suppressed == 2.0
    # the existing counters still count
    assert samples[("tuneloop_operator_runs_succeeded_total", frozenset())] == 1.0
    assert samples[("tuneloop_operator_runs_failed_total", frozenset({("reason", "GateFailed")}))] == 1.0


def test_a_deleted_job_leaves_no_series(metrics: OperatorMetrics) -> None:
    rt = runtime(metrics)
    key = (NS, NAME)
    w = World(job_manifest())
    rt._account(key, w.reconcile())
    assert "tuneloop_operator_job_phase" in names_for_job(scrape(metrics))
    rt.forget(key)
    assert names_for_job(scrape(metrics)) == set()


def test_every_job_series_is_declared_with_help_even_without_jobs(metrics: OperatorMetrics) -> None:
    text = generate_latest(metrics.registry).decode()
    for name in (
        "phase",
        "condition",
        "current_run",
        "promoted_run",
        "progress_ratio",
        "heartbeat_age_seconds",
        "awaiting_approval_seconds",
    ):
        assert f"# TYPE tuneloop_operator_job_{name} gauge" in text
    assert "# TYPE tuneloop_operator_job_triggers_suppressed_total counter" in text
    assert "# TYPE tuneloop_operator_runs_finished_total counter" in text
