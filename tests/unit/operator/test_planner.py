"""The reconcile planner, driven through a simulated cluster (:mod:`.planner_helpers`): what a
user sees in ``kubectl get/describe`` (phase, conditions, currentRun, history, events) and what
the operator does to pods, ConfigMaps and Services, for every way a run can go."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest

from tests.manifests import BROKEN
from tuneloop.api import ConditionType, Reason
from tuneloop.api.status import CheckpointRef
from tuneloop.contract import LIFECYCLE_FIELDS, Heartbeat
from tuneloop.ownership import JobIdentity, OwnerRecord
from tuneloop_operator.conditions import status_patch
from tuneloop_operator.planner import parse_status, plan
from tuneloop_operator.planner.observe import _LIFECYCLE_ATTRS
from tuneloop_operator.settings import OperatorSettings

from .planner_helpers import IMAGE, T0, UID, World, job_manifest, ts

pytestmark = pytest.mark.unit

POD = "job-r1-a1-n0"
SUCCESS: dict[str, Any] = {
    "result": "Succeeded",
    "metrics": {"accuracy": 0.91},
    "modelUri": "s3://b/out/runs/1/model",
    "dataFingerprint": "abc",
}


def running_world(manifest: dict[str, Any] | None = None, **kwargs: Any) -> World:
    """A job whose first attempt's pods are running, seen by the operator."""
    w = World(manifest, **kwargs)
    w.reconcile()
    w.start()
    w.reconcile()
    return w


def beat(run: int = 1, phase: str = "training", **fields: Any) -> Heartbeat:
    values: dict[str, Any] = {"step": 5, "total_steps": 20, "loss": 0.5, "last_updated_time": T0, "job_uid": UID}
    values.update(fields)
    return Heartbeat(run=run, phase=phase, **values)


# --- a new job -----------------------------------------------------------------------------


def test_new_job_creates_config_map_and_first_pod() -> None:
    w = World()
    p = w.reconcile()
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in p.create] == ["ConfigMap/job-r1-config", f"Pod/{POD}"]
    assert p.delete == [] and p.started_run == 1
    pod = w.pod(POD)
    assert pod["spec"]["containers"][0]["image"] == IMAGE
    assert pod["metadata"]["ownerReferences"][0]["uid"] == UID
    assert w.phase == "Pending"  # the pod exists but does not run yet
    current = w.status.current_run
    assert current is not None
    assert (current.number, current.trigger, current.attempts, current.pods) == (1, "Created", 1, [POD])
    assert [(a.number, a.cause) for a in current.history] == [(1, "Started")]
    assert w.condition(ConditionType.RUNNING).reason == Reason.POD_CREATED
    assert w.condition(ConditionType.DATA_VALID).status == "Unknown"
    assert w.condition(ConditionType.READY).status == "False"  # a run is in progress (kstatus: InProgress)
    assert w.condition(ConditionType.RECONCILING).reason == Reason.POD_CREATED
    assert [(e.type, e.reason) for e in p.events] == [("Normal", Reason.RUN_STARTED)]
    assert POD in p.events[0].message
    assert w.status.observed_generation == 1


def test_planning_is_idempotent_and_patches_only_on_change() -> None:
    w = World()
    w.reconcile()
    second = w.reconcile()  # sees its pod now: nothing new to create
    assert second.create == [] and second.delete == [] and second.events == []
    assert w.condition(ConditionType.RUNNING).reason == Reason.POD_PENDING
    assert POD in w.condition(ConditionType.RUNNING).message
    # Same observations again: same plan, no patch.
    old = w.status
    a, b = w.plan(), w.plan()
    assert a == b
    assert a.create == [] and a.delete == [] and a.events == []
    assert status_patch(old, a.status) is None
    patches = w.patches
    w.reconcile()
    assert w.patches == patches


def test_running_pod_reports_training_then_nothing_changes() -> None:
    w = running_world()
    assert w.condition(ConditionType.RUNNING).reason == Reason.TRAINING
    assert w.condition(ConditionType.RUNNING).message == "run 1 is training"
    w.advance(30)
    p = w.plan()
    assert status_patch(w.status, p.status) is None and p.events == [] and p.create == []


def test_status_of_a_plan_reads_back_identically() -> None:
    w = running_world()
    status = w.plan().status
    assert parse_status(status.to_wire()) == status


# --- multi-node ----------------------------------------------------------------------------


def test_multi_node_creates_headless_service_and_a_pod_per_node() -> None:
    w = World(job_manifest(resources={"nodes": 2}))
    p = w.reconcile()
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in p.create] == [
        "ConfigMap/job-r1-config",
        "Service/job-r1",
        "Pod/job-r1-a1-n0",
        "Pod/job-r1-a1-n1",
    ]
    assert w.status.current_run is not None and w.status.current_run.pods == ["job-r1-a1-n0", "job-r1-a1-n1"]


def test_multi_node_waits_for_every_pod_to_run() -> None:
    w = World(job_manifest(resources={"nodes": 2}))
    w.reconcile()
    w.start("job-r1-a1-n0")
    w.reconcile()
    running = w.condition(ConditionType.RUNNING)
    assert running.reason == Reason.POD_PENDING and "job-r1-a1-n1" in running.message
    assert "job-r1-a1-n0" not in running.message
    w.start("job-r1-a1-n1")
    w.reconcile()
    assert w.condition(ConditionType.RUNNING).reason == Reason.TRAINING


def test_multi_node_failure_retries_the_attempt_as_one_unit() -> None:
    w = running_world(job_manifest(resources={"nodes": 2}), graceful_deletes=True)
    w.advance(100)
    w.fail("job-r1-a1-n1", 137)
    p = w.reconcile()
    assert [(r.kind, r.name) for r in p.delete] == [("Pod", "job-r1-a1-n0")]  # the healthy rank goes too
    assert p.create == [] and p.retried
    assert w.pod("job-r1-a1-n0")["metadata"]["deletionTimestamp"]  # still stopping (grace period)
    current = w.status.current_run
    assert current is not None and current.failures == 1
    assert current.history[-1].exit_code == 137 and "job-r1-a1-n1" in current.history[-1].message
    # The backoff is over, but rank 0 of the old attempt is still alive: no new pods yet.
    w.advance(10)
    p = w.reconcile()
    assert p.create == [] and p.delete == []  # not deleted twice
    assert p.requeue_after == 1.0
    running = w.condition(ConditionType.RUNNING)
    assert running.reason == Reason.POD_PENDING and "job-r1-a1-n0" in running.message
    # Gone now: the next attempt starts, reusing the run's ConfigMap and Service.
    w.finish_deletion()
    w.advance(1)
    p = w.reconcile()
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in p.create] == ["Pod/job-r1-a2-n0", "Pod/job-r1-a2-n1"]
    current = w.status.current_run
    assert current is not None
    assert [(a.number, a.cause) for a in current.history] == [(1, "Started"), (2, "Retry")]
    assert current.pods == ["job-r1-a2-n0", "job-r1-a2-n1"]


def test_multi_node_success_needs_every_pod() -> None:
    w = running_world(job_manifest(resources={"nodes": 2}))
    w.succeed("job-r1-a1-n1")
    p = w.reconcile()
    assert p.finished is None and w.phase in ("Validating", "Running")
    assert w.condition(ConditionType.RUNNING).reason == Reason.TRAINING  # rank 0 still trains
    w.succeed("job-r1-a1-n0", json.dumps(SUCCESS))
    p = w.reconcile()
    assert p.finished == ("Succeeded", Reason.SUCCEEDED)
    assert w.status.runs[-1].model_uri == SUCCESS["modelUri"]  # rank 0's summary


