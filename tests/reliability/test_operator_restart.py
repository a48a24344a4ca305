"""Scenario 2: the operator restarted while trainers run, and the status wiped while a run is
active, after it ended, and on a job with earlier runs and a promoted model (issue #13). The real
operator process against the API emulator and the local kubelet; the pods run a stand-in trainer
that writes a heartbeat (``runs/<n>/status.json``) under a ``file://`` output, counts its own
starts and ends with a model URI (so runs are promoted, and recorded in ``runs/index.json`` and
``promoted.json``)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

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
from typing import Any
run_dir = Path(os.environ["TUNELOOP_RUN_URI"].removeprefix("file://"))
run_dir.mkdir(parents=True, exist_ok=True)
with open(Path(os.environ["FAKE_STARTS"]) / os.environ["HOSTNAME"], "a") as f:
    f.write("start\\n")
finish = Path(os.environ["FAKE_FINISH"])  # the test creates it when the trainers may end
hold = Path(os.environ["FAKE_HOLD"]) / os.environ["HOSTNAME"]  # ...except this pod, while it exists
total, step = 100000, 0
while (not finish.exists() or hold.exists()) and step < total:
    step += 1
    time.sleep(0.1)
    beat = {"run": int(os.environ["TUNELOOP_RUN"]), "jobUid": os.environ.get("TUNELOOP_JOB_UID"),
            "phase": "training", "step": step, "totalSteps": total,
            "lastUpdatedTime": datetime.datetime.now(datetime.UTC).isoformat()}
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps(beat))
    tmp.replace(run_dir / "status.json")
(run_dir / "model").mkdir(exist_ok=True)
with open(os.environ["TUNELOOP_TERMINATION_LOG"], "w") as f:
    json.dump({"result": "Succeeded", "metrics": {"eval_loss": 0.5 / int(os.environ["TUNELOOP_RUN"])},
               "modelUri": os.environ["TUNELOOP_RUN_URI"].rstrip("/") + "/model/"}, f)
"""


def cluster_for(k8s_api: K8sApi, tmp: Path) -> LocalKubelet:
    """A local kubelet whose pods run the stand-in trainer: a step every 0.1 s until
    :func:`finish` is called."""
    pkg = tmp / "fake" / "tuneloop_trainer"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(HEARTBEAT_TRAINER)
    (tmp / "starts").mkdir()
    (tmp / "hold").mkdir()
    return LocalKubelet(
        k8s_api,
        tmp / "kubelet",
        env_overrides={
            "PYTHONPATH": str(pkg.parent),
            "FAKE_STARTS": str(tmp / "starts"),
            "FAKE_FINISH": str(tmp / "finish"),
            "FAKE_HOLD": str(tmp / "hold"),
        },
    )


def finish(tmp: Path) -> None:
    """Let the stand-in trainers end (successfully), except those held (:func:`hold`)."""
    (tmp / "finish").touch()


def hold(tmp: Path, pod: str) -> Path:
    """Keep ``pod``'s stand-in trainer training after :func:`finish`, until the file returned is removed."""
    held = tmp / "hold" / pod
    held.touch()
    return held


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


def wipe(k8s: K8sApi, name: str) -> None:
    """Replace the job's status subresource by ``{}``."""
    obj = k8s.get(API, KIND, name, NS)
    assert obj is not None
    obj["status"] = {}
    k8s.replace(obj, subresource="status")


def events(k8s: K8sApi, name: str, *, containing: str = "", reason: str = "") -> list[str]:
    return [
        e["message"]
        for e in k8s.list("v1", "Event", NS)
        if (e.get("involvedObject") or {}).get("name") == name
        and containing in e.get("message", "")
        and reason in (e.get("reason"), "")
    ]


#: Status fields that hold a time (the comparisons set them aside).
TIMES = frozenset({"lastTransitionTime", "startTime", "completionTime", "time", "since", "lastUpdatedTime"})


