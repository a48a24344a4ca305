"""The loop through the planner: triggered runs, promotion, approval, pin, Replace (issue #10).

A simulated cluster (planner_helpers.World) with a simulated output, dataset and Prometheus.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tuneloop.api import ConditionType, Reason
from tuneloop_operator.promotion import Candidate
from tuneloop_operator.triggers import DriftObservation

from .planner_helpers import World, job_manifest

pytestmark = pytest.mark.unit


def summary(run: int, f1: float, *, passed: bool = True, promoted_run: int | None = None, **extra: Any) -> str:
    body: dict[str, Any] = {
        "result": "Succeeded" if passed else "GateFailed",
        "metrics": {"f1": f1},
        "modelUri": f"s3://model-bucket/out/runs/{run}/model/",
        "dataFingerprint": f"data-{run}",
        "gates": [{"metric": "f1", "passed": passed, "value": f1}],
        **extra,
    }
    if promoted_run is not None:
        body["promotedRun"] = promoted_run
        body["promotedMetrics"] = {"f1": 0.8}
    return json.dumps(body)


def finish_run(w: World, run: int, f1: float, *, passed: bool = True, promoted_run: int | None = None) -> None:
    pod = f"job-r{run}-a1-n0"
    w.start(pod)
    w.reconcile()
    if passed:
        w.succeed(pod, summary(run, f1, promoted_run=promoted_run))
    else:
        w.terminate(pod, 13, summary(run, f1, passed=False, promoted_run=promoted_run))
    w.reconcile()


def gated(**promotion: Any) -> dict[str, Any]:
    return job_manifest(promotion={"gates": [{"metric": "f1", "minImprovement": 0.0}], **promotion})


# --- promotion --------------------------------------------------------------------------------------


def test_a_passing_run_is_promoted_and_a_failing_gate_keeps_the_old_model() -> None:
    w = World(gated())
    w.reconcile()
    finish_run(w, 1, 0.85)
    assert w.status.promoted is not None and w.status.promoted.run == 1 and w.status.promoted.by == "gates"
    assert [p.run for p in w.pointers] == [1] and w.pointers[0].metrics == {"f1": 0.85}
    assert w.condition(ConditionType.READY).status == "True"
    assert w.condition(ConditionType.PROMOTED).status == "True"

    w.set_spec(hyperparameters={"epochs": 9})
    w.reconcile()
    finish_run(w, 2, 0.80, passed=False, promoted_run=1)
    assert w.status.promoted is not None and w.status.promoted.run == 1, "the old model stays promoted"
    assert [p.run for p in w.pointers] == [1]
    # The old model is still available, but the run failed its gates: a person should look.
    assert w.condition(ConditionType.READY).status == "False"
    assert w.condition(ConditionType.STALLED).reason == Reason.GATE_FAILED
    assert w.condition(ConditionType.FAILED).reason == Reason.GATE_FAILED
    promoted = w.condition(ConditionType.PROMOTED)
    assert promoted.status == "False" and "gates failed: f1=0.8" in promoted.message
    assert "run 1 stays promoted" in promoted.message
    record = w.status.runs[-1]
    assert record.promotion is not None and record.promotion.decision == "NotPromoted"
    assert record.promoted_metrics == {"f1": 0.8}
    assert w.phase == "Failed"
    events = [e for e in w.index if e["event"] == "promotion"]
    assert [(e["run"], e["decision"]) for e in events] == [(1, "Promoted"), (2, "NotPromoted")]


def test_a_candidate_compared_with_a_model_no_longer_promoted_is_not_promoted() -> None:
    w = World(gated())
    w.reconcile()
    finish_run(w, 1, 0.85)
    w.set_spec(hyperparameters={"epochs": 9})
    w.reconcile()
    finish_run(w, 2, 0.95, promoted_run=7)  # compared with run 7, but run 1 is promoted
    assert w.status.promoted is not None and w.status.promoted.run == 1
    assert "compared it with run 7, but run 1 was promoted since" in w.condition(ConditionType.PROMOTED).message


def test_approval_promotes_the_waiting_run_and_a_stale_value_is_refused_once() -> None:
    w = World(gated(requireApproval=True))
    w.reconcile()
    finish_run(w, 1, 0.9)
    assert w.status.promoted is None and w.status.awaiting_approval is not None
    assert w.status.awaiting_approval.run == 1
    assert w.condition(ConditionType.PROMOTED).status == "Unknown"
    assert w.condition(ConditionType.READY).reason == Reason.AWAITING_APPROVAL
    assert any(e.reason == Reason.AWAITING_APPROVAL and "tuneloop.dev/approve=1" in e.message for e in w.events)
    assert w.pointers == []

    w.body["metadata"].setdefault("annotations", {})["tuneloop.dev/approve"] = "5"
    p = w.reconcile()
    assert [(e.reason, e.message) for e in p.events] == [
        (Reason.DECISION_REFUSED, "tuneloop.dev/approve=5 refused: run 1 awaits approval")
    ]
    assert w.reconcile().events == []  # refused once
    w.body["metadata"]["annotations"]["tuneloop.dev/approve"] = "1"
    p = w.reconcile()
    assert w.status.promoted is not None and w.status.promoted.run == 1
    assert w.status.promoted.by == "annotation tuneloop.dev/approve=1"
    assert w.status.awaiting_approval is None and [p.run for p in w.pointers] == [1]
    assert w.condition(ConditionType.READY).status == "True"
    assert w.status.runs[-1].promotion is not None and w.status.runs[-1].promotion.decision == "Promoted"
    assert w.reconcile().events == []  # the annotation stays; it is handled once


def test_rejection_closes_the_waiting_run() -> None:
    w = World(gated(requireApproval=True))
    w.reconcile()
    finish_run(w, 1, 0.9)
    w.body["metadata"].setdefault("annotations", {})["tuneloop.dev/reject"] = "1"
    p = w.reconcile()
    assert [e.reason for e in p.events] == [Reason.REJECTED]
    assert w.status.awaiting_approval is None and w.status.promoted is None
    assert w.condition(ConditionType.PROMOTED).reason == Reason.REJECTED
    assert w.status.runs[-1].promotion is not None and w.status.runs[-1].promotion.decision == "Rejected"


def test_pin_promotes_an_earlier_run_and_holds_it() -> None:
    w = World(gated())
    w.reconcile()
    finish_run(w, 1, 0.85)
    w.set_spec(hyperparameters={"epochs": 9})
    w.reconcile()
    finish_run(w, 2, 0.90, promoted_run=1)
    assert w.status.promoted is not None and w.status.promoted.run == 2
    w.pin_targets[1] = Candidate(
        run=1,
        trigger="Manual",
        result="Succeeded",
        reason="Pinned",
        message="",
        model_uri="s3://b/runs/1/model/",
        metrics={"f1": 0.85},
    )
    w.edit_spec(lambda spec: spec["promotion"].update(pin=1))
    p = w.reconcile()
    assert w.status.promoted is not None and w.status.promoted.run == 1
    assert w.status.promoted.by == "spec.promotion.pin=1" and w.pointers[-1].run == 1
    assert p.create == [], "pinning is not a spec change that trains"
    # A new passing run is not promoted while the pin holds.
    w.set_spec(hyperparameters={"epochs": 10})
    w.reconcile()
    finish_run(w, 3, 0.99, promoted_run=1)
    assert w.status.promoted.run == 1
    assert "spec.promotion.pin=1 holds the promoted model" in w.condition(ConditionType.PROMOTED).message


def test_pin_to_a_run_without_a_model_says_so_once() -> None:
    w = World(gated())
    w.reconcile()
    finish_run(w, 1, 0.85)
    w.edit_spec(lambda spec: spec["promotion"].update(pin=9))
    p = w.reconcile()
    assert w.status.promoted is not None and w.status.promoted.run == 1
    assert w.condition(ConditionType.PROMOTED).reason == Reason.PIN_INVALID
    assert [e.reason for e in p.events] == [Reason.PIN_INVALID]
    assert w.reconcile().events == []


# --- triggered runs ---------------------------------------------------------------------------------


def watched_job(**retrain: Any) -> dict[str, Any]:
    return job_manifest(
        retrain={"onNewData": {"minNewSamples": 500, "pollInterval": "5m", "settlePeriod": "2m"}, **retrain}
    )


def test_new_data_starts_a_run_that_records_its_listing() -> None:
    w = World(watched_job())
    w.reconcile()
    assert w.listings == {1: "listing-0"}, "run 1 records the listing it starts with"
    finish_run(w, 1, 0.9)
    state = w.status.triggers
    assert state is not None and state.new_data is not None and state.new_data.watermark == "listing-0"

    w.dataset_fingerprint, w.new_rows = "listing-1", 1240
    w.advance(330)  # past the next poll: the change is seen, then it must settle
    w.reconcile()
    assert w.status.current_run is not None and w.status.current_run.number == 1
    w.advance(150)
    p = w.reconcile()
    assert p.started_run == 2
    current = w.status.current_run
    assert current is not None and current.trigger == "NewData"
    assert current.trigger_detail == "1,240 new rows in 1 new or changed object(s) since run 1"
    assert w.listings[2] == "listing-1"
    assert ("NewData", "fired") in p.trigger_counts
    assert any(e.reason == Reason.TRIGGERED for e in p.events)


def test_a_restarted_operator_or_a_lost_status_never_triggers_twice_for_the_same_data() -> None:
    w = World(watched_job())
    w.reconcile()
    finish_run(w, 1, 0.9)
    # The trigger state is lost (status wiped): the watermark is read back from run 1's listing.
    assert w.body["status"].pop("triggers", None) is not None
    w.recorded_watermark = ("listing-0", 1)
    for _ in range(3):
        w.advance(400)
        p = w.reconcile()
        assert p.started_run is None
    assert "watermark" in w.requests


def test_drift_starts_a_run_while_idle_and_waits_while_a_run_is_active() -> None:
    prom = {"url": "http://prom:9090", "query": "score", "threshold": 0.2, "for": "1m", "pollInterval": "1m"}
    w = World(job_manifest(retrain={"onDrift": {"prometheus": prom}, "cooldown": "1m"}))
    w.drift = DriftObservation(value=0.5)
    w.reconcile()
    w.start("job-r1-a1-n0")
    for _ in range(3):
        w.advance(65)
        w.reconcile()
    pending = w.status.triggers.pending if w.status.triggers else []
    assert [p.trigger for p in pending] == ["Drift"], "waits for the active run"
    assert any(e.reason == Reason.TRIGGER_SUPPRESSED for e in w.events)
    w.succeed("job-r1-a1-n0", summary(1, 0.9))
    w.reconcile()
    w.advance(1)
    p = w.reconcile()
    assert p.started_run == 2 and w.status.current_run is not None and w.status.current_run.trigger == "Drift"


def test_a_failing_drift_query_is_a_condition_never_a_run() -> None:
    prom = {"url": "http://prom:9090", "query": "score", "threshold": 0.2, "for": "1m", "pollInterval": "1m"}
    w = World(job_manifest(retrain={"onDrift": {"prometheus": prom}}))
    w.reconcile()
    finish_run(w, 1, 0.9)
    w.drift = DriftObservation(error="the query returned 3 series, not one number")
    for _ in range(4):
        w.advance(65)
        assert w.reconcile().started_run is None
    healthy = w.condition(ConditionType.TRIGGERS_HEALTHY)
    assert healthy.status == "False" and "3 series" in healthy.message
    assert w.phase == "Succeeded"


def test_manual_annotation_starts_one_run_per_new_value() -> None:
    w = World(job_manifest())
    w.reconcile()
    finish_run(w, 1, 0.9)
    w.body["metadata"].setdefault("annotations", {})["tuneloop.dev/retrain"] = "2026-03-01"
    p = w.reconcile()
    assert p.started_run == 2 and w.status.current_run.trigger == "Manual"  # type: ignore[union-attr]
    finish_run(w, 2, 0.9)
    assert w.reconcile().started_run is None
    w.body["metadata"]["annotations"]["tuneloop.dev/retrain"] = "again"
    assert w.reconcile().started_run == 3


def test_replace_stops_the_active_run_for_the_new_spec() -> None:
    w = World(job_manifest(retrain={"concurrencyPolicy": "Replace"}))
    w.reconcile()
    w.start("job-r1-a1-n0")
    w.reconcile()
    w.set_spec(hyperparameters={"epochs": 9})
    p = w.reconcile()
    assert [r.name for r in p.delete] == ["job-r1-a1-n0"]
    assert w.status.current_run is not None and w.status.current_run.result == "Superseded"
    assert any(e.reason == Reason.SUPERSEDED for e in p.events)
    p = w.reconcile()
    assert p.started_run == 2 and w.status.current_run.trigger == "SpecChange"  # type: ignore[union-attr]


def test_queue_keeps_the_active_run() -> None:
    w = World(job_manifest())
    w.reconcile()
    w.start("job-r1-a1-n0")
    w.reconcile()
    w.set_spec(hyperparameters={"epochs": 9})
    p = w.reconcile()
    assert p.delete == [] and w.status.current_run is not None and w.status.current_run.result is None


def test_polling_that_finds_nothing_does_not_rewrite_the_status() -> None:
    w = World(watched_job())
    w.reconcile()
    finish_run(w, 1, 0.9)
    w.advance(660)  # more than STATUS_REFRESH_SECONDS after the last write: this poll is written
    w.reconcile()
    patches, polls = w.patches, w.requests.count("data")
    w.advance(340)  # the next poll (every 5 minutes), within the refresh window, finds nothing new
    w.reconcile()
    assert w.requests.count("data") == polls + 1
    assert w.patches == patches, "no status write for a poll that changed nothing"


def test_a_run_ending_while_the_spec_is_invalid_writes_its_promotion_with_the_spec_it_ran() -> None:
    """The executor writes promoted.json with the job the plan names (the stored spec when the live
    one is invalid): before, it re-parsed the live body and silently skipped the write."""
    w = World(job_manifest())
    w.reconcile()
    w.start("job-r1-a1-n0")
    w.reconcile()
    w.set_spec(promotion={"gates": [{"metric": "bleu", "min": 0.3}]})  # invalid for classification
    w.reconcile()
    w.succeed("job-r1-a1-n0", summary(1, 0.9))
    p = w.reconcile()
    assert p.pointer is not None and p.pointer.run == 1
    assert p.job is not None and p.job.spec.output.uri == "s3://model-bucket/out/"
    assert w.condition(ConditionType.FAILED).reason == Reason.INVALID_SPEC
