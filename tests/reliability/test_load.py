"""Scenario 9 of issue #13: a burst of jobs while pod creations fail and the operator is killed.

As ``bench/operator_scale.py`` does (whose pieces it reuses: moto's S3 server in a process of its
own, the bench's buckets), the real operator (``python -m tuneloop_operator``) runs against the
API emulator with ``TUNELOOP_RECONCILE_INTERVAL=3600`` (no kubelet runs the pods: a job has
converged when its run 1 is started, i.e. its one pod exists and the status records run 1 with
that pod). Here, besides:

- the jobs are created in one burst (all of them, as fast as the emulator takes them);
- about 10 % of pod creations are refused (:class:`tests.harness.faults_k8s.ApiFaults`: a 500 or a
  409 ``Conflict``, each with probability 0.05, seeded), and the very first one (a 500);
- the operator is SIGKILLed twice, when a third and when two thirds of the pods exist, and
  restarted at once;
- its RSS is sampled (psutil, every 50 ms, every incarnation) for the peak.

Invariants: every job converges; exactly one pod per job, named for run 1, attempt 1, rank 0,
and each created once (the emulator's event log is replayed to count ``ADDED`` per pod name);
no run 2 claimed in S3.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from bench.operator_scale import MotoProcess
from tests.harness.faults_k8s import ApiFaults
from tests.harness.k8s_fixtures import K8sApi
from tests.harness.operator import OperatorProcess
from tests.harness.reliability import Figure, is_full, sample
from tests.harness.s3 import MotoS3Server, create_bucket, make_client, user_env
from tuneloop_trainer.example import job_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

API = "tuneloop.dev/v1alpha1"
KIND = "FineTuneJob"
NS = "default"
PODS = r"^/api/v1/namespaces/default/pods$"


def job(i: int) -> dict[str, Any]:
    return job_manifest(
        f"load-{i:04d}",
        namespace=NS,
        task="sequence-classification",
        model_uri="hf://org/model",
        dataset={"uri": f"s3://data-bucket/train-{i % 10}/"},
        output={"uri": f"s3://model-bucket/load-{i:04d}/"},
    )


class PeakRss:
    """The largest RSS any incarnation of the operator reached (sampled every 50 ms)."""

    def __init__(self, operator: OperatorProcess) -> None:
        self.operator = operator
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            process = self.operator.process
            if process is None or process.poll() is not None:
                continue
            with contextlib.suppress(psutil.Error):  # killed between the check and the read
                self.peak = max(self.peak, psutil.Process(process.pid).memory_info().rss)


@dataclass
class S3Server:
    """Where the jobs' buckets (``model-bucket``, ``data-bucket`` with ``train-0..9/``) live."""

    url: str
    env: dict[str, str]

    def keys(self, bucket: str) -> list[str]:
        client = make_client(self.url)
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