def test_multi_node_permanent_exit_of_any_rank_wins() -> None:
    w = running_world(job_manifest(resources={"nodes": 2}))
    w.fail("job-r1-a1-n0", 1, "NCCL error: remote process exited")
    w.fail("job-r1-a1-n1", 11, "no usable rows")
    p = w.reconcile()
    assert p.finished == ("Failed", Reason.INVALID_DATA)


# --- success --------------------------------------------------------------------------------


def test_success_records_the_run() -> None:
    w = running_world()
    w.advance(600)
    w.succeed(POD, json.dumps(SUCCESS))
    p = w.reconcile()
    assert w.phase == "Succeeded"
    assert p.finished == ("Succeeded", Reason.SUCCEEDED)
    assert p.create == [] and p.delete == []
    for type_, status in [
        (ConditionType.COMPLETE, "True"),
        (ConditionType.READY, "True"),
        (ConditionType.RUNNING, "False"),
        (ConditionType.FAILED, "False"),
        (ConditionType.DATA_VALID, "True"),
    ]:
        assert w.condition(type_).status == status, type_
    assert "accuracy=0.91" in w.condition(ConditionType.COMPLETE).message
    assert SUCCESS["modelUri"] in w.condition(ConditionType.COMPLETE).message
    assert w.status.metric == "accuracy=0.91"
    (record,) = w.status.runs
    assert (record.number, record.trigger, record.result, record.reason) == (1, "Created", "Succeeded", "Succeeded")
    assert record.metrics == {"accuracy": 0.91}
    assert record.model_uri == SUCCESS["modelUri"] and record.data_fingerprint == "abc"
    assert (record.start_time, record.completion_time, record.attempts) == (T0, T0 + timedelta(seconds=600), 1)
    current = w.status.current_run
    assert current is not None and current.result == "Succeeded" and current.completion_time == record.completion_time
    assert current.history[-1].reason == Reason.SUCCEEDED and current.history[-1].exit_code == 0
    assert [(e.type, e.reason) for e in p.events] == [("Normal", Reason.SUCCEEDED), ("Normal", Reason.PROMOTED)]
    # Settled: nothing more happens, no new run.
    w.advance(3600)
    p = w.reconcile()
    assert p.create == [] and p.delete == [] and p.events == [] and p.requeue_after is None
    assert w.phase == "Succeeded"


def test_success_without_a_summary_still_succeeds() -> None:
    w = running_world()
    w.succeed(POD, "done, but not JSON")
    p = w.reconcile()
    assert p.finished == ("Succeeded", Reason.SUCCEEDED)
    assert w.status.runs[-1].metrics == {} and w.status.metric is None


def test_headline_metric_is_the_first_gates() -> None:
    w = running_world(job_manifest(promotion={"gates": [{"metric": "f1", "min": 0.5}]}))
    w.succeed(POD, json.dumps(SUCCESS | {"metrics": {"accuracy": 0.91, "f1": 0.876543}}))
    w.reconcile()
    assert w.status.metric == "f1=0.8765"


def test_non_finite_metrics_are_left_out() -> None:
    w = running_world()
    message = json.dumps(SUCCESS | {"metrics": {"accuracy": float("nan"), "eval_loss": 0.25}})
    w.succeed(POD, message)
    w.reconcile()
    assert w.status.runs[-1].metrics == {"eval_loss": 0.25}
    assert w.status.metric == "eval_loss=0.25"


def test_oversized_model_uri_in_the_summary_does_not_crash() -> None:
    w = running_world()
    w.succeed(POD, json.dumps(SUCCESS | {"modelUri": "s3://b/" + "x" * 3000}))
    p = w.reconcile()
    assert p.finished == ("Succeeded", Reason.SUCCEEDED)


# --- permanent failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "result"),
    [
        (10, Reason.INVALID_CONFIG, "Failed"),
        (11, Reason.INVALID_DATA, "Failed"),
        (12, Reason.UNSUPPORTED_MODEL, "Failed"),
        (13, Reason.GATE_FAILED, "GateFailed"),
    ],
)
def test_permanent_exit_codes_fail_the_run_without_retry(code: int, reason: str, result: str) -> None:
    w = running_world()
    w.fail(POD, code, "the trainer explains")
    p = w.reconcile()
    assert w.phase == "Failed"
    assert p.finished == (result, reason) and not p.retried and p.create == []
    failed = w.condition(ConditionType.FAILED)
    assert (failed.status, failed.reason) == ("True", reason)
    assert f"exited with code {code}" in failed.message and "the trainer explains" in failed.message
    assert "not retried" in failed.message
    assert w.condition(ConditionType.RUNNING).status == "False"
    assert w.condition(ConditionType.READY).status == "False"
    assert w.condition(ConditionType.COMPLETE).status == "False"
    current = w.status.current_run
    assert current is not None
    assert (current.attempts, current.failures, current.result, current.reason) == (1, 0, result, reason)
    assert [(a.reason, a.exit_code) for a in current.history] == [(reason, code)]
    assert w.status.runs[-1].result == result
    gate = [("Normal", Reason.NOT_PROMOTED)] if reason == Reason.GATE_FAILED else []
    assert [(e.type, e.reason) for e in p.events] == [("Warning", reason), *gate]
    if code == 11:
        data = w.condition(ConditionType.DATA_VALID)
        assert (data.status, data.reason, data.message) == ("False", Reason.INVALID_DATA, "the trainer explains")
    # No retry, ever.
    w.advance(3600)
    p = w.reconcile()
    assert p.create == [] and w.phase == "Failed" and sorted(w.pods) == [POD]


def test_permanent_failure_message_comes_from_the_json_summary() -> None:
    w = running_world()
    w.fail(POD, 11, json.dumps({"result": "Failed", "message": "dataset has 0 usable rows"}))
    w.reconcile()
    assert w.condition(ConditionType.DATA_VALID).message == "dataset has 0 usable rows"
    assert "dataset has 0 usable rows" in w.condition(ConditionType.FAILED).message
    assert '"result"' not in w.condition(ConditionType.FAILED).message


def test_gate_failure_keeps_the_metrics() -> None:
    w = running_world(job_manifest(promotion={"gates": [{"metric": "accuracy", "min": 0.95}]}))
    w.fail(POD, 13, json.dumps(SUCCESS | {"result": "GateFailed", "message": "accuracy 0.91 < 0.95"}))
    w.reconcile()
    record = w.status.runs[-1]
    assert (record.result, record.metrics) == ("GateFailed", {"accuracy": 0.91})
    assert w.status.metric == "accuracy=0.91"
    assert w.condition(ConditionType.DATA_VALID).status == "True"


# --- retryable failures ----------------------------------------------------------------------


@pytest.mark.parametrize("code", [1, 137, 143])
def test_retryable_exit_backs_off_then_retries(code: int) -> None:
    w = running_world()
    w.advance(50)
    failed_at = w.now
    w.fail(POD, code, "CUDA error")
    p = w.reconcile()
    assert p.retried and p.finished is None and p.create == [] and p.requeue_after == 10.0
    current = w.status.current_run
    assert current is not None
    assert (current.failures, current.preemptions, current.retry_after) == (1, 0, failed_at + timedelta(seconds=10))
    assert (current.history[-1].reason, current.history[-1].exit_code) == (Reason.TRAINER_FAILED, code)
    running = w.condition(ConditionType.RUNNING)
    assert (running.status, running.reason) == ("True", Reason.RETRYING)
    assert "retry 1 of 3 in 10s" in running.message and f"code {code}" in running.message
    assert w.condition(ConditionType.FAILED).status == "False"
    assert [(e.type, e.reason) for e in p.events] == [("Warning", Reason.RETRYING)]
    # Not before the backoff ends.
    w.advance(9)
    p = w.reconcile()
    assert p.create == [] and p.requeue_after == 1.0 and p.events == []
    w.advance(1)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]  # the ConfigMap is reused
    current = w.status.current_run
    assert current is not None
    assert [(a.number, a.cause) for a in current.history] == [(1, "Started"), (2, "Retry")]
    assert (current.attempts, current.pods, current.retry_after) == (2, ["job-r1-a2-n0"], None)
    assert w.condition(ConditionType.RUNNING).reason == Reason.POD_CREATED


