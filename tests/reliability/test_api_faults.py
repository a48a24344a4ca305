"""Scenario 4 of issue #13: API-server faults against the real operator process.

The operator (``python -m tuneloop_operator``, :class:`tests.harness.operator.OperatorProcess`)
runs against the API emulator with :class:`tests.harness.faults_k8s.ApiFaults` in front of it;
trainer pods are "run" by :class:`tests.harness.quick_kubelet.QuickKubelet` (Running at once,
Succeeded with a summary 0.3 s later), so each job's whole life (claim in S3, ConfigMap and pod,
Running, Succeeded, the run record) takes about a second without faults.

- Bursts (the full count: all 13 kinds of :data:`BURSTS`, 4 times each, over 30 jobs; the quick
  sample: 6 kinds drawn by the seed, once each, over 3 jobs): 409 and 422 on status patches,
  429 with Retry-After and 500s on pod creation, a 500 after a pod was created and after a
  status patch was applied (the write happened, the operator hears it failed), 500/503 on
  every kind of request including Kopf's own, and slow answers. Each job must end Succeeded
  with a status equal, field for field (timestamps and the job's own name and uid aside), to
  that of a job reconciled without faults; the operator must stay up with no traceback in its
  log; exactly one pod per job; within a measured bound.
- A stalled watch: the job watch answers 200 and then sends nothing, without closing. The
  operator must give up on it after ``TUNELOOP_WATCH_INACTIVITY_TIMEOUT``, reopen it, act on the
  job created meanwhile, and count the stall in ``tuneloop_operator_watch_stalls_total``
  (1 stall quick, 5 full). Both run in one test, on one operator (a start costs seconds).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.faults_k8s import ApiFaults
from tests.harness.k8s_fixtures import K8sApi
from tests.harness.operator import OperatorProcess
from tests.harness.quick_kubelet import QuickKubelet
from tests.harness.reliability import Figure, sample
from tests.harness.s3 import S3Harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

API = "tuneloop.dev/v1alpha1"
KIND = "FineTuneJob"
NS = "default"
SECRET = "s3-credentials"
JOBS_PATH = r"^/apis/tuneloop\.dev/v1alpha1/"
#: The silence after which the operator gives up on a watch, in these tests (default 70 s).
INACTIVITY = 2.0


@dataclass
class Cluster:
    k8s: K8sApi
    s3: S3Harness
    operator: OperatorProcess
    kubelet: QuickKubelet
    faults: ApiFaults

    def job(self, name: str) -> dict[str, Any]:
        return {
            "apiVersion": API,
            "kind": KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "task": "sequence-classification",
                "model": {"uri": "hf://org/model"},
                "dataset": {"uri": self.s3.uri("data/")},
                "output": {"uri": self.s3.uri(f"jobs/{name}/")},
                "storage": {"endpoint": self.s3.endpoint_url, "region": "us-east-1", "secretRef": {"name": SECRET}},
                "resources": {"gpus": 0},
            },
        }

    def status(self, name: str) -> dict[str, Any]:
        return dict((self.k8s.get(API, KIND, name, NS) or {}).get("status") or {})

    def pods(self, name: str) -> list[dict[str, Any]]:
        return self.k8s.list("v1", "Pod", NS, label_selector=f"tuneloop.dev/job={name}")


@pytest.fixture
def cluster(
    k8s_api: K8sApi, k8s_kubeconfig: Path, crd: dict[str, Any], s3: S3Harness, tmp_path: Path
) -> Iterator[Cluster]:
    del crd
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NS},
            "stringData": {
                "AWS_ACCESS_KEY_ID": s3.env["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": s3.env["AWS_SECRET_ACCESS_KEY"],
            },
        }
    )
    s3.put_bytes("data/train.jsonl", b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    operator = OperatorProcess(
        k8s_kubeconfig,
        tmp_path / "operator.log",
        env={"TUNELOOP_WATCH_INACTIVITY_TIMEOUT": str(INACTIVITY), "TUNELOOP_LOG_LEVEL": "INFO"},
    )
    with ApiFaults(k8s_api) as faults, QuickKubelet(k8s_api) as kubelet:
        operator.start()
        try:
            yield Cluster(k8s_api, s3, operator, kubelet, faults)
        finally:
            operator.stop()
            print(operator.logs()[-20000:])
    assert not kubelet.errors, kubelet.errors


#: Keys whose values are times of day (they differ between any two jobs).
TIME_KEYS = frozenset({"startTime", "endTime", "completionTime", "lastTransitionTime", "time", "lastHeartbeatTime"})


def comparable(status: Any, name: str) -> Any:
    """The status with times, the spec hash and the job's own name taken out: what must be equal
    between a job reconciled under faults and one reconciled without."""
    if isinstance(status, dict):
        return {k: comparable(v, name) for k, v in status.items() if k not in TIME_KEYS and k != "specHash"}
    if isinstance(status, list):
        return [comparable(v, name) for v in status]
    if isinstance(status, str):
        return status.replace(name, "<job>")
    return status


def differences(got: Any, want: Any, path: str = "status") -> list[str]:
    """Where ``got`` differs from ``want``: ``path: got != want`` for each differing leaf."""
    if isinstance(got, dict) and isinstance(want, dict):
        return [d for k in sorted(set(got) | set(want)) for d in differences(got.get(k), want.get(k), f"{path}.{k}")]
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in differences(g, w, f"{path}[{i}]")]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def traceback_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Traceback" in line]


def wait_succeeded(cluster: Cluster, names: list[str], timeout: float) -> float:
    """Seconds until every job is Succeeded (fails the test past ``timeout``)."""
    started = time.monotonic()
    cluster.k8s.wait_for(
        lambda: all(cluster.status(n).get("phase") == "Succeeded" for n in names),
        timeout=timeout,
        interval=0.2,
        message=f"every job Succeeded; phases: {[cluster.status(n).get('phase') for n in names]}",
    )
    return time.monotonic() - started


#: (what, verb, path, status, extra): each a fault armed for ``times`` requests.
BURSTS: list[tuple[str, str, str, int | None, dict[str, Any]]] = [
    ("409 on status patches", "PATCH", r"/finetunejobs/[^/]+/status$", 409, {}),
    ("422 on status patches", "PATCH", r"/finetunejobs/[^/]+/status$", 422, {}),
    ("500 after applying a status patch", "PATCH", r"/finetunejobs/[^/]+/status$", 500, {"applied": True}),
    ("500 on Kopf's patches (finalizer, progress)", "PATCH", r"/finetunejobs/[^/]+$", 500, {}),
    ("429 with Retry-After 1 on pod creation", "POST", r"/namespaces/default/pods$", 429, {"retry_after": 1}),
    ("500 on pod creation", "POST", r"/namespaces/default/pods$", 500, {}),
    ("500 after creating a pod", "POST", r"/namespaces/default/pods$", 500, {"applied": True}),
    ("503 on ConfigMap creation", "POST", r"/namespaces/default/configmaps$", 503, {}),
    ("500 on events", "POST", r"/namespaces/default/events$", 500, {}),
    ("500 on child LISTs", "LIST", r"/namespaces/default/(pods|configmaps|services)$", 500, {}),
    ("503 on job GETs", "GET", r"/finetunejobs/[^/]+$", 503, {}),
    ("1.5 s delay on job GETs", "GET", r"/finetunejobs/[^/]+$", None, {"delay": 1.5}),
    ("503 on any job request (Kopf's too)", "*", JOBS_PATH, 503, {}),
]


def test_api_fault_bursts_then_a_stalled_watch(cluster: Cluster, figure: Figure) -> None:
    """One operator for both (a start costs seconds): the bursts, then the stalled watch."""
    fault_bursts(cluster, figure)
    stalled_watch(cluster, figure)


def fault_bursts(cluster: Cluster, figure: Figure) -> None:
    jobs = sample(quick=3, full=30)
    times = sample(quick=1, full=4)
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    # A job reconciled without faults: the status every other job must end with.
    cluster.k8s.create(cluster.job("reference"))
    wait_succeeded(cluster, ["reference"], timeout=30)
    reference = comparable(cluster.status("reference"), "reference")

    bursts = list(BURSTS)
    rng.shuffle(bursts)  # the first matching fault answers: the order decides which comes first
    bursts = bursts[: sample(quick=6, full=len(BURSTS))]  # the quick sample: 6 kinds, drawn by the seed
    faults = [
        cluster.faults.add(verb, path, status=code, times=times, **extra) for _, verb, path, code, extra in bursts
    ]
    names = [f"faulted-{i:02d}" for i in range(jobs)]
    for name in names:
        cluster.k8s.create(cluster.job(name))
    took = wait_succeeded(cluster, names, timeout=240)
    cluster.faults.clear()

    log = cluster.operator.logs()
    assert cluster.operator.process is not None and cluster.operator.process.poll() is None, "the operator died"
    assert not traceback_lines(log), "\n".join(traceback_lines(log))
    unhit = [f"{f.verb} {f.path.pattern} {f.status}" for f in faults if not f.hits]
    assert not unhit, f"faults never triggered: {unhit}"
    lost = {n: differences(comparable(cluster.status(n), n), reference) for n in names}
    differing = [n for n, d in lost.items() if d]
    assert not differing, "statuses differ from the fault-free job's:\n" + "\n".join(
        f"{n}: {lost[n]}" for n in differing
    )
    duplicates = [n for n in names if len(cluster.pods(n)) != 1 or len(cluster.kubelet.started[f"{n}-r1-a1-n0"]) != 1]
    assert not duplicates, f"jobs with other than one pod started: {duplicates}"
    hits = cluster.faults.hits
    figure(
        scenario="4. API faults",
        injection=f"{len(bursts)} fault kinds, {times} each, {jobs} jobs: " + "; ".join(b[0] for b in bursts),
        count=hits,
        invariant=(
            "operator alive, no traceback; every job Succeeded with the fault-free job's status "
            "(field for field, times aside); one pod per job"
        ),
        result=(
            f"{hits} faulty answers over {jobs} jobs: {len(differing)} statuses differ, {len(duplicates)} duplicate "
            f"pods, 0 tracebacks; all Succeeded {took:.1f} s after the burst began"
        ),
        notes=f"seed {seed}; the fault-free job took about 1 s",
    )


def stalled_watch(cluster: Cluster, figure: Figure) -> None:
    """The job watch stalls (200, then silence, unclosed) while a job is created."""
    stalls = sample(quick=1, full=5)
    counted_before = cluster.operator.metric("tuneloop_operator_watch_stalls_total", {"resource": "finetunejobs"})
    latencies: list[float] = []
    detected: list[float] = []  # seconds from the stall to the job's pod
    for i in range(stalls):
        # The job watch, when reopened, answers 200 and then sends nothing (for far longer than
        # the inactivity timeout), without closing: what a stalled proxy or API server does.
        stall = cluster.faults.add("WATCH", r"/finetunejobs$", stall=20 * INACTIVITY, times=1)
        cluster.faults.close_watches()
        cluster.k8s.wait_for(lambda: stall.hits, timeout=10, message="the operator reopening its job watch")  # noqa: B023
        name = f"during-stall-{i}"
        created = time.monotonic()
        cluster.k8s.create(cluster.job(name))  # only the stalled watch would tell the operator
        cluster.k8s.wait_for(lambda: cluster.pods(name), timeout=INACTIVITY + 20, message=f"a pod for {name}")  # noqa: B023
        latencies.append(time.monotonic() - created)
        detected.append(time.monotonic() - stall.hit_times[0])
    names = [f"during-stall-{i}" for i in range(stalls)]
    wait_succeeded(cluster, names, timeout=30)
    counted = cluster.operator.metric("tuneloop_operator_watch_stalls_total", {"resource": "finetunejobs"})
    log = cluster.operator.logs()
    assert not traceback_lines(log), "\n".join(traceback_lines(log))
    assert cluster.operator.process is not None and cluster.operator.process.poll() is None, "the operator died"
    # The job was seen only once the operator gave up on the silent stream and reopened it.
    assert all(lat <= INACTIVITY + 5 for lat in latencies), latencies
    # The emulator sends no bookmarks, so idle watches count too: at least one per injected stall.
    assert counted - counted_before >= stalls, (counted_before, counted)
    figure(
        scenario="4. API faults",
        injection=(
            f"job watch answers 200 then stays silent, unclosed, for {20 * INACTIVITY:.0f} s "
            f"(TUNELOOP_WATCH_INACTIVITY_TIMEOUT={INACTIVITY:g} s); a job is created meanwhile"
        ),
        count=stalls,
        invariant="the operator gives up on the silent watch, reopens it, acts on the job made meanwhile; counted",
        result=(
            f"{stalls}/{stalls} stalls recovered: the pod of the job created during each stall after "
            f"{max(latencies):.1f} s at most (job watch stalled {max(detected):.1f} s at most); "
            f"tuneloop_operator_watch_stalls_total{{resource=finetunejobs}} +{counted - counted_before:.0f}"
        ),
        notes="the emulator sends no watch bookmarks, so idle watches also count as stalls here",
    )