@pytest.fixture
def s3_server_for_load(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """The full count gets moto in a process of its own, as the bench does (the emulator's thread
    then has this process to itself); the quick sample the session's moto, reset."""
    if is_full():
        with MotoProcess() as moto:
            yield S3Server(moto.url, moto.env)
        return
    server: MotoS3Server = request.getfixturevalue("s3_server")
    server.reset()
    client = make_client(server.endpoint_url)
    create_bucket(client, "model-bucket")
    create_bucket(client, "data-bucket")
    for d in range(10):
        client.put_object(Bucket="data-bucket", Key=f"train-{d}/part-000.jsonl", Body=b'{"text": "a", "label": 1}\n')
    yield S3Server(server.endpoint_url, user_env(server.endpoint_url))


def create_all(k8s: K8sApi, n: int, created: list[float]) -> None:
    """The burst: every job, one after the other, as fast as the emulator stores them."""
    started = time.monotonic()
    for i in range(n):
        k8s.create(job(i))
        created.append(time.monotonic() - started)


def converged(k8s: K8sApi) -> set[str]:
    """Jobs whose status records run 1 started with its pod, and whose pod exists."""
    pods = {p["metadata"]["name"] for p in k8s.list("v1", "Pod", NS)}
    done = set()
    for body in k8s.list(API, KIND, NS):
        name = body["metadata"]["name"]
        current = (body.get("status") or {}).get("currentRun") or {}
        if current.get("number") == 1 and current.get("pods") == [f"{name}-r1-a1-n0"] and current["pods"][0] in pods:
            done.add(name)
    return done


@pytest.mark.usefixtures("crd")
def test_a_burst_of_jobs_converges_through_failed_pod_creations_and_two_operator_kills(
    k8s_api: K8sApi, k8s_kubeconfig: Path, s3_server_for_load: S3Server, tmp_path: Path, figure: Figure
) -> None:
    n = sample(quick=10, full=1000)
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    env = s3_server_for_load.env | {"TUNELOOP_RECONCILE_INTERVAL": "3600", "TUNELOOP_LOG_LEVEL": "INFO"}
    operator = OperatorProcess(k8s_kubeconfig, tmp_path / "operator.log", env=env)
    start_rv = k8s_api.call(lambda: k8s_api.emulator.resource_version)
    kill_at = (n // 3, 2 * n // 3)
    killed_at: list[int] = []  # pods that existed at each kill
    created: list[float] = []  # seconds into the burst each job was stored
    with ApiFaults(k8s_api) as faults, PeakRss(operator) as rss:
        first = faults.add("POST", PODS, status=500, times=1)  # so that even a small sample has a refusal
        failed_500 = faults.add("POST", PODS, status=500, times=None, probability=0.05, seed=seed)
        failed_409 = faults.add("POST", PODS, status=409, times=None, probability=0.05, seed=seed + 1)
        served = faults.add("POST", PODS, times=None)  # counts the creations let through
        operator.start()
        try:
            started = time.monotonic()
            burst = threading.Thread(target=create_all, args=(k8s_api, n, created), name="burst", daemon=True)
            burst.start()  # the kills watch the pods while the jobs keep coming
            deadline = started + (60 if n <= 50 else 1500)
            interval = 0.1 if n <= 50 else 0.5  # each look lists every pod (and job) on the emulator
            done: set[str] = set()
            # Kills go on even if every job converged before the second (a small burst is quick):
            # what a restarted operator does to converged jobs counts too.
            while len(done) < n or len(killed_at) < len(kill_at):
                assert time.monotonic() < deadline, f"{n - len(done)} of {n} jobs not converged"
                made = len(k8s_api.list("v1", "Pod", NS))
                if len(killed_at) < len(kill_at) and made >= kill_at[len(killed_at)]:
                    operator.kill()
                    killed_at.append(made)
                    operator.start(timeout=120)
                    continue
                if len(created) == n:
                    done = converged(k8s_api)
                time.sleep(interval)
            burst.join()
            took = time.monotonic() - started
            faults.clear()
            assert operator.process is not None and operator.process.poll() is None, "the operator died"
        finally:
            operator.stop()
            print(operator.logs()[-20000:])
    log = operator.logs()
    assert "Traceback" not in log

    # Exactly one pod per job, for run 1 attempt 1, each created once.
    pods = k8s_api.list("v1", "Pod", NS)
    names = sorted(p["metadata"]["name"] for p in pods)
    assert names == sorted(f"load-{i:04d}-r1-a1-n0" for i in range(n))
    events = k8s_api.watch(f"/api/v1/namespaces/{NS}/pods", timeout=0.5, resourceVersion=str(start_rv))
    assert not [e for e in events if e["type"] == "ERROR"], "the event log was compacted: cannot count creations"
    added = Counter(e["object"]["metadata"]["name"] for e in events if e["type"] == "ADDED")
    twice = sorted(name for name, count in added.items() if count > 1)
    assert not twice, f"pods created more than once: {twice[:10]}"
    runs_2 = [k for k in s3_server_for_load.keys("model-bucket") if "/runs/2/" in k]
    assert not runs_2, f"a second run was claimed: {runs_2[:5]}"
    assert len(killed_at) == 2

    refused = len(first.hits) + len(failed_500.hits) + len(failed_409.hits)
    assert refused >= 1
    attempts = refused + len(served.hits)
    peak_mb = rss.peak / 2**20
    figure(
        scenario="9. Load",
        injection=(
            f"{n} jobs in one burst; the first pod creation and 10 % of the others (seeded) refused with 500 or "
            f"409; operator SIGKILLed "
            f"twice (once at least a third, then two thirds, of the pods existed) and restarted at once"
        ),
        count=n,
        invariant="every job's run 1 started with its one pod; no pod created twice; no run 2 claimed",
        result=(
            f"{len(done)}/{n} converged in {took:.1f} s (the burst took {created[-1]:.1f} s); "
            f"{refused} of {attempts} pod creations refused "
            f"({100 * refused / max(attempts, 1):.1f} %); {len(twice)} pods created twice, {len(runs_2)} second "
            f"runs; operator peak RSS {peak_mb:.0f} MB"
        ),
        notes=f"seed {seed}; killed with {killed_at[0]} and {killed_at[1]} of {n} pods made; pods are not run",
    )
