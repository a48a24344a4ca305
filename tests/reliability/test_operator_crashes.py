"""Scenario 1: the operator dies mid-reconcile (issue #13).

Two levels:

- every crash point of the executor, on the planner's simulated cluster
  (:mod:`tests.harness.crash_points`): each flow (create → success, retries by exit code,
  preemption and eviction, suspend/resume, TTL cleanup, promotion with approval) replayed once per
  reconcile × per number of writes made before the crash;
- the real operator process SIGKILLed at seeded random moments against the API emulator and the
  local kubelet (:func:`test_sigkill_at_random_moments`), jobs created, retried, suspended and
  deleted meanwhile.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import crash_points as cp
from tests.harness.crash_points import RECONCILE as R
from tests.harness.crash_points import CrashWorld
from tests.harness.k8s_fixtures import K8sApi
from tests.harness.kubelet import LocalKubelet
from tests.harness.operator import OperatorProcess
from tests.harness.reliability import Figure, is_full, sample
from tests.unit.operator.planner_helpers import job_manifest
from tuneloop.contract import ExitCode

SCENARIO = "1. Operator SIGKILL mid-reconcile"


def summary(run: int, f1: float = 0.9) -> str:
    return json.dumps(
        {
            "result": "Succeeded",
            "metrics": {"f1": f1},
            "modelUri": f"s3://model-bucket/out/runs/{run}/model/",
            "dataFingerprint": f"data-{run}",
            "gates": [{"metric": "f1", "passed": True, "value": f1}],
        }
    )


def world(**spec: Any) -> Callable[[], CrashWorld]:
    return lambda: CrashWorld(job_manifest(**spec))


GATED = {"promotion": {"gates": [{"metric": "f1", "minImprovement": 0.0}], "requireApproval": True}}

FLOWS: dict[str, tuple[list[cp.Step], Callable[[], CrashWorld]]] = {
    "create → success (2 nodes)": (
        [R, cp.start_all, R, cp.succeed_all(summary), R, R],
        world(resources={"nodes": 2}),
    ),
    "retryable exit → retry → backoff limit": (
        [
            R,
            cp.start_all,
            R,
            cp.fail_first(1),
            R,
            cp.advance(60),
            R,
            cp.start_all,
            R,
            cp.fail_all(1),
            R,
            cp.advance(60),
            R,
            cp.start_all,
            R,
            cp.succeed_all(summary),
            R,
        ],
        world(backoffLimit=1),
    ),
    "permanent exit (invalid data)": (
        [R, cp.start_all, R, cp.fail_all(int(ExitCode.INVALID_DATA)), R, R],
        world(),
    ),
    "retry of a 2-node attempt": (
        [R, cp.start_all, R, cp.fail_first(1), R, cp.advance(60), R, cp.start_all, R, cp.succeed_all(summary), R],
        world(resources={"nodes": 2}),
    ),
    "preemption and eviction resume": (
        [
            R,
            cp.start_all,
            R,
            cp.preempt_first,
            R,
            R,
            cp.start_all,
            R,
            cp.evict_first,
            R,
            R,
            cp.start_all,
            R,
            cp.succeed_all(summary),
            R,
        ],
        world(),
    ),
    "suspend → resume": (
        [
            R,
            cp.start_all,
            R,
            cp.set_spec(suspend=True),
            R,
            R,
            cp.advance(30),
            cp.set_spec(suspend=False),
            R,
            cp.start_all,
            R,
            cp.succeed_all(summary),
            R,
        ],
        world(),
    ),
    "spec change → run 2 → TTL cleanup": (
        [
            R,
            cp.start_all,
            R,
            cp.set_spec(hyperparameters={"epochs": 2}),
            R,
            cp.succeed_all(summary),
            R,
            R,
            cp.start_all,
            R,
            cp.succeed_all(summary),
            R,
            cp.advance(120),
            R,
            R,
        ],
        world(ttlSecondsAfterFinished=60),
    ),
    "promotion with approval": (
        [R, cp.start_all, R, cp.succeed_all(summary), R, cp.annotate("tuneloop.dev/approve", "1"), R, R],
        world(**GATED),
    ),
}


@pytest.mark.unit
def test_every_crash_point_of_every_flow_converges(figure: Figure) -> None:
    """Exhaustive: every single crash point in quick mode; in full mode also every crash point
    of the restarted operator's first reconcile after each (a crash loop, two crashes in a row)."""
    depth = 2 if is_full() else 1
    explored = {name: cp.explore(name, flow, make, depth=depth) for name, (flow, make) in FLOWS.items()}
    points = sum(e.crash_points for e in explored.values())
    violations = [v for e in explored.values() for v in e.violations]
    diverged = [d for e in explored.values() for d in e.diverged]
    print(f"{points} crash points over {len(FLOWS)} flows:", {n: e.crash_points for n, e in explored.items()})
    # The flows reach what they are about (a flow that stopped early would explore nothing).
    ends = {name: e.baseline.visible for name, e in explored.items()}
    assert ends["create → success (2 nodes)"]["phase"] == "Succeeded"
    assert ends["retryable exit → retry → backoff limit"]["runs"] == [(1, "Failed", "BackoffLimitExceeded", 2, 0)]
    assert ends["permanent exit (invalid data)"]["runs"] == [(1, "Failed", "InvalidData", 1, 0)]
    assert ends["preemption and eviction resume"]["runs"] == [(1, "Succeeded", "Succeeded", 3, 2)]
    assert ends["suspend → resume"]["current"]["causes"][-1][1] == "Resumed"
    assert [r[0] for r in ends["spec change → run 2 → TTL cleanup"]["runs"]] == [1, 2]
    assert explored["spec change → run 2 → TTL cleanup"].baseline.children == []
    assert ends["promotion with approval"]["promoted"] == 1
    assert points >= 100
    assert violations == [], "\n".join(violations[:20])
    assert diverged == [], "\n".join(diverged[:20])
    figure(
        scenario=SCENARIO,
        injection="executor stopped after k of a plan's writes (claim, lineage, deletes, creates, status patch, "
        f"events), every k of every reconcile of {len(FLOWS)} flows, then a fresh reconcile"
        + (" (also crashed at every k: two crashes in a row)" if depth == 2 else "")
        + " (simulated cluster)",
        count=points,
        invariant="no pod created twice or two per (run, attempt, rank); one attempt alive at a time; no child "
        "unknown to the status after recovery; (run, attempts, failures, preemptions) monotonic; end status and "
        "children equal to the uninterrupted flow",
        result=f"{len(violations)} invariant violations, {len(diverged)} of {points} crash points ending "
        "differently from the uninterrupted flow",
        notes="exhaustive over crash points; quick mode: single crashes only",
    )


