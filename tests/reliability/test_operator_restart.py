"""Scenario 2: the operator restarted while trainers run, and the status wiped while a run is
active (issue #13). The real operator process against the API emulator and the local kubelet;
the pods run a stand-in trainer that writes a heartbeat (``runs/<n>/status.json``) under a
``file://`` output and counts its own starts."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from tests.harness.k8s_fixtures import K8sApi
from tests.harness.kubelet import LocalKubelet
from tests.harness.operator import OperatorProcess
from tests.harness.reliability import Figure, sample

from .test_operator_crashes import API, KIND, NS, job, pods, status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SCENARIO = "2. Operator restart and status wipe"
HEARTBEAT_TRAINER = """
import datetime, json, os, sys, time
from pathlib import Path
run_dir = Path(os.environ["TUNELOOP_RUN_URI"].removeprefix("file://"))
run_dir.mkdir(parents=True, exist_ok=True)
with open(Path(os.environ["FAKE_STARTS"]) / os.environ["HOSTNAME"], "a") as f:
    f.write("start\\n")
finish = Path(os.environ["FAKE_FINISH"])  # the test creates it when the trainers may end
total, step = 100000, 0
while not finish.exists() and step < total:
    step += 1
    time.sleep(0.1)
    beat = {"run": int(os.environ["TUNELOOP_RUN"]), "jobUid": os.environ.get("TUNELOOP_JOB_UID"),
            "phase": "training", "step": step, "totalSteps": total,
            "lastUpdatedTime": datetime.datetime.now(datetime.UTC).isoformat()}
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps(beat))
    tmp.replace(run_dir / "status.json")
with open(os.environ["TUNELOOP_TERMINATION_LOG"], "w") as f:
    json.dump({"result": "Succeeded", "metrics": {"eval_loss": 0.5}}, f)
