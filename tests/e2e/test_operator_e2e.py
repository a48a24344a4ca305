"""End to end: manifest → operator → pod → real trainer → S3 → status.

Every test runs the real operator (``python -m tuneloop_operator``, a subprocess) against the
API emulator, a local kubelet that runs the trainer pods as processes, and the moto S3 server.
The trainer trains a tiny BERT on generated reviews; its pods reach S3 with credentials that
exist only in a Secret (the pods get them by ``secretKeyRef``, the operator reads them to
follow the heartbeat), and the Secret's value is a canary that must never show up elsewhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.k8s_fixtures import K8sApi
from tests.harness.kubelet import LocalKubelet
from tests.harness.operator import OperatorProcess
from tests.harness.s3 import S3Harness
from tests.harness.trainer_jobs import rows_for, write_jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

API = "tuneloop.dev/v1alpha1"
KIND = "FineTuneJob"
NS = "default"
SECRET = "s3-credentials"
#: The Secret's value: it must reach the trainer's environment and nowhere else.
CANARY = "canary-Zq8xv3Lr0tY7wPb2"


@pytest.fixture
def secret(k8s_api: K8sApi) -> None:
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NS},
            "stringData": {"AWS_ACCESS_KEY_ID": "tuneloop-test", "AWS_SECRET_ACCESS_KEY": CANARY},
        }
    )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "reviews.jsonl", rows_for("sequence-classification", "text", n=80))


def kubelet_for(k8s_api: K8sApi, tmp_path: Path, step_delay: float = 0.0) -> LocalKubelet:
    return LocalKubelet(
        k8s_api,
        tmp_path / "kubelet",
        env_overrides={
            "TUNELOOP_METRICS_PORT": "",  # several trainers share this host's ports
            "TUNELOOP_FAULT_STEP_DELAY": str(step_delay),
            "HF_HUB_OFFLINE": "1",
            "TUNELOOP_LOG_LEVEL": "INFO",
        },
    )


@pytest.fixture
def kubelet(k8s_api: K8sApi, tmp_path: Path) -> Iterator[LocalKubelet]:
    """Trainer steps slowed to 0.25 s, so that tests can act mid-run. Pods are deleted
    gracefully, as on a real cluster: a deleted pod stays Terminating (deletionTimestamp set,
    still running) until its trainer has stopped and the kubelet removes it."""
    k8s_api.call(setattr, k8s_api.emulator, "graceful_pod_deletion", True)
    try:
        with kubelet_for(k8s_api, tmp_path, step_delay=0.25) as kubelet:
            yield kubelet
    finally:
        k8s_api.call(setattr, k8s_api.emulator, "graceful_pod_deletion", False)
    assert not kubelet.errors, kubelet.errors


@dataclass
class World:
    """A cluster for one test: API, operator, kubelet, S3, a tiny model and data."""

    k8s: K8sApi
    operator: OperatorProcess
    kubelet: LocalKubelet
    s3: S3Harness
    model_dir: Path
    data: Path
    tmp: Path

    def job(self, name: str, *, data: Path | None = None, **spec: Any) -> dict[str, Any]:
        return job_manifest(name, self.model_dir, data or self.data, self.s3, **spec)


@pytest.fixture
def world(request: pytest.FixtureRequest, secret: None, data: Path, tiny_model_dir: Any, tmp_path: Path) -> World:
    del secret
    get = request.getfixturevalue
    return World(get("k8s_api"), get("operator"), get("kubelet"), get("s3"), tiny_model_dir("bert"), data, tmp_path)


def job_manifest(name: str, model_dir: Path, data: Path, s3: S3Harness, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "sequence-classification",
        "model": {"uri": f"file://{model_dir}"},
        "dataset": {"uri": f"file://{data}", "split": {"validation": 0.15, "test": 0.15}, "screening": {"pii": "off"}},
        "method": {"type": "full"},
        "hyperparameters": {"epochs": 3, "batchSize": 8, "maxSeqLength": 48, "learningRate": 5e-3, "seed": 1},
        "output": {"uri": s3.uri(f"jobs/{name}/"), "checkpoint": {"everySteps": 2, "keep": 2}},
        "storage": {"endpoint": s3.endpoint_url, "region": "us-east-1", "secretRef": {"name": SECRET}},
        "resources": {"gpus": 0},
        "backoffLimit": 2,
    }
    body.update(spec)
    return {"apiVersion": API, "kind": KIND, "metadata": {"name": name, "namespace": NS}, "spec": body}


def status_of(k8s_api: K8sApi, name: str) -> dict[str, Any]:
    return dict((k8s_api.get(API, KIND, name, NS) or {}).get("status") or {})


def wait_status(
    k8s_api: K8sApi, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0, what: str = ""
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = status_of(k8s_api, name)
        if predicate(status):
            return status
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or 'a status'}; last status:\n{json.dumps(status, indent=1)}")


def phase_is(*phases: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s.get("phase") in phases


def checkpointed(status: dict[str, Any]) -> bool:
    return bool(((status.get("currentRun") or {}).get("lastCheckpoint") or {}).get("step"))


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def pods_of(k8s_api: K8sApi, name: str) -> list[str]:
    pods = k8s_api.list("v1", "Pod", NS, label_selector=f"tuneloop.dev/job={name}")
    return sorted(p["metadata"]["name"] for p in pods)


def stopped(k8s_api: K8sApi, kubelet: LocalKubelet, pod: str) -> None:
    """Wait until the pod is gone from the API and its process has ended."""
    k8s_api.wait_for(
        lambda: k8s_api.get("v1", "Pod", pod, NS) is None and (NS, pod) not in kubelet.processes,
        timeout=30,
        message=f"pod {pod} to be deleted and its process to end",
    )


def events_of(k8s_api: K8sApi, name: str) -> list[tuple[str, str, str]]:
    events = [e for e in k8s_api.list("v1", "Event", NS) if (e.get("involvedObject") or {}).get("name") == name]
    return [(e["type"], e["reason"], e["message"]) for e in events]


# --- the proof --------------------------------------------------------------------------


def test_a_job_trains_to_succeeded_with_its_model_in_s3_and_no_secret_anywhere(world: World) -> None:
    k8s_api, operator, kubelet, s3 = world.k8s, world.operator, world.kubelet, world.s3
    k8s_api.create(world.job("sentiment"))
    running = wait_status(
        k8s_api,
        "sentiment",
        lambda s: ((s.get("currentRun") or {}).get("progress") or {}).get("step", 0) > 0,
        what="progress from the heartbeat",
    )
    progress = running["currentRun"]["progress"]
    assert progress["totalSteps"] == 21 and progress["loss"] is not None
    assert running["phase"] in ("Running", "Evaluating")

    done = wait_status(k8s_api, "sentiment", phase_is("Succeeded", "Failed"), what="the end of the run")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
    run = done["currentRun"]
    assert run["number"] == 1 and run["attempts"] == 1 and run["failures"] == 0 and run["result"] == "Succeeded"
    record = done["runs"][-1]
    assert record["result"] == "Succeeded"
    assert record["modelUri"].rstrip("/") == s3.uri("jobs/sentiment/runs/1/model")
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
    assert done["metric"].startswith("accuracy=")
    for type_, want in (("Complete", "True"), ("Ready", "True"), ("Failed", "False"), ("DataValid", "True")):
        assert condition(done, type_)["status"] == want, type_
    assert done["observedGeneration"] == 1

    # The model loads from S3.
    from transformers import AutoModelForSequenceClassification

    model_dir = world.tmp / "downloaded"
    s3.download("jobs/sentiment/runs/1/model/", model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert model.config.num_labels == 2

    # kubectl shows the columns filled in.
    table = k8s_api.kubectl("get", "ftj", "sentiment").stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "RUN", "PROGRESS", "LOSS", "PROMOTED", "METRIC", "AGE"]
    cells = row.split()
    assert cells[1:3] == ["Succeeded", "1"] and cells[3] == "100" and cells[5] == "1" and cells[6] == done["metric"]
    # The run passed (no gates): promoted, with the pointer serving stacks read.
    assert done["promoted"]["run"] == 1 and condition(done, "Promoted")["status"] == "True"
    pointer = json.loads(s3.get_bytes("jobs/sentiment/promoted.json"))
    assert pointer["format"] == "tuneloop-promoted/1" and pointer["run"] == 1
    assert pointer["modelUri"].rstrip("/") == s3.uri("jobs/sentiment/runs/1/model")

    # The operator patches the status, then posts the event.
    k8s_api.wait_for(
        lambda: "Succeeded" in [r for _, r, _ in events_of(k8s_api, "sentiment")], message="a Succeeded event"
    )
    assert "RunStarted" in [r for _, r, _ in events_of(k8s_api, "sentiment")]

    # Operator metrics.
    assert operator.metric("tuneloop_operator_runs_started_total", {"trigger": "Created"}) == 1
    assert operator.metric("tuneloop_operator_runs_succeeded_total") == 1
    assert operator.metric("tuneloop_operator_jobs", {"phase": "Succeeded"}) == 1
    assert operator.metric("tuneloop_operator_heartbeat_read_errors_total") == 0

    # The canary: in the trainer's environment by reference only, nowhere the operator writes.
    pod = k8s_api.get("v1", "Pod", "sentiment-r1-a1-n0", NS)
    assert pod is not None
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET,
        "key": "AWS_SECRET_ACCESS_KEY",
        "optional": False,
    }
    job = k8s_api.get(API, KIND, "sentiment", NS)
    places = {
        "job (status, annotations)": json.dumps(job),
        "events": json.dumps(k8s_api.list("v1", "Event", NS)),
        "pods": json.dumps(k8s_api.list("v1", "Pod", NS)),
        "configmaps": json.dumps(k8s_api.list("v1", "ConfigMap", NS)),
        "operator log": operator.logs(),
        "trainer log": kubelet.logs(NS, "sentiment-r1-a1-n0"),
    }
    assert "tuneloop.dev/last-handled-configuration" in job["metadata"]["annotations"]
    leaks = [where for where, text in places.items() if CANARY in text]
    assert leaks == []


def test_preemption_resumes_from_the_checkpoint_without_using_the_backoff_limit(world: World) -> None:
    k8s_api, operator, kubelet = world.k8s, world.operator, world.kubelet
    k8s_api.create(world.job("preempt", backoffLimit=0))
    mid = wait_status(k8s_api, "preempt", checkpointed, what="a complete checkpoint")
    saved = mid["currentRun"]["lastCheckpoint"]["step"]
    kubelet.evict(NS, "preempt-r1-a1-n0", reason="Preempted")

    done = wait_status(k8s_api, "preempt", phase_is("Succeeded", "Failed"), what="the end of the run")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
    run = done["currentRun"]
    assert run["preemptions"] == 1 and run["failures"] == 0  # backoffLimit 0 and still no failure
    assert [(a["number"], a["cause"], a["reason"]) for a in run["history"]] == [
        (1, "Started", "Preempted"),
        (2, "Preempted", "Succeeded"),
    ]
    assert "PreemptionByScheduler" in run["history"][0]["message"]
    log = kubelet.logs(NS, "preempt-r1-a2-n0")
    assert "resumed from the checkpoint at step" in log
    resumed_at = int(log.split("resumed from the checkpoint at step")[1].split()[0].strip(".,:;"))
    assert resumed_at >= saved  # continued, not restarted
    assert pods_of(k8s_api, "preempt") == ["preempt-r1-a1-n0", "preempt-r1-a2-n0"] or pods_of(k8s_api, "preempt") == [
        "preempt-r1-a2-n0"
    ]
    assert any(r == "Preempted" for _, r, _ in events_of(k8s_api, "preempt"))
    assert operator.metric("tuneloop_operator_preemptions_total") == 1
    assert operator.metric("tuneloop_operator_retries_total") == 0


def test_a_pod_whose_node_never_answers_again_is_replaced_after_a_bounded_wait(world: World) -> None:
    # The pod's node goes silent; someone deletes the pod with a 1 s grace period; with nobody to
    # confirm, it stays Terminating for good. The operator (TUNELOOP_STUCK_TERMINATING_SECONDS is
    # 2 in tests) replaces it 2 s after that grace period, and the new attempt resumes.
    k8s_api, kubelet = world.k8s, world.kubelet
    k8s_api.create(world.job("silent"))
    wait_status(k8s_api, "silent", checkpointed, what="a complete checkpoint")
    kubelet.cut_off(NS, "silent-r1-a1-n0")
    deleted = k8s_api.request(
        "DELETE", f"/api/v1/namespaces/{NS}/pods/silent-r1-a1-n0", params={"gracePeriodSeconds": 1}
    )
    assert deleted.status_code == 200 and deleted.json()["metadata"]["deletionTimestamp"]

    done = wait_status(k8s_api, "silent", phase_is("Succeeded", "Failed"), what="the end of the run")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
    run = done["currentRun"]
    assert (run["preemptions"], run["failures"]) == (1, 0)
    assert run["history"][0]["message"] == "pod silent-r1-a1-n0 was deleted"
    stuck = k8s_api.get("v1", "Pod", "silent-r1-a1-n0", NS)
    assert stuck is not None and stuck["status"]["phase"] == "Running"  # still Terminating: never force-deleted
    assert [m for _, r, m in events_of(k8s_api, "silent") if r == "PodStuck" and "silent-r1-a1-n0 is still" in m]
    assert "resumed from the checkpoint at step" in kubelet.logs(NS, "silent-r1-a2-n0")


def test_a_permanent_data_error_fails_once_without_retry_and_is_cleaned_up_after_its_ttl(world: World) -> None:
    k8s_api, operator = world.k8s, world.operator
    bad = write_jsonl(world.tmp / "bad.jsonl", [{"text": f"row {i}", "label": "maybe"} for i in range(3)])
    k8s_api.create(world.job("baddata", data=bad, ttlSecondsAfterFinished=3))
    done = wait_status(k8s_api, "baddata", phase_is("Succeeded", "Failed"), what="the end of the run")
    assert done["phase"] == "Failed"
    failed = condition(done, "Failed")
    assert failed["reason"] == "InvalidData" and "not retried" in failed["message"]
    assert condition(done, "DataValid")["status"] == "False"
    run = done["currentRun"]
    assert run["attempts"] == 1 and run["history"][0]["exitCode"] == 11
    assert pods_of(k8s_api, "baddata") == ["baddata-r1-a1-n0"]  # kept for `kubectl logs` until the TTL
    # ttlSecondsAfterFinished: the pod and the ConfigMap go, what is in S3 stays.
    # (The operator deletes, then posts the event: wait for each, not for the first.)
    k8s_api.wait_for(
        lambda: (
            not pods_of(k8s_api, "baddata")
            and not k8s_api.list("v1", "ConfigMap", NS, label_selector="tuneloop.dev/job=baddata")
        ),
        timeout=30,
        message="the TTL cleanup",
    )
    cleaned = k8s_api.wait_for(
        lambda: [m for _, r, m in events_of(k8s_api, "baddata") if r == "CleanedUp"], message="a CleanedUp event"
    )
    assert len(cleaned) == 1 and "are kept" in cleaned[0]
    assert world.s3.list_keys("jobs/baddata/runs/1/")  # the validation report is still there
    time.sleep(1.5)  # several reconciles later: no retry, nothing new
    assert pods_of(k8s_api, "baddata") == []
    after = status_of(k8s_api, "baddata")
    assert after["currentRun"]["attempts"] == 1 and after["phase"] == "Failed"
    assert operator.metric("tuneloop_operator_runs_failed_total", {"reason": "InvalidData"}) == 1


def test_repeated_crashes_end_in_backoff_limit_exceeded(world: World) -> None:
    k8s_api, operator, kubelet = world.k8s, world.operator, world.kubelet
    k8s_api.create(world.job("crashy", backoffLimit=1))
    for attempt in (1, 2):
        pod = f"crashy-r1-a{attempt}-n0"
        kubelet.wait_for_phase(NS, pod, "Running", timeout=60)
        kubelet.kill(NS, pod, oom=True)  # an out-of-memory kill: retryable
    done = wait_status(k8s_api, "crashy", phase_is("Failed", "Succeeded"), what="the end of the run")
    assert done["phase"] == "Failed", json.dumps(done, indent=1)
    assert condition(done, "Failed")["reason"] == "BackoffLimitExceeded"
    run = done["currentRun"]
    assert run["failures"] == 2 and run["attempts"] == 2
    assert [(a["cause"], a["reason"], a["exitCode"]) for a in run["history"]] == [
        ("Started", "TrainerFailed", 137),
        ("Retry", "TrainerFailed", 137),
    ]
    assert pods_of(k8s_api, "crashy") == ["crashy-r1-a1-n0", "crashy-r1-a2-n0"]
    assert operator.metric("tuneloop_operator_retries_total") == 1


def test_the_active_deadline_fails_the_run_and_stops_its_pods(world: World) -> None:
    k8s_api, kubelet = world.k8s, world.kubelet
    k8s_api.create(world.job("slow", activeDeadlineSeconds=4))
    done = wait_status(k8s_api, "slow", phase_is("Failed", "Succeeded"), what="the end of the run")
    assert done["phase"] == "Failed"
    assert condition(done, "Failed")["reason"] == "DeadlineExceeded"
    stopped(k8s_api, kubelet, "slow-r1-a1-n0")  # deleted and its process stopped, not left running
    assert done["currentRun"]["history"][-1]["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds (4s)" in condition(done, "Failed")["message"]


def test_suspend_deletes_the_pods_and_resume_continues_from_the_checkpoint(world: World) -> None:
    k8s_api, kubelet = world.k8s, world.kubelet
    k8s_api.create(world.job("pausable", activeDeadlineSeconds=600))
    wait_status(k8s_api, "pausable", checkpointed, what="a complete checkpoint")
    pod = k8s_api.get("v1", "Pod", "pausable-r1-a1-n0", NS) or {}
    assert pod["spec"]["nodeName"] == "local-node"  # bound, so deleted gracefully
    k8s_api.patch(API, KIND, "pausable", {"spec": {"suspend": True}}, NS)
    suspended = wait_status(k8s_api, "pausable", phase_is("Suspended"), what="Suspended")
    assert condition(suspended, "Suspended")["status"] == "True"
    stopped(k8s_api, kubelet, "pausable-r1-a1-n0")
    assert "checkpoint saved" in kubelet.logs(NS, "pausable-r1-a1-n0")  # SIGTERM: one last checkpoint
    # As on a cluster: the pod was Terminating (still running) while the trainer checkpointed,
    # then reported its exit (143) and was removed.
    replay = k8s_api.watch(
        f"/api/v1/namespaces/{NS}/pods",
        timeout=0.2,
        resourceVersion=pod["metadata"]["resourceVersion"],
        fieldSelector="metadata.name=pausable-r1-a1-n0",
    )
    terminating = [e for e in replay if e["object"]["metadata"].get("deletionTimestamp")]
    assert terminating[0]["object"]["status"]["phase"] == "Running"
    assert terminating[-1]["type"] == "DELETED"
    final = terminating[-1]["object"]["status"]
    assert final["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 143
    time.sleep(1.5)
    assert pods_of(k8s_api, "pausable") == []  # no new pod while suspended

    k8s_api.patch(API, KIND, "pausable", {"spec": {"suspend": False}}, NS)
    done = wait_status(k8s_api, "pausable", phase_is("Succeeded", "Failed"), what="the end of the run")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
    run = done["currentRun"]
    assert run["number"] == 1  # the same run, not a new one
    assert [(a["cause"], a["reason"]) for a in run["history"]] == [("Started", "Suspended"), ("Resumed", "Succeeded")]
    assert run["suspendedSeconds"] >= 1 and run["failures"] == 0
    assert condition(done, "Suspended")["status"] == "False"
    assert "resumed from the checkpoint at step" in kubelet.logs(NS, "pausable-r1-a2-n0")


def test_deleting_a_job_removes_its_pods_and_keeps_its_artifacts(world: World) -> None:
    k8s_api, s3 = world.k8s, world.s3
    k8s_api.create(world.job("doomed"))
    wait_status(k8s_api, "doomed", checkpointed, what="a complete checkpoint")
    k8s_api.delete(API, KIND, "doomed", NS)
    k8s_api.wait_for(lambda: k8s_api.get(API, KIND, "doomed", NS) is None, timeout=30, message="the job to go")
    k8s_api.wait_for(lambda: not pods_of(k8s_api, "doomed"), timeout=30, message="the pods to go")
    assert not k8s_api.list("v1", "ConfigMap", NS, label_selector="tuneloop.dev/job=doomed")
    retained = [m for _, r, m in events_of(k8s_api, "doomed") if r == "ArtifactsRetained"]
    assert retained and s3.uri("jobs/doomed/") in retained[0]
    assert any(k.startswith("jobs/doomed/runs/1/checkpoints/") for k in s3.list_keys("jobs/doomed/"))


def test_an_operator_killed_mid_run_comes_back_without_twins(world: World) -> None:
    k8s_api, operator = world.k8s, world.operator
    k8s_api.create(world.job("sturdy"))
    wait_status(k8s_api, "sturdy", checkpointed, what="a complete checkpoint")
    operator.kill()
    time.sleep(1)
    operator.start()
    done = wait_status(k8s_api, "sturdy", phase_is("Succeeded", "Failed"), what="the end of the run")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
    assert pods_of(k8s_api, "sturdy") == ["sturdy-r1-a1-n0"]  # no duplicate pod
    assert done["currentRun"]["attempts"] == 1
    assert len([r for _, r, _ in events_of(k8s_api, "sturdy") if r == "RunStarted"]) == 1


def test_an_invalid_spec_creates_no_pod_and_says_which_field(world: World) -> None:
    k8s_api = world.k8s
    # A gate on a metric the task does not compute: the CRD schema cannot see it, the operator does.
    manifest = world.job("invalid", promotion={"gates": [{"metric": "rouge1", "min": 0.2}]})
    k8s_api.create(manifest)
    status = wait_status(k8s_api, "invalid", phase_is("Failed"), timeout=30, what="Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.promotion.gates[0].metric" in failed["message"]
    time.sleep(1.5)
    assert pods_of(k8s_api, "invalid") == []
    warnings = [(t, r) for t, r, _ in events_of(k8s_api, "invalid")]
    assert warnings == [("Warning", "InvalidSpec")]


def test_a_pod_that_cannot_pull_its_image_is_reported_with_the_pods_reason(world: World) -> None:
    k8s_api = world.k8s
    manifest = world.job("pull")
    manifest["spec"]["resources"]["image"] = "registry.example/does-not-exist:1"
    k8s_api.create(manifest)
    status = wait_status(
        k8s_api, "pull", lambda s: condition(s, "Running").get("reason") == "PodStuck", timeout=30, what="PodStuck"
    )
    message = condition(status, "Running")["message"]
    assert "pull-r1-a1-n0" in message and ("ErrImagePull" in message or "ImagePullBackOff" in message)
    # The ticker looks at the job every 0.5 s; with nothing new, the status is not written again.
    k8s_api.wait_for(lambda: "ImagePullBackOff" in condition(status_of(k8s_api, "pull"), "Running")["message"])
    version = (k8s_api.get(API, KIND, "pull", NS) or {})["metadata"]["resourceVersion"]
    time.sleep(2)
    assert (k8s_api.get(API, KIND, "pull", NS) or {})["metadata"]["resourceVersion"] == version
    stuck_events = [m for _, r, m in events_of(k8s_api, "pull") if r == "PodStuck"]
    assert 1 <= len(stuck_events) <= 2  # one per distinct message (ErrImagePull, then ImagePullBackOff)


def test_a_two_node_run_trains_as_one_and_is_retried_as_one(world: World) -> None:
    k8s_api, kubelet = world.k8s, world.kubelet
    manifest = world.job("duo", backoffLimit=1)
    manifest["spec"]["resources"] = {"gpus": 0, "nodes": 2}
    k8s_api.create(manifest)
    k8s_api.wait_for(lambda: k8s_api.get("v1", "Service", "duo-r1", NS), message="the headless Service")
    wait_status(k8s_api, "duo", checkpointed, timeout=180, what="a complete checkpoint")
    kubelet.kill(NS, "duo-r1-a1-n1")  # one rank crashes: the whole attempt is retried
    done = wait_status(k8s_api, "duo", phase_is("Succeeded", "Failed"), timeout=240, what="the end of the run")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
    run = done["currentRun"]
    assert run["failures"] == 1 and run["attempts"] == 2
    assert run["history"][0]["reason"] == "TrainerFailed" and run["history"][1]["cause"] == "Retry"
    assert sorted(run["pods"]) == ["duo-r1-a2-n0", "duo-r1-a2-n1"]
    assert "resumed from the checkpoint at step" in kubelet.logs(NS, "duo-r1-a2-n0")
    assert done["runs"][-1]["metrics"]["accuracy"] >= 0.0


@pytest.mark.usefixtures("secret")  # the operator reads the output with it before creating pods
def test_a_pod_the_api_server_refuses_is_reported_and_retried_slowly(
    k8s_api: K8sApi, operator: OperatorProcess, tiny_model_dir: Any, data: Path, s3: S3Harness
) -> None:
    # An admission refusal (quota, policy) of every pod create: an event says so, the job is not
    # marked as started, and the operator does not hammer the API server.
    def refuse() -> None:
        k8s_api.emulator["post", "/api/v1/namespaces/default/pods"] << 403

    k8s_api.call(refuse)
    k8s_api.create(job_manifest("refused", tiny_model_dir("bert"), data, s3))
    k8s_api.wait_for(
        lambda: [m for _, r, m in events_of(k8s_api, "refused") if r == "PodCreateFailed"],
        timeout=30,
        message="a PodCreateFailed event",
    )
    (_, _, message), *more = [e for e in events_of(k8s_api, "refused") if e[1] == "PodCreateFailed"]
    assert "refused Pod refused-r1-a1-n0" in message
    time.sleep(3)
    assert len([e for e in events_of(k8s_api, "refused") if e[1] == "PodCreateFailed"]) == 1  # retried after 30 s
    assert "currentRun" not in status_of(k8s_api, "refused")  # nothing recorded as started
    assert not more


def test_jobs_never_share_an_output_and_a_recreated_job_continues_only_when_asked(world: World) -> None:
    """Issue #9: a second job on the same output.uri resumed and overwrote the first job's run 1;
    `kubectl delete` + re-apply resumed the old checkpoint with the old optimizer state."""
    k8s_api, s3 = world.k8s, world.s3
    first = world.job("tiny")
    k8s_api.create(first)
    done = wait_status(k8s_api, "tiny", phase_is("Succeeded", "Failed"), what="the first job's run")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
    uid = k8s_api.get(API, KIND, "tiny", NS)["metadata"]["uid"]
    model_key = "jobs/tiny/runs/1/model/model.safetensors"
    model_before = s3.get_bytes(model_key)
    owner = json.loads(s3.get_bytes("jobs/tiny/owner.json"))
    assert owner["owner"] == {"namespace": NS, "name": "tiny", "uid": uid}

    # Another job, same output: refused, named, no pod.
    copycat = world.job("copycat")
    copycat["spec"]["output"]["uri"] = first["spec"]["output"]["uri"]
    k8s_api.create(copycat)
    refused = wait_status(
        k8s_api, "copycat", lambda s: condition(s, "Failed").get("reason") == "OutputOwned", what="OutputOwned"
    )
    assert f"FineTuneJob {NS}/tiny (uid {uid})" in condition(refused, "Failed")["message"]
    assert pods_of(k8s_api, "copycat") == []
    k8s_api.wait_for(
        lambda: "OutputOwned" in [r for _, r, _ in events_of(k8s_api, "copycat")], message="an OutputOwned event"
    )

    # Delete tiny, apply it again with new hyperparameters: refused until continueLineage is set.
    k8s_api.delete(API, KIND, "tiny", NS)
    k8s_api.wait_for(lambda: k8s_api.get(API, KIND, "tiny", NS) is None, timeout=30, message="tiny to go")
    again = world.job("tiny")
    again["spec"]["hyperparameters"]["learningRate"] = 1e-3
    k8s_api.create(again)
    refused = wait_status(
        k8s_api, "tiny", lambda s: condition(s, "Failed").get("reason") == "OutputOwned", what="OutputOwned"
    )
    assert "continueLineage: true" in condition(refused, "Failed")["message"]
    assert pods_of(k8s_api, "tiny") == []
    k8s_api.patch(API, KIND, "tiny", {"spec": {"output": {"continueLineage": True}}}, NS)
    done = wait_status(
        k8s_api,
        "tiny",
        lambda s: (s.get("currentRun") or {}).get("result") is not None,
        what="the re-created job's run",
    )
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
    assert done["currentRun"]["number"] == 2, "numbered after the predecessor's run, never on top of it"
    log = world.kubelet.logs(NS, "tiny-r2-a1-n0")
    assert "resumed from" not in log
    assert s3.get_bytes(model_key) == model_before, "the predecessor's model is untouched"
    owner = json.loads(s3.get_bytes("jobs/tiny/owner.json"))
    assert owner["owner"]["uid"] != uid and owner["lineage"] == [{"namespace": NS, "name": "tiny", "uid": uid}]
    # copycat is still refused, now naming the new owner.
    refused = wait_status(k8s_api, "copycat", lambda s: condition(s, "Failed").get("reason") == "OutputOwned")
    assert pods_of(k8s_api, "copycat") == []


# --- the loop (issue #10) ---------------------------------------------------------------------------


def upload_rows(s3: S3Harness, key: str, start: int, count: int) -> None:
    rows = rows_for("sequence-classification", "text", n=start + count)[start:]
    s3.put_bytes(key, "".join(json.dumps(r) + "\n" for r in rows).encode())


def run_number_is(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: (s.get("currentRun") or {}).get("number") == n and bool((s.get("currentRun") or {}).get("result"))


def test_new_data_in_s3_starts_one_run_and_never_twice_for_the_same_objects(world: World) -> None:
    k8s_api, s3, operator = world.k8s, world.s3, world.operator
    upload_rows(s3, "data/fresh/part-000.jsonl", 0, 80)
    job = world.job(
        "fresh",
        retrain={
            "onNewData": {"minNewSamples": 20, "pollInterval": "2s", "settlePeriod": "2s"},
            "cooldown": "1s",
        },
    )
    job["spec"]["dataset"]["uri"] = s3.uri("data/fresh/")
    k8s_api.create(job)
    done = wait_status(k8s_api, "fresh", run_number_is(1), what="run 1")
    assert done["currentRun"]["result"] == "Succeeded", json.dumps(done, indent=1)
    listing = json.loads(s3.get_bytes("jobs/fresh/runs/1/data-listing.json"))
    assert listing["format"] == "tuneloop-data-listing/1"

    # A few rows: counted, said, no run.
    upload_rows(s3, "data/fresh/part-001.jsonl", 80, 5)
    wait_status(
        k8s_api,
        "fresh",
        lambda _: any("5 new rows" in m for _, r, m in events_of(k8s_api, "fresh") if r == "TriggerSkipped"),
        timeout=60,
        what="a TriggerSkipped event for 5 rows",
    )
    # A burst of uploads: one run, with the row delta.
    for i in range(2, 12):
        upload_rows(s3, f"data/fresh/part-{i:03d}.jsonl", 80 + 3 * i, 3)
    started = wait_status(k8s_api, "fresh", lambda s: (s.get("currentRun") or {}).get("number") == 2, what="run 2")
    current = started["currentRun"]
    assert current["trigger"] == "NewData"
    assert current["triggerDetail"].startswith("35 new rows in 11 new or changed object(s) since run 1"), current
    wait_status(k8s_api, "fresh", run_number_is(2), what="the end of run 2")
    # The operator restarts between polls: the same objects never start another run.
    operator.kill()
    operator.start()
    time.sleep(8)
    status = status_of(k8s_api, "fresh")
    assert status["currentRun"]["number"] == 2, json.dumps(status, indent=1)
    assert status["triggers"]["newData"]["watermarkRun"] == 2


def test_drift_reported_by_a_real_prometheus_starts_one_run(world: World, prometheus: Any) -> None:
    k8s_api = world.k8s
    score = prometheus.gauge("tuneloop_e2e_drift_score", ["finetunejob"])
    score.labels(finetunejob="drifty").set(0.1)
    prometheus.wait_for_value('tuneloop_e2e_drift_score{finetunejob="drifty"}', 0.1)
    drift = {
        "prometheus": {
            "url": prometheus.url,
            "query": 'max(tuneloop_e2e_drift_score{finetunejob="drifty"})',
            "threshold": 0.5,
            "for": "3s",
            "pollInterval": "1s",
        }
    }
    k8s_api.create(world.job("drifty", retrain={"onDrift": drift, "cooldown": "1s"}))
    done = wait_status(k8s_api, "drifty", run_number_is(1), what="run 1")
    assert done["currentRun"]["result"] == "Succeeded"
    assert done["triggers"]["drift"]["value"] == 0.1
    assert condition(done, "TriggersHealthy")["status"] == "True"
    score.labels(finetunejob="drifty").set(0.9)
    started = wait_status(
        k8s_api, "drifty", lambda s: (s.get("currentRun") or {}).get("number") == 2, timeout=60, what="run 2"
    )
    assert started["currentRun"]["trigger"] == "Drift"
    assert "drift 0.9 above 0.5" in started["currentRun"]["triggerDetail"]
    score.labels(finetunejob="drifty").set(0.1)
    wait_status(k8s_api, "drifty", run_number_is(2), what="the end of run 2")
    time.sleep(6)
    assert status_of(k8s_api, "drifty")["currentRun"]["number"] == 2, "one run for one drift"


def test_approval_promotes_and_a_failed_gate_keeps_the_promoted_model(world: World) -> None:
    k8s_api, s3 = world.k8s, world.s3
    job = world.job(
        "guarded",
        promotion={"gates": [{"metric": "accuracy", "minImprovement": -1.0}], "requireApproval": True},
    )
    k8s_api.create(job)
    waiting = wait_status(k8s_api, "guarded", lambda s: bool(s.get("awaitingApproval")), what="awaiting approval")
    assert waiting["awaitingApproval"]["run"] == 1 and "promoted" not in waiting
    # At rest, waiting for a person: Ready (kstatus Current), so a GitOps health check does not hang.
    assert (condition(waiting, "Ready")["status"], condition(waiting, "Ready")["reason"]) == (
        "True",
        "AwaitingApproval",
    )
    k8s_api.patch(API, KIND, "guarded", {"metadata": {"annotations": {"tuneloop.dev/approve": "1"}}}, NS)
    promoted = wait_status(k8s_api, "guarded", lambda s: bool(s.get("promoted")), what="promotion")
    assert promoted["promoted"]["run"] == 1 and promoted["promoted"]["by"] == "annotation tuneloop.dev/approve=1"
    assert json.loads(s3.get_bytes("jobs/guarded/promoted.json"))["run"] == 1
    assert condition(promoted, "Ready")["status"] == "True"

    # A run that cannot pass its gates: the promoted model stays, and stays available.
    k8s_api.patch(
        API,
        KIND,
        "guarded",
        {"spec": {"promotion": {"gates": [{"metric": "accuracy", "min": 2.0}], "requireApproval": True}}},
        NS,
    )
    done = wait_status(k8s_api, "guarded", run_number_is(2), what="run 2")
    assert done["currentRun"]["result"] == "GateFailed"
    assert done["promoted"]["run"] == 1  # still available ...
    assert condition(done, "Stalled")["reason"] == "GateFailed"  # ... but the new spec produced nothing
    assert condition(done, "Ready")["status"] == "False"
    record = done["runs"][-1]
    assert record["promotion"]["decision"] == "NotPromoted" and "accuracy" in record["promotion"]["reason"]
    assert record["promotedMetrics"], "run 2 evaluated the promoted model on its own test split"
    assert json.loads(s3.get_bytes("jobs/guarded/promoted.json"))["run"] == 1
    index = json.loads(s3.get_bytes("jobs/guarded/runs/index.json"))["records"]
    assert [(r.get("run") or r.get("number"), r["event"]) for r in index][:3] == [
        (1, "finished"),
        (1, "promotion"),
        (1, "promotion"),
    ]


def every_run(status: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The finished runs of the history and the current one, by number."""
    runs = {r["number"]: r for r in status.get("runs") or []}
    current = status.get("currentRun")
    if current:
        runs[current["number"]] = current
    return runs