def test_retry_recreates_a_config_map_someone_deleted() -> None:
    w = running_world()
    w.config_maps.clear()
    w.fail(POD, 1)
    w.reconcile()
    w.advance(10)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-config", "job-r1-a2-n0"]


def test_failed_pod_without_exit_code_counts_as_retryable() -> None:
    w = running_world()
    w.pod(POD)["status"] = {"phase": "Failed", "reason": "OutOfnvidia.com/gpu"}
    p = w.reconcile()
    assert p.retried
    assert w.status.current_run is not None and w.status.current_run.failures == 1


def fail_and_retry(w: World, times: int) -> list[float | None]:
    """Fail the current attempt ``times`` times, each time waiting out the backoff; the requeue delays."""
    delays: list[float | None] = []
    for _ in range(times):
        current = w.status.current_run
        assert current is not None
        pod = current.pods[0]
        w.start(pod)
        w.fail(pod, 1)
        p = w.reconcile()
        delays.append(p.requeue_after)
        if p.finished is not None:
            break
        w.advance(p.requeue_after or 0)
        w.reconcile()
    return delays


def test_backoff_doubles_and_is_capped() -> None:
    w = World(job_manifest(backoffLimit=5), settings=OperatorSettings(trainer_image=IMAGE, backoff_max_seconds=45))
    w.reconcile()
    assert fail_and_retry(w, 5) == [10.0, 20.0, 40.0, 45.0, 45.0]
    current = w.status.current_run
    assert current is not None and current.attempts == 6 and current.failures == 5
    assert [a.cause for a in current.history] == ["Started"] + ["Retry"] * 5


def test_more_failures_than_backoff_limit_fail_the_run() -> None:
    w = World(job_manifest(backoffLimit=2))
    w.reconcile()
    fail_and_retry(w, 3)
    assert w.phase == "Failed"
    failed = w.condition(ConditionType.FAILED)
    assert failed.reason == Reason.BACKOFF_LIMIT_EXCEEDED
    assert "failed 3 times (backoffLimit 2)" in failed.message
    current = w.status.current_run
    assert current is not None and (current.attempts, current.failures, current.retry_after) == (3, 3, None)
    assert w.status.runs[-1].reason == Reason.BACKOFF_LIMIT_EXCEEDED
    assert w.last_plan is not None and w.last_plan.finished == ("Failed", Reason.BACKOFF_LIMIT_EXCEEDED)
    w.advance(3600)
    assert w.reconcile().create == []


def test_backoff_limit_zero_fails_on_the_first_failure() -> None:
    w = running_world(job_manifest(backoffLimit=0))
    w.fail(POD, 1)
    p = w.reconcile()
    assert p.finished == ("Failed", Reason.BACKOFF_LIMIT_EXCEEDED) and not p.retried
    assert w.phase == "Failed"


# --- preemption ------------------------------------------------------------------------------


def lose_by_deletion(w: World) -> None:
    w.remove(POD)


def lose_by_disruption(w: World) -> None:
    w.disrupt(POD)


def lose_by_eviction(w: World) -> None:
    w.evict(POD, "Evicted")


def lose_with_node(w: World) -> None:
    w.evict(POD, "NodeLost")


@pytest.mark.parametrize("lose", [lose_by_deletion, lose_by_disruption, lose_by_eviction, lose_with_node])
def test_lost_pod_is_replaced_at_once_without_using_a_retry(lose: Any) -> None:
    w = running_world()
    w.advance(120)
    lose(w)
    p = w.reconcile()
    assert p.preempted and not p.retried and p.finished is None
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    assert p.requeue_after is None  # no backoff
    current = w.status.current_run
    assert current is not None
    assert (current.failures, current.preemptions, current.attempts) == (0, 1, 2)
    assert [(a.cause, a.reason) for a in current.history] == [("Started", Reason.PREEMPTED), ("Preempted", None)]
    assert [(e.type, e.reason) for e in p.events] == [("Warning", Reason.PREEMPTED)]
    assert "not counted against backoffLimit" in p.events[0].message
    assert w.phase != "Failed"


def test_preemptions_leave_the_backoff_limit_alone() -> None:
    w = running_world(job_manifest(backoffLimit=0))
    for attempt in range(1, 4):
        w.disrupt(f"job-r1-a{attempt}-n0")
        w.reconcile()
        w.start()
        w.reconcile()
    current = w.status.current_run
    assert current is not None and (current.preemptions, current.failures, current.result) == (3, 0, None)


def test_pod_on_a_lost_node_is_replaced_once_it_is_gone() -> None:
    """Phase Unknown: the trainer may still run on the unreachable node, so the next attempt waits
    until the pod object is gone (two trainers never write the same run prefix at once)."""
    w = running_world(graceful_deletes=True)
    w.lose_node(POD)
    p = w.reconcile()
    assert p.preempted and {r.name for r in p.delete} == {POD} and p.create == []
    current = w.status.current_run
    assert current is not None and current.preemptions == 1 and current.history[-1].reason == Reason.PREEMPTED
    assert "NodeLost" in current.history[-1].message
    p = w.reconcile()
    assert p.create == [] and p.requeue_after == 1.0
    assert w.condition(ConditionType.RUNNING).reason == Reason.POD_PENDING
    w.finish_deletion()
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    current = w.status.current_run
    assert current is not None and current.history[-1].cause == "Preempted" and current.preemptions == 1


def test_a_pod_stuck_terminating_on_a_lost_node_stops_fencing_after_the_bound() -> None:
    """The node never answers again: the pod stays Terminating forever. The next attempt waits
    for it through its grace period and then ``stuck_terminating_seconds``, not longer."""
    w = running_world(
        graceful_deletes=True, settings=OperatorSettings(trainer_image=IMAGE, stuck_terminating_seconds=120)
    )
    grace = w.pod(POD)["spec"]["terminationGracePeriodSeconds"]
    w.lose_node(POD)
    w.reconcile()  # the attempt is lost; the pod is deleted and stays Terminating
    assert w.pod(POD)["metadata"]["deletionTimestamp"]
    w.advance(grace + 119)
    p = w.reconcile()
    assert p.create == [] and w.condition(ConditionType.RUNNING).reason == Reason.POD_PENDING
    assert f"waiting for pod(s) {POD}" in w.condition(ConditionType.RUNNING).message
    w.advance(1)
    events_before = len(w.events)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    assert POD in w.pods  # never force-deleted by the operator: that is the user's call
    [(kind, message)] = [(e.type, e.message) for e in w.events[events_before:] if e.reason == Reason.POD_STUCK]
    assert kind == "Warning" and POD in message and "still terminating 120s after its grace period" in message
    current = w.status.current_run
    assert current is not None and current.history[-1].cause == "Preempted" and current.preemptions == 1
    w.start("job-r1-a2-n0")
    p = w.reconcile()  # the stuck pod of attempt 1 does not disturb attempt 2
    assert p.create == [] and p.delete == [] and w.condition(ConditionType.RUNNING).reason == Reason.TRAINING