@pytest.mark.unit
def test_a_run_claimed_by_an_operator_that_died_keeps_its_number() -> None:
    """Regression: the claim (runs/1/run.json) was written, the pods were not; run 1 used to be
    skipped for run 2, leaving run 1's ConfigMap behind."""
    w = CrashWorld(job_manifest())
    cp.apply_prefix(w, w.plan(), 2)  # claim + ConfigMap, then the operator died
    cp.restart_operator(w)
    p = w.reconcile()
    assert p.started_run == 1 and sorted(w.pods) == ["job-r1-a1-n0"]
    assert sorted(w.config_maps) == ["job-r1-config"]


@pytest.mark.unit
def test_ranks_missing_after_a_crash_are_created_not_taken_for_a_preemption() -> None:
    """Regression: rank 0 created, rank 1 not, status lost; the attempt used to be counted as
    preempted and replaced by attempt 2."""
    w = CrashWorld(job_manifest(resources={"nodes": 2}))
    cp.apply_prefix(w, w.plan(), 4)  # claim, ConfigMap, Service, pod n0
    cp.restart_operator(w)
    w.reconcile()
    current = w.status.current_run
    assert current is not None and (current.attempts, current.preemptions) == (1, 0)
    assert sorted(w.pods) == ["job-r1-a1-n0", "job-r1-a1-n1"]


@pytest.mark.unit
def test_pods_of_a_retry_whose_status_was_lost_are_kept_not_recreated() -> None:
    """Regression: the retry's pod was created, the status patch lost; the pod used to be
    deleted as "of the previous attempt" and created again under the same name."""
    w = CrashWorld(job_manifest())
    w.reconcile()
    w.start()
    w.reconcile()
    w.fail("job-r1-a1-n0", 1)
    w.reconcile()
    w.advance(60)
    cp.apply_prefix(w, w.plan(), 1)  # the retry's pod, no status
    cp.restart_operator(w)
    w.reconcile()
    w.reconcile()
    assert Counter(w.created)["Pod/job-r1-a2-n0"] == 1 and "Pod/job-r1-a2-n0" not in w.deleted
    current = w.status.current_run
    assert current is not None and current.attempts == 2