def test_a_manual_request_and_the_schedule_start_runs(world: World) -> None:
    # Reads the run history, not the current run: the schedule fires every minute, and on a busy
    # machine a tick may come while run 1 still trains (it then starts right after run 1).
    k8s_api = world.k8s
    k8s_api.create(world.job("timely", retrain={"schedule": "* * * * *", "cooldown": "1s"}))
    wait_status(k8s_api, "timely", lambda s: bool(every_run(s).get(1, {}).get("result")), what="the end of run 1")
    k8s_api.patch(API, KIND, "timely", {"metadata": {"annotations": {"tuneloop.dev/retrain": "now"}}}, NS)

    def by(trigger: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
        return lambda s: [r for n, r in sorted(every_run(s).items()) if n > 1 and r.get("trigger") == trigger]

    wait_status(k8s_api, "timely", lambda s: bool(by("Manual")(s)), what="a run started by the annotation")
    status = wait_status(
        k8s_api, "timely", lambda s: bool(by("Schedule")(s)), timeout=90, what="a scheduled run (every minute)"
    )
    manual, scheduled = by("Manual")(status), by("Schedule")(status)
    assert len(manual) == 1, "one annotation, one run"
    assert "scheduled for" in scheduled[0]["triggerDetail"]
    assert sorted(every_run(status)) == list(range(1, len(every_run(status)) + 1)), "run numbers without gaps"
