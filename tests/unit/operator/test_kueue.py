"""Kueue: the queue label reaches the pods (a pod group for multi-node runs), a job created
suspended starts when it is unsuspended (Kueue's admission), and placement changed while
suspended (a ResourceFlavor's node labels and tolerations) goes to the resumed attempt's pods
without starting a new run."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tuneloop.api import ConditionType, FineTuneJob, Reason
from tuneloop.contract import spec_hash, spec_hashes
from tuneloop_operator.render import (
    KUEUE_POD_GROUP_NAME,
    KUEUE_POD_GROUP_TOTAL_COUNT,
    KUEUE_QUEUE_NAME,
    KUEUE_RETRIABLE_IN_GROUP,
)

from .planner_helpers import World, job_manifest

pytestmark = pytest.mark.unit

QUEUE = "gpu-team-a"
A100 = {"cloud.example.com/gpu": "a100"}
H100 = {"cloud.example.com/gpu": "h100"}
TAINT = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def queued(**spec: Any) -> dict[str, Any]:
    m = job_manifest(**spec)
    m["metadata"].setdefault("labels", {})[KUEUE_QUEUE_NAME] = QUEUE
    return m


def test_the_queue_label_reaches_a_single_pod_without_a_group() -> None:
    w = World(queued())
    w.reconcile()
    pod = w.pod("job-r1-a1-n0")
    assert pod["metadata"]["labels"][KUEUE_QUEUE_NAME] == QUEUE
    assert KUEUE_POD_GROUP_NAME not in pod["metadata"]["labels"]
    assert KUEUE_POD_GROUP_TOTAL_COUNT not in pod["metadata"].get("annotations", {})


def test_a_job_without_a_queue_gets_no_kueue_metadata() -> None:
    w = World(job_manifest(resources={"nodes": 2, "gpus": 1}))
    w.reconcile()
    for pod in w.pods.values():
        assert not any(k.startswith("kueue.x-k8s.io/") for k in pod["metadata"]["labels"])
        assert not any(k.startswith("kueue.x-k8s.io/") for k in pod["metadata"].get("annotations", {}))


def test_the_pods_of_a_multi_node_attempt_form_one_group_per_attempt() -> None:
    w = World(queued(resources={"nodes": 3, "gpus": 1}, backoffLimit=2))
    w.reconcile()
    first = [w.pod(f"job-r1-a1-n{r}") for r in range(3)]
    groups = {p["metadata"]["labels"][KUEUE_POD_GROUP_NAME] for p in first}
    assert groups == {"job-r1-a1"}
    for pod in first:
        assert pod["metadata"]["labels"][KUEUE_QUEUE_NAME] == QUEUE
        annotations = pod["metadata"]["annotations"]
        assert annotations[KUEUE_POD_GROUP_TOTAL_COUNT] == "3"
        assert annotations[KUEUE_RETRIABLE_IN_GROUP] == "false"
    # Rank 0 still announces its metrics beside Kueue's annotations.
    assert first[0]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    # A retry is a new attempt, hence a new group Kueue admits on its own.
    w.start()
    w.reconcile()
    w.fail("job-r1-a1-n1", 1)
    w.reconcile()
    w.finish_deletion()
    for name in list(w.pods):
        if w.pods[name]["status"].get("phase") != "Failed":
            w.remove(name)
    w.advance(3600)
    w.reconcile()
    second = [w.pod(f"job-r1-a2-n{r}") for r in range(3)]
    assert {p["metadata"]["labels"][KUEUE_POD_GROUP_NAME] for p in second} == {"job-r1-a2"}


def test_a_pod_waiting_for_admission_is_pending_not_stuck() -> None:
    w = World(queued())
    w.reconcile()
    pod = w.pod("job-r1-a1-n0")
    pod["spec"]["schedulingGates"] = [{"name": "kueue.x-k8s.io/admission"}]
    pod["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated", "message": "Scheduling is blocked"}
    ]
    p = w.reconcile()
    running = w.condition(ConditionType.RUNNING)
    assert (running.reason, w.phase) == (Reason.POD_PENDING, "Pending")
    assert "to be admitted" in running.message
    assert w.condition(ConditionType.STALLED).status == "False"
    assert w.condition(ConditionType.RECONCILING).status == "True"
    assert [e.reason for e in p.events] == []  # no "cannot start" warning


def test_a_job_created_suspended_is_admitted_by_unsuspending_it_with_the_flavors_placement() -> None:
    w = World(queued(suspend=True))
    w.reconcile()
    assert w.pods == {} and w.phase == "Suspended"
    # Kueue admits the job: it sets the flavor's placement and unsuspends it, in one update.
    w.set_spec(suspend=False, resources={"nodeSelector": A100, "tolerations": TAINT})
    p = w.reconcile()
    assert p.started_run == 1
    spec = w.pod("job-r1-a1-n0")["spec"]
    assert (spec["nodeSelector"], spec["tolerations"]) == (A100, TAINT)


def test_readmission_elsewhere_resumes_the_same_run_on_the_new_nodes() -> None:
    w = World(queued(resources={"nodeSelector": A100, "tolerations": TAINT}))
    w.reconcile()
    w.start()
    w.reconcile()
    before = w.status.current_run
    assert before is not None
    # Kueue preempts (suspends) the job, then admits it again on another flavor.
    w.set_spec(suspend=True)
    w.reconcile()
    assert "job-r1-a1-n0" not in w.pods
    w.set_spec(suspend=False, resources={"nodeSelector": H100})
    p = w.reconcile()
    assert p.started_run is None and [e.reason for e in p.events] == [Reason.RESUMED]
    current = w.status.current_run
    assert current is not None and (current.number, current.spec_hash) == (1, before.spec_hash)
    assert [(a.number, a.cause) for a in current.history] == [(1, "Started"), (2, "Resumed")]
    spec = w.pod("job-r1-a2-n0")["spec"]
    assert spec["nodeSelector"] == H100
    assert "tolerations" not in spec  # the new flavor has no taint to tolerate
    # The run's ConfigMap (what the trainer reads) is the one it started with.
    assert [c for c in w.created if c.startswith("ConfigMap/")] == ["ConfigMap/job-r1-config"]
    trained = json.loads(w.config_maps["job-r1-config"]["data"]["job.json"])
    assert trained["spec"]["resources"]["nodeSelector"] == A100
    # And after the run, the placement change starts no new run.
    w.start()
    w.succeed("job-r1-a2-n0", json.dumps({"result": "Succeeded", "metrics": {}, "modelUri": "s3://b/m"}))
    w.reconcile()
    assert w.reconcile().started_run is None


def test_placement_is_not_part_of_what_a_run_trains() -> None:
    base = FineTuneJob.model_validate(job_manifest())
    placed = FineTuneJob.model_validate(job_manifest(resources={"nodeSelector": H100, "tolerations": TAINT}))
    bigger = FineTuneJob.model_validate(job_manifest(resources={"nodeSelector": H100, "gpus": 2}))
    assert spec_hash(base.spec) == spec_hash(placed.spec)
    assert spec_hash(base.spec) != spec_hash(bigger.spec)


def test_an_upgrade_does_not_retrain_jobs_whose_run_was_hashed_with_their_placement() -> None:
    # 0.1 operators hashed nodeSelector/tolerations with the rest of the spec. A finished run
    # recorded that way must not look like a spec change to the upgraded operator.
    w = World(queued(resources={"nodeSelector": A100, "tolerations": TAINT}))
    w.reconcile()
    w.start()
    w.succeed("job-r1-a1-n0", json.dumps({"result": "Succeeded", "metrics": {}, "modelUri": "s3://b/m"}))
    w.reconcile()
    current = w.status.current_run
    assert current is not None and current.result is not None
    job = FineTuneJob.model_validate(w.body)
    (legacy,) = spec_hashes(job.spec) - {spec_hash(job.spec)}
    assert w.body["status"]["currentRun"]["specHash"] == spec_hash(job.spec)
    w.body["status"]["currentRun"]["specHash"] = legacy  # as the 0.1 operator recorded it
    assert w.reconcile().started_run is None
    assert w.reconcile().started_run is None
    # A real change of what is trained still starts a run.
    w.set_spec(resources={"nodeSelector": A100, "tolerations": TAINT, "gpus": 2})
    assert w.reconcile().started_run == 2