# --- the real process ----------------------------------------------------------------------------

API = "tuneloop.dev/v1alpha1"
KIND = "FineTuneJob"
NS = "default"
FAKE_TRAINER = '''
"""A stand-in trainer: reads its attempt from the pod name (HOSTNAME), runs a few "steps",
exits as the job's name says (fail-once: retryable exit 1 on attempt 1)."""
import json, os, re, sys, time
name = os.environ.get("TUNELOOP_JOB_NAME", "")
attempt = int(re.search(r"-a([0-9]+)-n[0-9]+$", os.environ["HOSTNAME"]).group(1))
time.sleep(float(os.environ.get("FAKE_TRAINER_SECONDS", "1")))
if "fail-once" in name and attempt == 1:
    sys.exit(1)
path = os.environ.get("TUNELOOP_TERMINATION_LOG")
if path:
    with open(path, "w") as f:
        json.dump({"result": "Succeeded", "metrics": {"eval_loss": 0.5}}, f)
'''


def fake_trainer(tmp: Path) -> Path:
    """A ``tuneloop_trainer`` package that shadows the real one in the kubelet's pods (PYTHONPATH)."""
    pkg = tmp / "fake" / "tuneloop_trainer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(FAKE_TRAINER)
    return pkg.parent


def job(name: str, out: Path, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": "sequence-classification",
        "model": {"uri": "hf://org/model"},
        "dataset": {"uri": "s3://data-bucket/train/"},
        "output": {"uri": f"file://{out}/{name}/"},
        "resources": {"gpus": 0},
        "backoffLimit": 3,
    }
    body.update(spec)
    return {"apiVersion": API, "kind": KIND, "metadata": {"name": name, "namespace": NS}, "spec": body}


def in_flight_only(run_dir: Path) -> bool:
    """The directory holds nothing but the file backend's in-flight temp files (``.tuneloop-tmp-*``)."""
    files = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    return bool(files) and all(f.startswith(".tuneloop-tmp-") for f in files)


def pods(k8s: K8sApi, name: str | None = None) -> list[dict[str, Any]]:
    selector = f"tuneloop.dev/job={name}" if name else "tuneloop.dev/job"
    return list(k8s.list("v1", "Pod", NS, label_selector=selector))


class Watch:
    """Invariants sampled from the API while the operator is killed and restarted."""

    def __init__(self, k8s: K8sApi) -> None:
        self.k8s = k8s
        self.seen: dict[str, str] = {}
        """Pod name → uid: a second uid for a name is a pod created twice."""
        self.recreated: set[str] = set()
        self.attempts: dict[str, tuple[int, int]] = {}
        self.violations: list[str] = []

    def sample(self) -> None:
        slots: Counter[tuple[str, str, str, str]] = Counter()
        alive: dict[str, set[tuple[str, str]]] = {}
        for pod in pods(self.k8s):
            meta = pod["metadata"]
            labels = meta.get("labels") or {}
            uid = str(meta.get("uid"))
            if self.seen.setdefault(meta["name"], uid) != uid and meta["name"] not in self.recreated:
                self.recreated.add(meta["name"])
                self.violations.append(f"pod {meta['name']} created twice")
            job_name = labels.get("tuneloop.dev/job", "")
            slot = (job_name, labels.get("tuneloop.dev/run", ""), labels.get("tuneloop.dev/attempt", ""),
                    labels.get("tuneloop.dev/node-rank", labels.get("tuneloop.dev/rank", "")))  # fmt: skip
            slots[slot] += 1
            phase = (pod.get("status") or {}).get("phase")
            if phase not in ("Succeeded", "Failed") and not meta.get("deletionTimestamp"):
                alive.setdefault(job_name, set()).add(slot[1:3])
        self.violations += [f"two pods for {slot}" for slot, n in slots.items() if n > 1]
        self.violations += [f"{j}: attempts {sorted(a)} alive at once" for j, a in alive.items() if len(a) > 1]
        for obj in self.k8s.list(API, KIND, NS):
            current = (obj.get("status") or {}).get("currentRun") or {}
            if not current:
                continue
            now = (int(current.get("number", 0)), int(current.get("attempts", 0)))
            before = self.attempts.get(obj["metadata"]["name"], (0, 0))
            if now < before:
                self.violations.append(f"{obj['metadata']['name']}: (run, attempts) went back {before} → {now}")
            self.attempts[obj["metadata"]["name"]] = max(before, now)