def comparable(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """A job's status with its times and its name set aside (to compare two jobs, or one job
    before and after a wipe): conditions as sorted (type, status, reason, message); the latest
    run's attempts left out (the lineage index keeps runs, not attempts)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMES}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    out: dict[str, Any] = strip(json.loads(json.dumps(body).replace(name, "<job>")))
    out["conditions"] = sorted((c["type"], c["status"], c["reason"], c.get("message", "")) for c in out["conditions"])
    out.get("currentRun", {}).pop("history", None)
    out.get("currentRun", {}).pop("progress", None)
    out.pop("triggers", None)
    return out


def promoted_run(k8s: K8sApi, name: str) -> int | None:
    promoted = status(k8s, name).get("promoted")
    return int(promoted["run"]) if promoted else None


def runs_of(k8s: K8sApi, name: str) -> list[tuple[int, str, str | None]]:
    return [
        (r["number"], r["result"], (r.get("promotion") or {}).get("decision"))
        for r in status(k8s, name).get("runs") or []
    ]


def retrain(k8s: K8sApi, names: list[str], run: int, *, until_done: bool = True) -> None:
    """A spec change on each job: run ``run`` starts (and, ``until_done``, succeeds and is promoted)."""
    for name in names:
        k8s.patch(API, KIND, name, {"spec": {"hyperparameters": {"epochs": run}}}, NS)
    if until_done:
        k8s.wait_for(
            lambda: all(len(runs_of(k8s, n)) == run and promoted_run(k8s, n) == run for n in names),
            timeout=60,
            message=f"run {run} to succeed and be promoted",
        )


def test_a_wiped_status_is_rebuilt_from_pods_without_a_second_run(
    k8s_api: K8sApi, operator_proc: OperatorProcess, tmp_path: Path, figure: Figure
) -> None:
    wipes = sample(quick=1, full=5)
    names = ["wiped-active", "wiped-done"]
    kept, wiped = "history-kept", "history-wiped"
    with cluster_for(k8s_api, tmp_path):
        k8s_api.create(job(names[0], tmp_path / "out"))
        k8s_api.create(job(names[1], tmp_path / "out", hyperparameters={"epochs": 1}))
        for _ in range(wipes):
            k8s_api.wait_for(lambda: step_of(k8s_api, names[0]) > 0, timeout=60, message="progress")
            before = step_of(k8s_api, names[0])
            wipe(k8s_api, names[0])
            k8s_api.wait_for(
                lambda b=before: step_of(k8s_api, names[0]) > b, timeout=30, message="progress after the wipe"
            )
        finish(tmp_path)
        k8s_api.wait_for(
            lambda: all(status(k8s_api, n).get("phase") == "Succeeded" for n in names),
            timeout=120,
            message="both runs to succeed",
        )
        # A finished job's status wiped: it must not train the same spec again. Its run is in the
        # lineage index now: restored from there (the operator before the fix started run 2).
        wipe(k8s_api, names[1])
        k8s_api.wait_for(
            lambda: events(k8s_api, names[1], reason="StatusRestored"), timeout=30, message="the restored status"
        )

        # Two jobs with three promoted runs each; one has its status wiped after run 3, and while run 4 trains.
        for name in (kept, wiped):
            k8s_api.create(job(name, tmp_path / "out", hyperparameters={"epochs": 1}))
        k8s_api.wait_for(
            lambda: all(promoted_run(k8s_api, n) == 1 for n in (kept, wiped)), timeout=60, message="run 1 promoted"
        )
        retrain(k8s_api, [kept, wiped], 2)
        retrain(k8s_api, [kept, wiped], 3)
        before_wipe = status(k8s_api, wiped)
        wipe(k8s_api, wiped)
        k8s_api.wait_for(
            lambda: events(k8s_api, wiped, reason="StatusRestored"), timeout=30, message="the restored status"
        )
        after_wipe = status(k8s_api, wiped)
        held = [hold(tmp_path, f"{n}-r4-a1-n0") for n in (kept, wiped)]
        retrain(k8s_api, [kept, wiped], 4, until_done=False)
        k8s_api.wait_for(
            lambda: (
                all((status(k8s_api, n).get("currentRun") or {}).get("number") == 4 for n in (kept, wiped))
                and step_of(k8s_api, wiped) > 0
            ),
            timeout=60,
            message="run 4 training",
        )
        wipe(k8s_api, wiped)
        k8s_api.wait_for(
            lambda: len(events(k8s_api, wiped, reason="StatusRestored")) >= 2 and step_of(k8s_api, wiped) > 0,
            timeout=30,
            message="the second restore and run 4 followed again",
        )
        mid_run = status(k8s_api, wiped)
        for path in held:
            path.unlink()
        k8s_api.wait_for(
            lambda: all(promoted_run(k8s_api, n) == 4 and len(runs_of(k8s_api, n)) == 4 for n in (kept, wiped)),
            timeout=60,
            message="run 4 to succeed and be promoted",
        )
        started = starts(tmp_path)
        guessed = events(k8s_api, names[0], containing="guessed") + events(k8s_api, wiped, containing="guessed")
        restored = events(k8s_api, names[1], reason="StatusRestored") + events(k8s_api, wiped, reason="StatusRestored")
    jobs = [*names, kept, wiped]
    all_pods = sorted(p["metadata"]["name"] for n in jobs for p in pods(k8s_api, n))
    ends = {n: [(r["number"], r["result"]) for r in status(k8s_api, n).get("runs") or []] for n in names}
    print(json.dumps(guessed + restored, indent=1))
    assert all_pods == sorted(
        [f"{n}-r1-a1-n0" for n in names] + [f"{n}-r{r}-a1-n0" for n in (kept, wiped) for r in (1, 2, 3, 4)]
    ), all_pods
    assert all(v == 1 for v in started.values()), started
    assert ends == {n: [(1, "Succeeded")] for n in names}
    assert len(guessed) >= wipes + 1  # each wipe of names[0], and run 4 of the history job adopted from its pod
    # After run 3: everything restored, field by field (times included: the index keeps them).
    assert comparable(wiped, after_wipe) == comparable(wiped, before_wipe)
    index_uri, pointer_uri = (f"file://{tmp_path}/out/{wiped}/{o}" for o in ("runs/index.json", "promoted.json"))
    told = " (the attempts of finished runs are not in the index)"
    assert sorted(events(k8s_api, wiped, reason="StatusRestored")) == [
        f"the status was empty; restored status.runs (1, 2, 3) from {index_uri}; currentRun (run 3, Succeeded) "
        f"from {index_uri}; status.promoted (run 3) from {pointer_uri}{told}",
        f"the status was empty; restored status.runs (1, 2, 3) from {index_uri}; status.promoted (run 3) from "
        f"{pointer_uri}{told}",
    ]
    # While run 4 trains: the earlier runs and the promoted model restored, run 4 followed from its pod.
    assert [r["number"] for r in mid_run.get("runs") or []] == [1, 2, 3]
    assert (mid_run.get("promoted") or {}).get("run") == 3
    assert (mid_run.get("currentRun") or {}).get("number") == 4
    # Then the normal flow: the same status as the job that was never wiped (run 4's guessed
    # trigger detail and start time aside), each run recorded once in the index.
    a, b = comparable(wiped, status(k8s_api, wiped)), comparable(kept, status(k8s_api, kept))
    for body in (a, b):  # the spec hash covers the output URI, which differs between the two jobs
        body["currentRun"].pop("triggerDetail", None)
        body["currentRun"].pop("specHash", None)
        body["runs"][-1].pop("triggerDetail", None)
    assert a == b
    assert runs_of(k8s_api, wiped) == [(n, "Succeeded", "Promoted") for n in (1, 2, 3, 4)]
    index = json.loads((tmp_path / "out" / wiped / "runs" / "index.json").read_text())["records"]
    finished = [r["number"] for r in index if r["event"] == "finished"]
    decided = [r["run"] for r in index if r["event"] == "promotion"]
    assert (finished, decided) == ([1, 2, 3, 4], [1, 2, 3, 4]), "each run and decision recorded once"
    figure(
        scenario=SCENARIO,
        injection=f"status subresource replaced by {{}} {wipes} time(s) while a run trains, once after a run "
        "succeeded, and on a job with 3 promoted runs twice (after run 3, while run 4 trains)",
        count=wipes + 3,
        invariant="no second run and no pod restarted; the active run is followed again with progress; a finished "
        "run is not trained again; earlier runs (status.runs), status.promoted and currentRun are restored from "
        "runs/index.json and promoted.json, field by field; then the status equals that of a job never wiped, "
        "and the index records each run once; events name what was guessed and what was restored from where",
        result=f"{len(all_pods) - len(names) - 8} extra pods, {sum(v - 1 for v in started.values())} pod restarts, "
        f"runs {sorted(set(map(str, ends.values())))}; history job: runs {[r[0] for r in runs_of(k8s_api, wiped)]}, "
        f"promoted run {promoted_run(k8s_api, wiped)}, equal to the unwiped job's status; index records per run: "
        f"{len(finished)} finished / {len(decided)} decisions for 4 runs; {len(guessed)} 'guessed', "
        f"{len(restored)} 'StatusRestored' events",
        notes="currentRun from pods and termination messages; history from runs/index.json and promoted.json "
        "(file:// output); the attempts of finished runs are not restored (the index keeps runs)",
    )