def test_a_pod_someone_deleted_that_never_goes_away_is_lost_after_the_bound() -> None:
    """``kubectl delete pod`` on a node that no longer answers: no DisruptionTarget, no exit,
    the pod just stays Terminating. The attempt is taken as lost once the bound has passed."""
    w = running_world(settings=OperatorSettings(trainer_image=IMAGE, stuck_terminating_seconds=60))
    w.pod(POD)["metadata"]["deletionTimestamp"] = ts(w.now + timedelta(seconds=30))  # grace 30 s
    p = w.reconcile()
    assert p.create == [] and not p.preempted and p.requeue_after == 1.0
    w.advance(89)
    assert w.reconcile().create == []
    w.advance(1)
    p = w.reconcile()
    assert p.preempted and [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    current = w.status.current_run
    assert current is not None and current.history[0].message == f"pod {POD} was deleted"
    assert any(e.reason == Reason.POD_STUCK and POD in e.message for e in p.events)


def test_disruption_target_on_a_running_pod_waits_for_it_to_stop() -> None:
    """The scheduler marks the pod before it sends SIGTERM: the attempt is lost at once, but the
    next one starts only when the old trainer has stopped."""
    w = running_world(graceful_deletes=True)
    w.pod(POD)["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    )
    p = w.reconcile()
    assert p.preempted and {r.name for r in p.delete} == {POD} and p.create == []
    p = w.reconcile()
    assert p.create == [] and not p.preempted and p.requeue_after == 1.0
    w.fail(POD, 143)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    current = w.status.current_run
    assert current is not None and (current.preemptions, current.failures) == (1, 0)
    assert [a.cause for a in current.history] == ["Started", "Preempted"]


def test_multi_node_eviction_of_one_rank_replaces_the_whole_attempt() -> None:
    w = running_world(job_manifest(resources={"nodes": 2}), graceful_deletes=True)
    w.evict("job-r1-a1-n1")
    p = w.reconcile()
    assert p.preempted and {r.name for r in p.delete} == {"job-r1-a1-n0"} and p.create == []
    assert "job-r1-a1-n1 was Evicted" in p.events[0].message
    w.finish_deletion()
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0", "job-r1-a2-n1"]
    current = w.status.current_run
    assert current is not None and current.history[-1].cause == "Preempted" and current.failures == 0


def test_too_many_preemptions_fail_the_run() -> None:
    w = running_world(settings=OperatorSettings(trainer_image=IMAGE, max_preemptions=2))
    for attempt in range(1, 4):
        w.evict(f"job-r1-a{attempt}-n0")
        p = w.reconcile()
        w.start()
        w.reconcile()
    assert p.finished == ("Failed", Reason.PREEMPTION_LIMIT_EXCEEDED) and p.create == []
    assert w.phase == "Failed"
    failed = w.condition(ConditionType.FAILED)
    assert failed.reason == Reason.PREEMPTION_LIMIT_EXCEEDED and "lost 3 attempts" in failed.message
    assert w.status.runs[-1].preemptions == 3


def test_pod_being_deleted_is_replaced_only_when_it_ends() -> None:
    w = running_world(graceful_deletes=True)
    w.pod(POD)["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:30Z"  # kubectl delete pod
    p = w.reconcile()
    assert p.create == [] and p.delete == [] and p.requeue_after == 1.0
    assert w.condition(ConditionType.RUNNING).reason == Reason.TRAINING
    w.fail(POD, 143)  # SIGTERM: it checkpointed and exited
    p = w.reconcile()
    assert p.preempted and not p.retried
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    current = w.status.current_run
    assert current is not None and (current.failures, current.preemptions) == (0, 1)


def test_succeeded_pod_being_deleted_still_succeeds() -> None:
    w = running_world()
    w.succeed(POD, json.dumps(SUCCESS))
    w.pod(POD)["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:30Z"
    p = w.reconcile()
    assert p.finished == ("Succeeded", Reason.SUCCEEDED) and p.create == []


# --- stuck pods ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_stuck", "expected"),
    [
        (
            lambda w: w.wait(POD, "ImagePullBackOff", 'Back-off pulling image "ghcr.io/x/trainer:nope"'),
            'ImagePullBackOff: Back-off pulling image "ghcr.io/x/trainer:nope"',
        ),
        (
            lambda w: w.unschedulable(POD, "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
            "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        ),
        (
            lambda w: w.wait(POD, "CreateContainerConfigError", 'secret "s3-credentials" not found'),
            'CreateContainerConfigError: secret "s3-credentials" not found',
        ),
    ],
)
def test_stuck_pod_is_reported_once(make_stuck: Any, expected: str) -> None:
    w = World()
    w.reconcile()
    make_stuck(w)
    p = w.reconcile()
    running = w.condition(ConditionType.RUNNING)
    assert (running.status, running.reason) == ("True", Reason.POD_STUCK)
    assert running.message == f"pod {POD} cannot start: {expected}"
    assert [(e.type, e.reason, e.message) for e in p.events] == [("Warning", Reason.POD_STUCK, running.message)]
    assert p.create == [] and p.delete == []
    w.advance(60)
    p = w.reconcile()
    assert p.events == [] and w.patches == 2
    # It starts after all.
    w.start()
    w.reconcile()
    assert w.condition(ConditionType.RUNNING).reason == Reason.TRAINING


# --- deadline --------------------------------------------------------------------------------


def test_deadline_fails_the_run_and_deletes_its_pods() -> None:
    w = running_world(job_manifest(activeDeadlineSeconds=600))
    w.advance(100)
    p = w.reconcile()
    assert p.requeue_after == 500.0
    w.advance(499)
    assert w.reconcile().requeue_after == 1.0
    w.advance(1)
    p = w.reconcile()
    assert p.finished == ("Failed", Reason.DEADLINE_EXCEEDED)
    assert sorted({(r.kind, r.name) for r in p.delete}) == [("Pod", POD)]
    assert w.phase == "Failed"
    failed = w.condition(ConditionType.FAILED)
    assert failed.reason == Reason.DEADLINE_EXCEEDED and "activeDeadlineSeconds (600s)" in failed.message
    current = w.status.current_run
    assert current is not None and current.history[-1].reason == Reason.DEADLINE_EXCEEDED
    assert POD not in w.pods


def test_deadline_deletes_every_pod_of_the_run() -> None:
    w = running_world(job_manifest(activeDeadlineSeconds=600, resources={"nodes": 2}))
    w.advance(600)
    p = w.reconcile()
    # (Each pod is listed twice, by close_attempt and by finish; the executor's DELETE is idempotent.)
    assert {r.name for r in p.delete} == {"job-r1-a1-n0", "job-r1-a1-n1"}
    assert w.pods == {}


def test_deadline_expires_during_backoff() -> None:
    w = running_world(job_manifest(activeDeadlineSeconds=60))
    w.advance(55)
    w.fail(POD, 1)
    p = w.reconcile()
    assert p.requeue_after == 5.0  # the deadline comes before the retry
    w.advance(5)
    p = w.reconcile()
    assert p.finished == ("Failed", Reason.DEADLINE_EXCEEDED) and p.create == []


def test_suspended_time_does_not_count_against_the_deadline() -> None:
    w = running_world(job_manifest(activeDeadlineSeconds=600))
    w.advance(100)
    w.set_spec(suspend=True)
    w.reconcile()
    w.advance(5000)
    assert w.reconcile().finished is None
    w.set_spec(suspend=False)
    p = w.reconcile()
    assert p.finished is None and [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    assert p.requeue_after == 500.0
    current = w.status.current_run
    assert current is not None and current.suspended_seconds == 5000
    w.start()
    w.advance(499)
    assert w.reconcile().finished is None
    w.advance(1)
    assert w.reconcile().finished == ("Failed", Reason.DEADLINE_EXCEEDED)


# --- suspend ---------------------------------------------------------------------------------


def test_suspend_deletes_pods_and_resume_starts_a_new_attempt() -> None:
    w = running_world()
    w.advance(60)
    w.set_spec(suspend=True)
    p = w.reconcile()
    assert {(r.kind, r.name) for r in p.delete} == {("Pod", POD)} and p.create == []
    assert w.phase == "Suspended"
    suspended = w.condition(ConditionType.SUSPENDED)
    assert (suspended.status, suspended.reason) == ("True", Reason.SUSPENDED)
    assert w.condition(ConditionType.RUNNING).status == "False"
    current = w.status.current_run
    assert current is not None and current.history[-1].reason == Reason.SUSPENDED
    assert current.suspended_since == w.now and current.result is None
    assert [(e.type, e.reason) for e in p.events] == [("Normal", Reason.SUSPENDED)]
    assert "checkpoints kept" in p.events[0].message
    # Quiet while suspended.
    w.advance(600)
    p = w.reconcile()
    assert p.create == [] and p.delete == [] and p.events == []
    # Unsuspend.
    w.set_spec(suspend=False)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    assert p.started_run is None  # same run
    suspended = w.condition(ConditionType.SUSPENDED)
    assert (suspended.status, suspended.reason) == ("False", Reason.RESUMED)
    assert w.phase == "Pending"  # the new attempt's pod is created, not yet running
    current = w.status.current_run
    assert current is not None and current.number == 1 and current.suspended_since is None
    assert [(a.number, a.cause) for a in current.history] == [(1, "Started"), (2, "Resumed")]
    assert (current.failures, current.preemptions) == (0, 0)
    assert Reason.RESUMED in [e.reason for e in p.events]


def test_suspend_waits_for_pods_to_stop_before_resuming() -> None:
    w = running_world(graceful_deletes=True)
    w.set_spec(suspend=True)
    w.reconcile()
    p = w.reconcile()
    assert p.requeue_after == 1.0 and p.delete == []
    assert POD in w.condition(ConditionType.SUSPENDED).message
    w.set_spec(suspend=False)
    p = w.reconcile()
    assert p.create == []  # the old pod is still stopping
    w.finish_deletion()
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]


def test_suspend_during_backoff_and_resume() -> None:
    w = running_world()
    w.fail(POD, 1)
    w.reconcile()
    w.set_spec(suspend=True)
    p = w.reconcile()
    assert p.create == [] and w.phase == "Suspended"
    w.advance(600)
    w.set_spec(suspend=False)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    current = w.status.current_run
    assert current is not None and current.number == 1 and current.failures == 1


def test_spec_change_while_suspended_resumes_the_old_run_first() -> None:
    w = running_world()
    w.set_spec(suspend=True)
    w.reconcile()
    w.edit_spec(set_epochs(4))
    p = w.reconcile()
    assert [e.reason for e in p.events] == [Reason.SPEC_CHANGED] and p.create == []
    w.set_spec(suspend=False)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    w.start()
    w.succeed("job-r1-a2-n0", json.dumps(SUCCESS))
    w.reconcile()
    p = w.reconcile()
    assert p.started_run == 2


def test_job_created_suspended_starts_nothing_until_unsuspended() -> None:
    w = World(job_manifest(suspend=True))
    p = w.reconcile()
    assert p.create == [] and w.phase == "Suspended" and w.status.current_run is None
    assert w.condition(ConditionType.SUSPENDED).status == "True"
    assert w.condition(ConditionType.RUNNING).status == "False"
    w.advance(600)
    assert w.reconcile().create == []
    w.set_spec(suspend=False)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-config", POD]
    assert p.started_run == 1
    assert w.condition(ConditionType.SUSPENDED).status == "False"
    current = w.status.current_run
    assert current is not None and current.trigger == "Created" and current.start_time == w.now


def test_suspending_a_finished_job_and_back_starts_no_run() -> None:
    w = running_world()
    w.succeed(POD, json.dumps(SUCCESS))
    w.reconcile()
    w.set_spec(suspend=True)
    assert w.reconcile().create == []
    w.set_spec(suspend=False)
    p = w.reconcile()
    assert p.create == [] and w.phase == "Succeeded"
    assert w.condition(ConditionType.SUSPENDED).status == "False"


# --- spec changes ----------------------------------------------------------------------------


def set_epochs(n: int) -> Any:
    def change(spec: dict[str, Any]) -> None:
        spec.setdefault("hyperparameters", {})["epochs"] = n

    return change


def test_spec_change_during_a_run_starts_the_next_run_after_it() -> None:
    w = running_world()
    w.edit_spec(set_epochs(7))
    p = w.reconcile()
    assert p.create == [] and p.delete == []
    assert [(e.reason, e.message) for e in p.events] == [
        (Reason.SPEC_CHANGED, "generation 2 will be trained by the next run, after run 1 ends")
    ]
    assert w.status.observed_generation == 2
    assert w.reconcile().events == []  # told once
    w.succeed(POD, json.dumps(SUCCESS))
    p = w.reconcile()
    assert p.finished == ("Succeeded", Reason.SUCCEEDED) and p.requeue_after == 0.0
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r2-config", "job-r2-a1-n0"]
    config = json.loads(p.create[0]["data"]["job.json"])
    assert config["spec"]["hyperparameters"]["epochs"] == 7
    assert p.started_run == 2
    current = w.status.current_run
    assert current is not None and (current.number, current.trigger, current.generation) == (2, "SpecChange", 2)
    assert [r.number for r in w.status.runs] == [1]
    assert w.condition(ConditionType.COMPLETE).status == "False"
    assert w.condition(ConditionType.RECONCILING).status == "True"  # run 2 is in progress
    assert w.status.promoted is not None and w.status.promoted.run == 1  # run 1's model is still there


def test_a_retry_after_a_spec_change_keeps_the_runs_own_spec() -> None:
    """The retry of run 1 runs run 1's spec: same node count, same GPUs, the ConfigMap it
    reads; lifecycle fields (backoffLimit here) are today's. Run 2 brings the new spec."""
    w = running_world(job_manifest(backoffLimit=0))

    def grow(spec: dict[str, Any]) -> None:
        spec["resources"] = {"nodes": 2, "gpus": 2}
        spec["backoffLimit"] = 3

    w.edit_spec(grow)
    w.reconcile()
    w.fail(POD, 1)  # retryable; backoffLimit 0 at the start, 3 now
    p = w.reconcile()
    assert p.retried and w.status.current_run is not None and w.status.current_run.result is None
    w.advance(3600)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]  # one node, no Service
    container = p.create[0]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # as run 1 started
    w.start("job-r1-a2-n0")
    w.succeed("job-r1-a2-n0", json.dumps(SUCCESS))
    w.reconcile()
    p = w.reconcile()
    assert sorted(o["metadata"]["name"] for o in p.create) == [
        "job-r2",
        "job-r2-a1-n0",
        "job-r2-a1-n1",
        "job-r2-config",
    ]
    pod = next(o for o in p.create if o["metadata"]["name"] == "job-r2-a1-n0")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_lifecycle_attributes_cover_the_lifecycle_fields() -> None:
    assert len(_LIFECYCLE_ATTRS) == len(LIFECYCLE_FIELDS)


def test_spec_change_after_a_failed_run_starts_a_new_run() -> None:
    w = running_world()
    w.fail(POD, 10)
    w.reconcile()
    assert w.phase == "Failed"
    w.edit_spec(set_epochs(2))
    p = w.reconcile()
    assert p.started_run == 2 and w.phase == "Pending"
    assert w.condition(ConditionType.FAILED).status == "False"


@pytest.mark.parametrize(
    ("field", "during", "after"),
    [
        ("backoffLimit", 7, 8),
        ("ttlSecondsAfterFinished", 3600, 7200),
        ("activeDeadlineSeconds", 99999, 100000),
        ("retrain", {"cooldown": "2h"}, {"cooldown": "3h"}),
    ],
)
def test_lifecycle_fields_never_start_a_run(field: str, during: Any, after: Any) -> None:
    w = running_world()
    w.set_spec(**{field: during})
    p = w.reconcile()
    assert p.events == [] and p.create == [] and w.status.observed_generation == 2
    w.succeed(POD, json.dumps(SUCCESS))
    assert w.reconcile().requeue_after != 0.0  # no new run wanted
    w.set_spec(**{field: after})
    p = w.reconcile()
    assert p.started_run is None and p.create == []
    assert w.status.current_run is not None and w.status.current_run.number == 1 and w.phase == "Succeeded"


def test_no_new_run_when_retrain_on_spec_change_is_off() -> None:
    w = running_world(job_manifest(retrain={"onSpecChange": False}))
    w.edit_spec(set_epochs(9))
    p = w.reconcile()
    assert [e.reason for e in p.events] == [Reason.SPEC_CHANGED]
    assert "no new run starts" in p.events[0].message
    w.succeed(POD, json.dumps(SUCCESS))
    w.reconcile()
    p = w.reconcile()
    assert p.create == [] and p.started_run is None and w.phase == "Succeeded"
    w.edit_spec(set_epochs(11))
    assert w.reconcile().create == []


# --- TTL -------------------------------------------------------------------------------------


def test_ttl_deletes_the_finished_runs_children_but_keeps_artifacts() -> None:
    w = running_world(job_manifest(ttlSecondsAfterFinished=300))
    w.succeed(POD, json.dumps(SUCCESS))
    p = w.reconcile()
    assert p.requeue_after == 300.0 and p.delete == []
    w.advance(120)
    p = w.reconcile()
    assert p.delete == [] and p.requeue_after == 180.0
    w.advance(180)
    p = w.reconcile()
    assert sorted((r.kind, r.name) for r in p.delete) == [("ConfigMap", "job-r1-config"), ("Pod", POD)]
    (event,) = p.events
    assert event.reason == Reason.CLEANED_UP and event.type == "Normal"
    assert "checkpoints and models in s3://model-bucket/out/ are kept" in event.message
    assert w.pods == {} and w.config_maps == {}
    # The record stays; nothing more to do.
    assert w.status.runs[-1].result == "Succeeded" and w.phase == "Succeeded"
    p = w.reconcile()
    assert p.delete == [] and p.events == [] and p.create == []


def test_ttl_also_cleans_up_failed_multi_node_runs() -> None:
    w = running_world(job_manifest(ttlSecondsAfterFinished=0, resources={"nodes": 2}))
    w.fail("job-r1-a1-n0", 12)
    w.reconcile()
    p = w.reconcile()
    assert sorted((r.kind, r.name) for r in p.delete) == [
        ("ConfigMap", "job-r1-config"),
        ("Pod", "job-r1-a1-n0"),
        ("Service", "job-r1"),
    ]


def test_ttl_spares_the_active_run() -> None:
    w = running_world(job_manifest(ttlSecondsAfterFinished=10))
    w.succeed(POD, json.dumps(SUCCESS))
    w.reconcile()
    w.edit_spec(set_epochs(5))
    w.reconcile()  # run 2 starts
    w.advance(10)
    p = w.reconcile()
    deleted = sorted(r.name for r in p.delete)
    assert deleted == ["job-r1-a1-n0", "job-r1-config"]
    assert "job-r2-a1-n0" in w.pods and "job-r2-config" in w.config_maps


# --- invalid specs ---------------------------------------------------------------------------

OPERATOR_ONLY = [b for b in BROKEN if not b.crd_catches]


@pytest.mark.parametrize("broken", OPERATOR_ONLY, ids=[b.name for b in OPERATOR_ONLY])
def test_invalid_spec_creates_nothing_and_says_where(broken: Any) -> None:
    w = World(broken.manifest())
    p = w.reconcile()
    assert p.create == [] and p.delete == [] and p.started_run is None
    assert w.phase == "Failed"
    failed = w.condition(ConditionType.FAILED)
    assert (failed.status, failed.reason) == ("True", Reason.INVALID_SPEC)
    assert broken.path in failed.message
    assert w.condition(ConditionType.RUNNING).reason == Reason.INVALID_SPEC
    assert w.condition(ConditionType.READY).status == "False"
    assert [(e.type, e.reason) for e in p.events] == [("Warning", Reason.INVALID_SPEC)]
    assert broken.path in p.events[0].message
    w.advance(60)
    p = w.reconcile()
    assert p.events == [] and p.create == []


def test_fixing_an_invalid_spec_starts_run_one() -> None:
    w = World(job_manifest(promotion={"gates": [{"metric": "rougeL", "min": 0.3}]}))
    w.reconcile()
    w.set_spec(promotion={"gates": [{"metric": "accuracy", "min": 0.3}]})
    p = w.reconcile()
    assert p.started_run == 1 and [o["metadata"]["name"] for o in p.create] == ["job-r1-config", POD]
    assert w.condition(ConditionType.FAILED).status == "False"
    assert w.phase == "Pending"


def test_a_run_whose_spec_turned_invalid_still_finishes_and_is_retried() -> None:
    """Its pods read the spec it started with, so the run is followed to its end: a crash is
    retried, a success recorded; the Failed condition keeps saying what is wrong with the spec,
    and no new run starts until it is fixed."""
    w = running_world()
    w.set_spec(promotion={"gates": [{"metric": "bleu", "min": 0.3}]})
    w.reconcile()
    w.fail(POD, 1)
    p = w.reconcile()
    assert p.retried
    w.advance(3600)
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"]
    w.start("job-r1-a2-n0")
    w.succeed("job-r1-a2-n0", json.dumps(SUCCESS))
    p = w.reconcile()
    assert p.finished == ("Succeeded", Reason.SUCCEEDED)
    failed = w.condition(ConditionType.FAILED)
    assert (failed.status, failed.reason) == ("True", Reason.INVALID_SPEC) and "promotion" in failed.message
    assert w.status.runs[-1].result == "Succeeded"
    w.advance(60)
    assert w.reconcile().create == []


def test_suspend_works_while_the_spec_is_invalid() -> None:
    """Kueue suspends a job whatever else is wrong with its spec."""
    w = running_world()
    w.set_spec(promotion={"gates": [{"metric": "bleu", "min": 0.3}]}, suspend=True)
    p = w.reconcile()
    assert {r.name for r in p.delete} == {POD}
    assert w.condition(ConditionType.SUSPENDED).status == "True"
    assert w.condition(ConditionType.FAILED).reason == Reason.INVALID_SPEC
    w.set_spec(promotion={"gates": []}, suspend=False)  # fixed and resumed: the same run goes on
    p = w.reconcile()
    assert [o["metadata"]["name"] for o in p.create] == ["job-r1-a2-n0"] and p.started_run is None
    current = w.status.current_run
    assert current is not None and current.history[-1].cause == "Resumed"


def test_invalid_spec_during_a_run_leaves_its_pods_alone() -> None:
    w = running_world()
    w.set_spec(promotion={"gates": [{"metric": "bleu", "min": 0.3}]})
    p = w.reconcile()
    assert p.create == [] and p.delete == []
    assert w.condition(ConditionType.FAILED).reason == Reason.INVALID_SPEC
    assert w.condition(ConditionType.RUNNING).status == "True"
    # Fixed by going back: the run goes on, no new run.
    w.set_spec(promotion={"gates": []})
    p = w.reconcile()
    assert p.create == [] and p.started_run is None
    assert w.condition(ConditionType.FAILED).status == "False"
    w.succeed(POD, json.dumps(SUCCESS))
    assert w.reconcile().finished == ("Succeeded", Reason.SUCCEEDED)


# --- robustness ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stored",
    [
        "garbage",
        ["a", "list"],
        {"phase": "Exploded"},
        {"currentRun": {"number": 0, "trigger": "Created"}},
        {"currentRun": {"number": 1, "trigger": "Cosmic"}},
        {"conditions": [{"type": "Running"}]},
        {"someFutureField": {"x": 1}},
    ],
)
def test_corrupt_or_unknown_status_does_not_crash(stored: Any) -> None:
    w = World()
    w.body["status"] = stored
    p = w.reconcile()
    assert p.started_run == 1 and w.phase == "Pending"


def test_restarted_operator_plans_the_same_names() -> None:
    """The operator created the pods, then died before patching the status."""
    w = World(job_manifest(resources={"nodes": 2}))
    first = w.plan()
    w.apply(first)
    w.body.pop("status")
    again = w.plan()
    first_names = [o["metadata"]["name"] for o in first.create]
    assert first_names == ["job-r1-config", "job-r1", "job-r1-a1-n0", "job-r1-a1-n1"]
    assert again.create == []  # the run's pods are found and followed: no twins
    current, before = again.status.current_run, first.status.current_run
    assert current is not None and before is not None
    assert (current.number, current.pods, current.attempts) == (before.number, before.pods, before.attempts)
    created = list(w.created)
    w.apply(again)
    assert w.created == created
    w.start()
    w.reconcile()
    assert w.condition(ConditionType.RUNNING).reason == Reason.TRAINING
    assert sorted(w.pods) == ["job-r1-a1-n0", "job-r1-a1-n1"]


def test_lost_status_does_not_reuse_numbers_of_existing_runs() -> None:
    w = running_world()
    w.edit_spec(set_epochs(2))
    w.succeed(POD, json.dumps(SUCCESS))
    w.reconcile()
    w.reconcile()  # run 2 starts
    w.start()
    w.reconcile()
    assert sorted(w.pods) == [POD, "job-r2-a1-n0"]
    w.body["status"] = {"writtenByANewerOperator": True}  # unreadable: starts afresh
    p = w.reconcile()
    assert not [o["metadata"]["name"] for o in p.create if "-r1-" in o["metadata"]["name"]]
    assert p.create == []  # run 2's live pod is followed, not duplicated
    current = w.status.current_run
    assert current is not None and current.number == 2 and current.result is None
    assert current.pods == ["job-r2-a1-n0"]


def test_plans_depend_only_on_observations() -> None:
    w = running_world()
    observed = w.observed()
    snapshot = copy.deepcopy(observed.body)
    a = plan(observed, w.settings)
    b = plan(observed, w.settings)
    assert a == b
    assert observed.body == snapshot  # the body is not mutated


# --- heartbeat -------------------------------------------------------------------------------


def test_heartbeat_sets_progress_checkpoint_and_data_valid() -> None:
    w = running_world()
    w.heartbeat = beat(last_checkpoint=CheckpointRef(step=4, uri="s3://model-bucket/out/runs/1/checkpoints/step-4"))
    w.reconcile()
    current = w.status.current_run
    assert current is not None and current.progress is not None
    assert (current.progress.step, current.progress.total_steps, current.progress.loss) == (5, 20, 0.5)
    assert current.progress.last_updated_time == T0
    assert current.last_checkpoint == CheckpointRef(step=4, uri="s3://model-bucket/out/runs/1/checkpoints/step-4")
    assert w.condition(ConditionType.DATA_VALID).status == "True"
    running = w.condition(ConditionType.RUNNING)
    assert running.reason == Reason.TRAINING and running.message == "run 1 is training: step 5/20"
    assert w.phase == "Running"


def test_evaluating_heartbeat_sets_phase_evaluating() -> None:
    w = running_world()
    w.heartbeat = beat(phase="evaluating", step=20)
    w.reconcile()
    assert w.phase == "Evaluating"
    assert w.condition(ConditionType.RUNNING).reason == Reason.EVALUATING


def test_heartbeat_of_another_run_is_ignored() -> None:
    w = running_world()
    w.heartbeat = beat(run=2, last_checkpoint=CheckpointRef(step=4, uri="s3://x/runs/2/checkpoints/step-4"))
    w.reconcile()
    current = w.status.current_run
    assert current is not None and current.progress is None and current.last_checkpoint is None
    assert w.condition(ConditionType.DATA_VALID).status == "Unknown"
    assert w.condition(ConditionType.RUNNING).message == "run 1 is training"


def test_uploading_heartbeat_means_the_data_was_valid() -> None:
    w = running_world()
    w.heartbeat = beat(phase="uploading", step=20)
    w.reconcile()
    assert w.phase == "Running" and w.condition(ConditionType.DATA_VALID).status == "True"


def test_validating_heartbeat_keeps_phase_validating() -> None:
    w = running_world()
    w.heartbeat = beat(phase="validating", step=0)
    w.reconcile()
    assert w.phase == "Validating"


def test_checkpoint_survives_a_retry() -> None:
    w = running_world()
    ref = CheckpointRef(step=4, uri="s3://model-bucket/out/runs/1/checkpoints/step-4")
    w.heartbeat = beat(last_checkpoint=ref)
    w.reconcile()
    w.fail(POD, 1)
    w.reconcile()
    w.advance(10)
    w.reconcile()
    current = w.status.current_run
    assert current is not None and current.attempts == 2 and current.last_checkpoint == ref


# --- conditions over time --------------------------------------------------------------------


def test_last_transition_time_changes_only_on_a_flip() -> None:
    w = World()
    w.reconcile()  # Running True (PodCreated) at T0
    w.advance(10)
    w.reconcile()  # PodPending
    w.advance(10)
    w.start()
    w.reconcile()  # Training
    w.advance(10)
    w.heartbeat = beat()
    w.reconcile()  # DataValid Unknown -> True
    running = w.condition(ConditionType.RUNNING)
    assert running.reason == Reason.TRAINING and running.last_transition_time == T0
    data_flipped = T0 + timedelta(seconds=30)
    assert w.condition(ConditionType.DATA_VALID).last_transition_time == data_flipped
    assert w.condition(ConditionType.COMPLETE).last_transition_time == T0
    w.advance(100)
    w.succeed(POD, json.dumps(SUCCESS))
    w.reconcile()
    done = T0 + timedelta(seconds=130)
    assert w.condition(ConditionType.RUNNING).last_transition_time == done
    assert w.condition(ConditionType.COMPLETE).last_transition_time == done
    assert w.condition(ConditionType.READY).last_transition_time == done
    assert w.condition(ConditionType.FAILED).last_transition_time == T0  # False all along
    assert w.condition(ConditionType.DATA_VALID).last_transition_time == data_flipped


def test_conditions_carry_the_observed_generation() -> None:
    w = running_world()
    w.set_spec(backoffLimit=5)
    w.reconcile()
    assert w.condition(ConditionType.RUNNING).observed_generation == 2
    assert w.status.observed_generation == 2


# --- output ownership (issue #9) --------------------------------------------------------------

OTHER_JOB = JobIdentity(namespace="default", name="other", uid="uid-other")
PREDECESSOR = JobIdentity(namespace="default", name="job", uid="uid-deleted-job")


def test_a_new_job_claims_its_output_and_run_1_before_creating_pods() -> None:
    w = World()
    p = w.reconcile()
    assert p.claim is not None and p.claim.run == 1 and p.claim.identity.uid == UID
    assert w.output_owner is not None and w.output_owner.owner.uid == UID
    assert w.output_runs == {1: p.claim.identity}
    assert f"Pod/{POD}" in w.created
    pod_env = {e["name"]: e.get("value") for e in w.pod(POD)["spec"]["containers"][0]["env"]}
    assert pod_env["TUNELOOP_JOB_UID"] == UID


def test_the_output_is_read_only_when_a_run_would_start() -> None:
    w = running_world()
    reads = w.output_reads
    w.heartbeat = beat()
    w.reconcile()
    w.reconcile()
    assert w.output_reads == reads


def test_another_jobs_output_is_refused_with_a_condition_naming_the_owner() -> None:
    w = World()
    w.output_owner = OwnerRecord(owner=OTHER_JOB, claimed_at="2026-02-01T00:00:00Z")
    p = w.reconcile()
    assert p.create == [] and w.pods == {}
    failed = w.condition(ConditionType.FAILED)
    assert failed.status == "True" and failed.reason == Reason.OUTPUT_OWNED
    assert "FineTuneJob default/other (uid uid-other)" in failed.message
    assert "choose another spec.output.uri" in failed.message
    assert w.condition(ConditionType.READY).status == "False"
    assert w.condition(ConditionType.RUNNING).reason == Reason.OUTPUT_OWNED
    assert [e.reason for e in p.events] == [Reason.OUTPUT_OWNED]
    assert p.requeue_after == pytest.approx(300.0)
    assert w.reconcile().events == []  # said once
    # The other job is deleted and its owner record removed: the next look starts run 1.
    w.output_owner = None
    w.advance(300)
    p = w.reconcile()
    assert p.started_run == 1 and w.condition(ConditionType.FAILED).status == "False"


def test_a_recreated_job_continues_the_lineage_only_with_continue_lineage() -> None:
    w = World()
    w.output_owner = OwnerRecord(owner=PREDECESSOR)
    w.output_runs = {1: PREDECESSOR, 2: PREDECESSOR, 3: PREDECESSOR}
    p = w.reconcile()
    assert p.create == []
    failed = w.condition(ConditionType.FAILED)
    assert failed.reason == Reason.OUTPUT_OWNED and "spec.output.continueLineage: true" in failed.message

    w.edit_spec(lambda spec: spec["output"].update(continueLineage=True))
    p = w.reconcile()
    assert p.started_run == 4, "numbered after the predecessor's runs, never on top of them"
    assert "job-r4-a1-n0" in w.pods
    assert w.output_owner is not None and w.output_owner.owner.uid == UID
    assert w.output_owner.lineage == (PREDECESSOR,)
    assert any("continuing the runs of FineTuneJob default/job (uid uid-deleted-job)" in e.message for e in p.events)
    assert w.condition(ConditionType.FAILED).status == "False"


def test_continue_lineage_does_not_change_what_a_run_trains() -> None:
    w = running_world()
    w.edit_spec(lambda spec: spec["output"].update(continueLineage=True))
    p = w.reconcile()
    assert p.create == [] and not any(e.reason == Reason.SPEC_CHANGED for e in p.events)


def test_a_claim_lost_to_a_race_creates_nothing_and_the_next_run_number_is_used() -> None:
    w = World()
    the_plan = w.plan()
    assert the_plan.claim is not None and the_plan.claim.run == 1
    w.output_owner = OwnerRecord(owner=JobIdentity(namespace="default", name="job", uid=UID))
    w.output_runs[1] = OTHER_JOB  # someone else's run 1 appeared after the prefix was read
    w.apply(the_plan)
    assert w.pods == {} and w.status.current_run is None
    p = w.reconcile()
    assert p.started_run == 2 and "job-r2-a1-n0" in w.pods


def test_an_unreadable_output_starts_nothing_and_is_retried() -> None:
    w = World()
    w.output_error = "access denied to s3://model-bucket/out/owner.json (reading)"
    p = w.reconcile()
    assert p.create == [] and p.requeue_after == pytest.approx(30.0)
    running = w.condition(ConditionType.RUNNING)
    assert running.reason == Reason.OUTPUT_UNAVAILABLE and "access denied" in running.message
    assert [e.reason for e in p.events] == [Reason.OUTPUT_UNAVAILABLE]
    w.output_error = None
    assert w.reconcile().started_run == 1


def test_a_heartbeat_of_another_job_is_never_shown_as_progress() -> None:
    w = running_world()
    w.heartbeat = beat(step=20, total_steps=20, loss=0.01, job_uid="uid-of-another-job")
    w.reconcile()
    current = w.status.current_run
    assert current is not None and current.progress is None
    w.heartbeat = beat(job_uid=None)  # written by a local run (tuneloop run): not this job's either
    w.reconcile()
    current = w.status.current_run
    assert current is not None and current.progress is None


def test_a_spec_change_claims_the_next_run_number() -> None:
    w = running_world()
    w.succeed(POD, json.dumps(SUCCESS))
    w.reconcile()
    w.edit_spec(set_epochs(9))
    p = w.reconcile()
    assert p.claim is not None and p.claim.run == 2 and p.started_run == 2
    assert sorted(w.output_runs) == [1, 2]


# --- honest failures (issue #9) -------------------------------------------------------------------

TRACEBACK_TAIL = """    state_dict = self._load(path)
  File "/usr/lib/python3/site-packages/torch/nn/modules/module.py", line 2581, in load_state_dict
    raise RuntimeError(
        "Error(s) in loading state_dict"
RuntimeError: size mismatch for classifier.weight: copying a param with shape torch.Size([2, 32])"""


def test_a_crash_without_a_summary_is_reported_by_its_exception_line() -> None:
    w = running_world()
    w.fail(POD, 1, TRACEBACK_TAIL.replace("    state_dict", "Traceback (most recent call last):\n    state_dict"))
    p = w.reconcile()
    retry = next(e for e in p.events if e.reason == Reason.RETRYING)
    assert "exited with code 1: RuntimeError: size mismatch for classifier.weight" in retry.message
    assert "module.py" not in retry.message and "raise RuntimeError" not in retry.message
    attempt = w.status.current_run.history[0]  # type: ignore[union-attr]
    assert attempt.message.endswith(
        "RuntimeError: size mismatch for classifier.weight: copying a param with shape torch.Size([2, 32])"
    )


def test_a_failure_is_told_once_in_the_failed_condition() -> None:
    w = running_world()
    w.fail(POD, 11, json.dumps({"result": "Failed", "reason": "InvalidData", "message": "no rows in data.jsonl"}))
    w.reconcile()
    failed = w.condition(ConditionType.FAILED)
    assert "no rows in data.jsonl" in failed.message
    others = [w.condition(t).message for t in (ConditionType.RUNNING, ConditionType.COMPLETE, ConditionType.READY)]
    assert all("no rows in data.jsonl" not in m for m in others), others
    # ... and in Stalled, the condition kstatus (Flux) reports.
    assert w.condition(ConditionType.STALLED).message == failed.message
    assert "see the Failed condition" in w.condition(ConditionType.COMPLETE).message


def test_a_succeeded_run_has_a_message_and_the_loss_is_rounded() -> None:
    w = running_world()
    w.heartbeat = beat(loss=0.6931471805599453, metrics={"accuracy": 0.912345678912})
    w.reconcile()
    progress = w.status.current_run.progress  # type: ignore[union-attr]
    assert progress is not None and progress.loss == 0.6931 and progress.metrics["accuracy"] == 0.912346
    w.succeed(POD, json.dumps(SUCCESS))
    w.reconcile()
    record = w.status.runs[-1]
    assert record.message == "succeeded (accuracy=0.91)"
    assert w.condition(ConditionType.COMPLETE).message.startswith("run 1 succeeded (accuracy=0.91)")


def test_a_trainer_refused_by_the_output_claims_fails_the_run_as_output_owned() -> None:
    w = running_world()
    said = "runs/1 under s3://b/out/ was claimed by FineTuneJob default/job (uid other), not by this job"
    w.fail(POD, 10, json.dumps({"result": "Failed", "reason": "OutputOwned", "message": said}))
    w.reconcile()
    failed = w.condition(ConditionType.FAILED)
    assert failed.reason == Reason.OUTPUT_OWNED and said in failed.message
    assert w.status.current_run is not None and w.status.current_run.failures == 0  # not retried