@pytest.fixture
def cluster(k8s_api: K8sApi, crd: Any, tmp_path: Path) -> Any:
    del crd
    k8s_api.call(setattr, k8s_api.emulator, "graceful_pod_deletion", True)
    fake = fake_trainer(tmp_path)
    kubelet = LocalKubelet(
        k8s_api,
        tmp_path / "kubelet",
        env_overrides={"PYTHONPATH": str(fake), "FAKE_TRAINER_SECONDS": "1.5"},
    )
    with kubelet:
        yield kubelet
    k8s_api.call(setattr, k8s_api.emulator, "graceful_pod_deletion", False)


def status(k8s: K8sApi, name: str) -> dict[str, Any]:
    return dict((k8s.get(API, KIND, name, NS) or {}).get("status") or {})


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_sigkill_at_random_moments(
    k8s_api: K8sApi, k8s_kubeconfig: Path, cluster: LocalKubelet, tmp_path: Path, figure: Figure
) -> None:
    kills = sample(quick=2, full=100)
    seed = 13
    rng = random.Random(seed)
    print(f"seed {seed}, {kills} kills")
    out = tmp_path / "out"
    operator = OperatorProcess(k8s_kubeconfig, tmp_path / "operator.log")
    watch = Watch(k8s_api)
    expected: dict[str, str] = {}
    deleted: list[str] = []
    started = time.monotonic()
    operator.start()
    try:
        kinds = ["ok", "fail-once", "suspend", "delete"]
        for i in range(kills):
            kind = kinds[i % len(kinds)]
            name = f"{kind}-{i}"
            k8s_api.create(job(name, out))
            expected[name] = kind
            if kind == "suspend":
                k8s_api.wait_for(lambda n=name: bool(pods(k8s_api, n)), timeout=30, message=f"{name}'s pod")
                k8s_api.patch(API, KIND, name, {"spec": {"suspend": True}}, NS)
            # The kill lands at a random moment of whatever the operator is doing now.
            deadline = time.monotonic() + rng.uniform(0.0, 1.5)
            while time.monotonic() < deadline:
                watch.sample()
                time.sleep(0.05)
            if kind == "delete":
                k8s_api.delete(API, KIND, name, NS)
                deleted.append(name)
            operator.kill()
            watch.sample()
            operator.start()
            if kind == "suspend":
                # Unsuspended once the restarted operator has seen the suspension (level-triggered:
                # a suspend undone before any operator saw it never happened).
                k8s_api.wait_for(
                    lambda n=name: any(
                        c["type"] == "Suspended" and c["status"] == "True"
                        for c in status(k8s_api, n).get("conditions") or []
                    ),
                    timeout=60,
                    message=f"{name} to be suspended",
                )
                k8s_api.patch(API, KIND, name, {"spec": {"suspend": False}}, NS)

        def settled() -> bool:
            watch.sample()
            for name, kind in expected.items():
                if kind == "delete":
                    if k8s_api.get(API, KIND, name, NS) is not None or pods(k8s_api, name):
                        return False
                elif status(k8s_api, name).get("phase") != "Succeeded":
                    return False
            return True

        k8s_api.wait_for(settled, timeout=120 + 3 * kills, interval=0.25, message="every job to settle")
    finally:
        operator.stop()
        print(operator.logs()[-6000:])
    wrong: list[str] = []
    skipped: list[str] = []
    for name, kind in expected.items():
        if kind == "delete":
            continue
        s = status(k8s_api, name)
        runs = [(r["number"], r["result"]) for r in s.get("runs") or []]
        if runs == [(2, "Succeeded")] and in_flight_only(out / name / "runs" / "1"):
            # Known defect of the file:// backend (not S3): a kill mid-write of runs/1/run.json leaves
            # only its temp file, and list_dirs counts runs/1 as a run; counted, not hidden.
            skipped.append(name)
        elif runs != [(1, "Succeeded")]:
            wrong.append(f"{name}: runs {runs}")
        want_attempts = 2 if kind in ("fail-once", "suspend") else 1
        attempts = (s.get("currentRun") or {}).get("attempts")
        if kind == "ok" and attempts != 1:
            wrong.append(f"{name}: {attempts} attempts, want 1")
        if kind == "fail-once" and attempts != want_attempts:
            wrong.append(f"{name}: {attempts} attempts, want {want_attempts}")
    # What a user sees is the same for every job of a kind, wherever its kills landed.
    seen_by_kind: dict[str, set[str]] = {}
    for name, kind in expected.items():
        if kind != "delete":
            s = status(k8s_api, name)
            conditions = sorted((c["type"], c["status"], c["reason"]) for c in s.get("conditions") or [])
            seen_by_kind.setdefault(kind, set()).add(json.dumps([s.get("phase"), conditions]))
    wrong += [f"{kind}: {len(views)} different end states:\n" + "\n".join(sorted(views))
              for kind, views in seen_by_kind.items() if len(views) > 1]  # fmt: skip
    orphans = [
        f"{kind}/{o['metadata']['name']}"
        for kind in ("ConfigMap", "Service", "Pod")
        for o in k8s_api.list("v1", kind, NS, label_selector="tuneloop.dev/job")
        if o["metadata"]["labels"]["tuneloop.dev/job"] in deleted
    ]
    seconds = time.monotonic() - started
    assert watch.violations == [], watch.violations[:20]
    assert orphans == [], orphans
    assert wrong == [], "\n".join(wrong)
    assert skipped == [], skipped  # a killed claim's temporary file is not a run (storage.FileStorage.list_dirs)
    figure(
        scenario=SCENARIO,
        injection=f"SIGKILL of the operator process at a random moment (seed {seed}) while jobs are created, "
        "retried (exit 1 once), suspended/resumed and deleted; restarted at once",
        count=kills,
        invariant="no pod name created twice, never two pods per (job, run, attempt, rank), one attempt alive per "
        "job, (run, attempts) monotonic, no child of a deleted job left, every job ends with run 1 Succeeded",
        result=f"{len(watch.violations)} violations over {len(watch.seen)} pods; {len(orphans)} orphans; "
        f"{len(wrong)} jobs ending differently; {len(skipped)} run numbers skipped; "
        f"{len(expected)} jobs in {seconds:.0f}s",
        notes="API emulator + local kubelet, a stand-in trainer process (no model): the operator's side only"
        + ("" if is_full() else "; quick sample"),
    )