"""


def cluster_for(k8s_api: K8sApi, tmp: Path) -> LocalKubelet:
    """A local kubelet whose pods run the stand-in trainer: a step every 0.1 s until
    :func:`finish` is called."""
    pkg = tmp / "fake" / "tuneloop_trainer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(HEARTBEAT_TRAINER)
    (tmp / "starts").mkdir()
    return LocalKubelet(
        k8s_api,
        tmp / "kubelet",
        env_overrides={
            "PYTHONPATH": str(pkg.parent),
            "FAKE_STARTS": str(tmp / "starts"),
            "FAKE_FINISH": str(tmp / "finish"),
        },
    )


def finish(tmp: Path) -> None:
    """Let the stand-in trainers end (successfully)."""
    (tmp / "finish").touch()


@pytest.fixture
def operator_proc(operator: OperatorProcess) -> OperatorProcess:
    """The harness' running operator (tests/harness/operator.py), under this file's name."""
    return operator


def step_of(k8s: K8sApi, name: str) -> int:
    return int((((status(k8s, name).get("currentRun") or {}).get("progress")) or {}).get("step") or 0)


def starts(tmp: Path) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in (tmp / "starts").iterdir()}


def test_restarts_while_trainers_run_restart_no_pod_and_progress_continues(
    k8s_api: K8sApi, operator_proc: OperatorProcess, tmp_path: Path, figure: Figure
) -> None:
    restarts = sample(quick=1, full=10)
    seed = 2
    rng = random.Random(seed)
    print(f"seed {seed}, {restarts} restarts")
    names = ["steady-a", "steady-b"]
    with cluster_for(k8s_api, tmp_path):
        for name in names:
            k8s_api.create(job(name, tmp_path / "out"))
        stalled: list[str] = []
        for i in range(restarts):
            k8s_api.wait_for(
                lambda: all(step_of(k8s_api, n) > 0 for n in names), timeout=60, message="progress in the status"
            )
            time.sleep(rng.uniform(0.0, 1.0))  # a random moment of the operator's work
            operator_proc.kill()
            before = {n: step_of(k8s_api, n) for n in names}
            operator_proc.start()
            try:
                k8s_api.wait_for(
                    lambda b=before: all(step_of(k8s_api, n) > b[n] for n in names),
                    timeout=30,
                    message=f"progress to continue after restart {i + 1}",
                )
            except AssertionError:
                stalled.append(f"restart {i + 1}: {before}")
        finish(tmp_path)
        k8s_api.wait_for(
            lambda: all(status(k8s_api, n).get("phase") == "Succeeded" for n in names),
            timeout=120,
            message="both runs to succeed",
        )
        started = starts(tmp_path)
    restarted = {pod: n for pod, n in started.items() if n != 1}
    ends = {n: [(r["number"], r["result"], r["attempts"]) for r in status(k8s_api, n).get("runs") or []] for n in names}
    assert sorted(started) == [f"{n}-r1-a1-n0" for n in names]
    assert restarted == {} and stalled == []
    assert ends == {n: [(1, "Succeeded", 1)] for n in names}
    figure(
        scenario=SCENARIO,
        injection=f"operator SIGKILLed and restarted {restarts} times at random moments (seed {seed}) while 2 "
        "trainers run",
        count=restarts,
        invariant="no pod restarted or added, one run per job, status progress (heartbeat step) grows after every "
        "restart, both runs end Succeeded with 1 attempt",
        result=f"{len(restarted)} pods restarted, {len(started) - len(names)} extra pods, "
        f"{len(stalled)} restarts without progress",
        notes="stand-in trainer process writing a real heartbeat to a file:// output",
    )


def test_a_wiped_status_is_rebuilt_from_pods_without_a_second_run(
    k8s_api: K8sApi, operator_proc: OperatorProcess, tmp_path: Path, figure: Figure
) -> None:
    wipes = sample(quick=1, full=5)
    names = ["wiped-active", "wiped-done"]
    with cluster_for(k8s_api, tmp_path):
        k8s_api.create(job(names[0], tmp_path / "out"))
        k8s_api.create(job(names[1], tmp_path / "out", hyperparameters={"epochs": 1}))
        guessed: list[str] = []
        for _ in range(wipes):
            k8s_api.wait_for(lambda: step_of(k8s_api, names[0]) > 0, timeout=60, message="progress")
            before = step_of(k8s_api, names[0])
            obj = k8s_api.get(API, KIND, names[0], NS)
            assert obj is not None
            obj["status"] = {}
            k8s_api.replace(obj, subresource="status")
            k8s_api.wait_for(
                lambda b=before: step_of(k8s_api, names[0]) > b, timeout=30, message="progress after the wipe"
            )
        finish(tmp_path)
        k8s_api.wait_for(
            lambda: all(status(k8s_api, n).get("phase") == "Succeeded" for n in names),
            timeout=120,
            message="both runs to succeed",
        )
        # A finished job's status wiped: it must not train the same spec again.
        obj = k8s_api.get(API, KIND, names[1], NS)
        assert obj is not None
        obj["status"] = {}
        k8s_api.replace(obj, subresource="status")

        def guesses(name: str) -> list[str]:
            events = k8s_api.list("v1", "Event", NS)
            return [
                e["message"]
                for e in events
                if (e.get("involvedObject") or {}).get("name") == name and "guessed" in e.get("message", "")
            ]

        # The first reconcile after the wipe rebuilds currentRun and says so (the event is posted
        # after the status patch); the operator before the fix started run 2 in that reconcile.
        k8s_api.wait_for(lambda: guesses(names[1]), timeout=30, message="the rebuilt status's event")
        started = starts(tmp_path)
        guessed = guesses(names[0]) + guesses(names[1])
    all_pods = sorted(p["metadata"]["name"] for n in names for p in pods(k8s_api, n))
    ends = {n: [(r["number"], r["result"]) for r in status(k8s_api, n).get("runs") or []] for n in names}
    print(json.dumps(guessed, indent=1))
    assert all_pods == [f"{n}-r1-a1-n0" for n in names], all_pods
    assert all(v == 1 for v in started.values()), started
    assert ends == {n: [(1, "Succeeded")] for n in names}
    assert len(guessed) >= wipes + 1
    figure(
        scenario=SCENARIO,
        injection=f"status subresource replaced by {{}} {wipes} time(s) while a run trains, and once after a run "
        "succeeded",
        count=wipes + 1,
        invariant="no second run and no pod restarted; the active run is followed again with progress; the "
        "finished run is recorded Succeeded from its pod; an event names what was guessed",
        result=f"{len(all_pods) - len(names)} extra pods, {sum(v - 1 for v in started.values())} pod restarts, "
        f"runs {sorted(set(map(str, ends.values())))}, {len(guessed)} 'guessed' events",
        notes="rebuilt from pods and their termination messages; earlier runs' history and status.promoted are not "
        "rebuilt (they live in runs/index.json and promoted.json in S3)",
    )
