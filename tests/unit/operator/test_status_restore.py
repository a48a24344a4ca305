"""A wiped status rebuilt from the output (issue #13, scenario 2): the finished runs from the
lineage index (``runs/index.json``), the promoted model from ``promoted.json``; read only when
the status looks wiped, and converging to what an operator that never lost the status shows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest

from tuneloop.api import ConditionType, Reason
from tuneloop.api.status import FineTuneJobStatus
from tuneloop.contract import PromotedPointer
from tuneloop.validate import validate_manifest
from tuneloop_operator.kube import KubeClient
from tuneloop_operator.outputs import JobStorage, OutputAccess

from .planner_helpers import T0, World
from .test_loop import finish_run, gated

pytestmark = pytest.mark.unit

INDEX = "s3://model-bucket/out/runs/index.json"
POINTER = "s3://model-bucket/out/promoted.json"


def three_runs(**promotion: Any) -> World:
    """Run 1 promoted, run 2 failing its gate (run 1 stays), run 3 promoted; their pods kept."""
    w = World(gated(**promotion))
    w.reconcile()
    finish_run(w, 1, 0.85)
    for run, (f1, passed) in ((2, (0.80, False)), (3, (0.90, True))):
        w.set_spec(hyperparameters={"epochs": run})
        w.advance(60)
        w.reconcile()
        finish_run(w, run, f1, passed=passed, promoted_run=1)
    assert [(r.number, r.promotion.decision if r.promotion else None) for r in w.status.runs] == [
        (1, "Promoted"),
        (2, "NotPromoted"),
        (3, "Promoted"),
    ]
    return w


def wipe(w: World) -> None:
    w.body["status"] = {}


def comparable(status: FineTuneJobStatus) -> dict[str, Any]:
    """The status without what the history cannot hold: transition times (and the order of the
    conditions), the attempts of the latest run (the index keeps runs, not attempts)."""
    body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["conditions"] = sorted((c["type"], c["status"], c["reason"], c.get("message", "")) for c in body["conditions"])
    body.get("currentRun", {}).pop("history", None)
    return body


def test_a_status_wiped_after_three_runs_is_rebuilt_field_by_field_without_a_new_run_or_decision() -> None:
    w = three_runs()
    before = comparable(w.status)
    index, pointers, created = len(w.index), list(w.pointers), list(w.created)
    assert "history" not in w.requests, "a normal pass never reads the history"
    wipe(w)
    p = w.reconcile()
    assert w.requests.count("history") == 1
    assert p.started_run is None and p.create == [] and p.finished is None and p.promotions == []
    assert (len(w.index), w.pointers, w.created) == (index, pointers, created), "nothing recorded twice"
    assert comparable(w.status) == before
    restored = [e for e in p.events if e.reason == Reason.STATUS_RESTORED]
    assert len(restored) == 1 and restored[0].type == "Normal"
    message = restored[0].message
    assert message == (
        f"the status was empty; restored status.runs (1, 2, 3) from {INDEX}; currentRun (run 3, Succeeded) "
        f"from {INDEX}; status.promoted (run 3) from {POINTER} (the attempts of finished runs are not in the index)"
    )
    # The next pass reads nothing more and changes nothing.
    again = w.reconcile()
    assert w.requests.count("history") == 1 and again.events == [] and again.create == []


def test_a_wipe_then_the_normal_flow_converges_to_the_unwiped_status() -> None:
    control, wiped = three_runs(), three_runs()
    wipe(wiped)
    wiped.reconcile()
    for w in (control, wiped):
        w.set_spec(hyperparameters={"epochs": 4})
        w.advance(60)
        w.reconcile()
        finish_run(w, 4, 0.95, promoted_run=3)
    assert comparable(wiped.status) == comparable(control.status)
    assert [p.run for p in wiped.pointers] == [1, 3, 4]
    finished = [r["number"] for r in wiped.index if r["event"] == "finished"]
    assert finished == [1, 2, 3, 4], "each run recorded once"


def test_a_status_wiped_while_a_run_trains_restores_the_earlier_runs_and_follows_the_run() -> None:
    control, wiped = three_runs(), three_runs()
    for w in (control, wiped):
        w.set_spec(hyperparameters={"epochs": 4})
        w.advance(60)
        w.reconcile()
        w.start("job-r4-a1-n0")
        w.reconcile()
    wipe(wiped)
    p = wiped.reconcile()
    assert p.create == [] and p.started_run is None
    assert [r.number for r in wiped.status.runs] == [1, 2, 3]
    assert wiped.status.promoted is not None and wiped.status.promoted.run == 3
    current = wiped.status.current_run
    assert current is not None and (current.number, current.result) == (4, None)
    guessed = [e.message for e in p.events if "guessed" in e.message]
    assert guessed and "earlier runs restored from the lineage index" in guessed[0]
    for w in (control, wiped):
        finish_run(w, 4, 0.95, promoted_run=3)
    promoted = wiped.condition(ConditionType.PROMOTED)
    assert promoted.status == "True" and "replaces run 3" in promoted.message
    a, b = comparable(wiped.status), comparable(control.status)
    # What the pods cannot tell about run 4 is guessed (the existing adoption): its trigger detail.
    for body in (a, b):
        body["currentRun"].pop("triggerDetail", None)
        body["runs"][-1].pop("triggerDetail", None)
    a["currentRun"].pop("startTime")
    b["currentRun"].pop("startTime")
    a["runs"][-1].pop("startTime")
    b["runs"][-1].pop("startTime")
    assert a == b
    assert [r["number"] for r in wiped.index if r["event"] == "finished"] == [1, 2, 3, 4]


def test_a_wiped_idle_job_whose_pods_are_gone_is_found_through_its_output_and_not_trained_again() -> None:
    w = three_runs()
    before = comparable(w.status)
    w.pods.clear()  # ttlSecondsAfterFinished, or deleted by someone
    wipe(w)
    p = w.reconcile()
    assert w.requests.count("history") == 1 and w.output_reads == 4, "found through the output it owns"
    assert p.started_run is None and p.claim is None and p.create == []
    after = comparable(w.status)
    before["currentRun"]["pods"] = []
    assert after == before


def test_a_new_job_never_reads_the_history_nor_one_whose_first_pods_were_refused() -> None:
    w = World(gated())
    first = w.plan()
    assert w.claim(first)  # run 1 claimed, then its pod refused: nothing created, no status written
    p = w.reconcile()
    assert p.started_run == 1 and p.claim is not None and p.claim.run == 1
    finish_run(w, 1, 0.85)
    assert "history" not in w.requests


def test_index_records_this_version_cannot_read_are_counted_and_the_rest_restored() -> None:
    w = three_runs()
    w.index.insert(0, {"event": "finished", "number": "one"})
    w.index.insert(0, {"event": "renamed", "run": 1})
    wipe(w)
    p = w.reconcile()
    assert [r.number for r in w.status.runs] == [1, 2, 3]
    warning = [e.message for e in p.events if e.type == "Warning"]
    assert warning == [f"the status was empty; 2 record(s) of {INDEX} could not be read and were skipped"]


def test_an_unreadable_index_or_pointer_is_named_and_the_run_is_still_followed() -> None:
    w = three_runs()
    w.set_spec(hyperparameters={"epochs": 4})
    w.reconcile()
    w.start("job-r4-a1-n0")
    w.reconcile()
    w.index_error = f"{INDEX} is not valid JSON"
    w.pointer_error = f"{POINTER} is not a tuneloop-promoted/1 pointer (run: Field required)"
    wipe(w)
    p = w.reconcile()
    warning = [e for e in p.events if e.reason == Reason.STATUS_RESTORED]
    assert [e.type for e in warning] == ["Warning"]
    assert warning[0].message == (
        f"the status was empty; could not restore the run history from {INDEX}: {INDEX} is not valid JSON; "
        f"could not restore status.promoted from {POINTER}: {POINTER} is not a tuneloop-promoted/1 pointer "
        "(run: Field required)"
    )
    current = w.status.current_run
    assert current is not None and current.number == 4 and current.result is None, "run 4 is followed"
    assert w.status.runs == [] and w.status.promoted is None and p.create == []
    w.succeed("job-r4-a1-n0", json.dumps({"result": "Succeeded", "metrics": {"f1": 0.9}}))
    w.reconcile()
    assert [r.number for r in w.status.runs] == [4]


def test_a_pointer_written_by_another_job_is_not_taken_as_this_jobs_promoted_model() -> None:
    w = three_runs()
    w.pointers[-1] = w.pointers[-1].model_copy(update={"job": {"namespace": "ml", "name": "job", "uid": "other"}})
    wipe(w)
    p = w.reconcile()
    assert w.status.promoted is None
    warning = [e.message for e in p.events if e.type == "Warning" and e.reason == Reason.STATUS_RESTORED]
    assert warning and "promoted by another job (uid other): status.promoted left empty" in warning[0]


def test_annotations_acted_on_and_a_waiting_candidate_are_restored() -> None:
    w = World(gated(requireApproval=True))
    w.reconcile()
    finish_run(w, 1, 0.85)
    w.body["metadata"].setdefault("annotations", {})["tuneloop.dev/approve"] = "1"
    w.reconcile()
    w.body["metadata"]["annotations"]["tuneloop.dev/retrain"] = "again"
    w.reconcile()  # run 2 (Manual)
    finish_run(w, 2, 0.9, promoted_run=1)
    assert w.status.awaiting_approval is not None and w.status.awaiting_approval.run == 2
    before = comparable(w.status)
    wipe(w)
    p = w.reconcile()
    assert comparable(w.status) == before
    assert p.started_run is None and not [e for e in p.events if e.reason == Reason.DECISION_REFUSED]
    assert w.reconcile().events == []  # the annotations are not acted on a second time


def test_read_history_reads_what_the_operator_wrote_and_names_what_it_cannot_read(tmp_path: Path) -> None:
    manifest = gated()
    manifest["spec"]["output"] = {"uri": f"file://{tmp_path}/out/"}
    job, problems = validate_manifest(manifest)
    assert job is not None, problems
    outputs = OutputAccess(JobStorage(cast(KubeClient, None)))
    pointer = PromotedPointer(run=1, model_uri=f"file://{tmp_path}/out/runs/1/model/", time=T0, trigger="Created")

    async def scenario() -> None:
        empty = await outputs.read_history(job)
        assert (empty.records, empty.pointer, empty.index_error, empty.pointer_error) == ([], None, None, None)
        await outputs.append_index(
            job, [{"event": "finished", "number": 1, "trigger": "Created", "result": "Succeeded"}]
        )
        await outputs.write_pointer(job, pointer)
        read = await outputs.read_history(job)
        assert [r["number"] for r in read.records] == [1] and read.pointer == pointer
        assert read.index_error is None and read.pointer_error is None

    asyncio.run(scenario())
    (tmp_path / "out" / "runs" / "index.json").write_text("{not json")
    (tmp_path / "out" / "promoted.json").write_text(json.dumps({"format": "tuneloop-promoted/1", "run": 0}))
    broken = asyncio.run(outputs.read_history(job))
    assert broken.records == [] and broken.pointer is None
    assert broken.index_error == f"file://{tmp_path}/out/runs/index.json is not valid JSON"
    assert broken.pointer_error is not None and broken.pointer_error.startswith(
        f"file://{tmp_path}/out/promoted.json is not a tuneloop-promoted/1 pointer (run: "
    )
    (tmp_path / "out" / "runs" / "index.json").write_text(json.dumps(["a list"]))
    (tmp_path / "out" / "promoted.json").write_bytes(b"\xff\xfe")
    broken = asyncio.run(outputs.read_history(job))
    assert broken.index_error is not None and "is not a tuneloop-index/1 object" in broken.index_error
    assert broken.pointer_error is not None and "promoted.json is not valid JSON" in broken.pointer_error