@pytest.mark.unit
def test_the_output_tells_a_claimed_run_nobody_started(tmp_path: Path) -> None:
    from tuneloop.ownership import JobIdentity, claim_run
    from tuneloop.storage import Storage
    from tuneloop_operator.outputs import _unstarted_claimant

    uri = f"file://{tmp_path}/out/"
    storage = Storage.for_uri(uri)
    me = JobIdentity(name="job", namespace="default", uid="u-1")
    claim_run(storage, uri, me, 1, spec_hash="h", by="operator")
    storage.write_json(f"{uri}runs/1/data-listing.json", {})  # the operator's, written before the pods
    claimant = _unstarted_claimant(storage, uri, 1)
    assert claimant is not None and claimant.same_job(me)
    storage.write_json(f"{uri}runs/1/status.json", {"run": 1})  # a trainer wrote there: started
    assert _unstarted_claimant(storage, uri, 1) is None


@pytest.mark.unit
def test_a_run_whose_pod_failed_while_the_operator_was_down_is_retried_not_replaced() -> None:
    """Regression (found by the SIGKILL test): the pod was created, the status patch lost, and the
    trainer failed (retryable) before the operator came back; run 2 used to start instead of
    attempt 2 of run 1."""
    w = CrashWorld(job_manifest())
    cp.apply_prefix(w, w.plan(), 3)  # claim, ConfigMap, pod; no status
    cp.restart_operator(w)
    w.start()
    w.fail("job-r1-a1-n0", 1)
    w.reconcile()
    w.advance(60)
    w.reconcile()
    current = w.status.current_run
    assert current is not None and (current.number, current.attempts, current.failures) == (1, 2, 1)
    assert "job-r1-a2-n0" in w.pods and not any("-r2-" in name for name in w.pods)
