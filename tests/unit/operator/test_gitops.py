"""GitOps health: what Flux (kstatus) and Argo CD (gitops/argocd/health.lua) make of a FineTuneJob
in each lifecycle state. The statuses are produced by the real planner (planner_helpers.World);
kstatus' documented rules for a generic resource are encoded below (tests only), and the Argo CD
script runs in Lua 5.1 (lupa) as Argo CD's gopher-lua would run it."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51  # type: ignore[import-untyped]

from tests.manifests import BROKEN
from tuneloop.api import ConditionType, Reason
from tuneloop.ownership import JobIdentity, OwnerRecord

from .planner_helpers import World, job_manifest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
HEALTH_LUA = ROOT / "gitops" / "argocd" / "health.lua"
ARGOCD_CM = ROOT / "gitops" / "argocd" / "argocd-cm.yaml"
POD = "job-r1-a1-n0"
SUCCESS = {"result": "Succeeded", "metrics": {"f1": 0.9}, "modelUri": "s3://b/out/runs/1/model"}


# --- kstatus, as documented (sigs.k8s.io/cli-utils/pkg/kstatus) -------------------------------------


def kstatus(obj: Mapping[str, Any]) -> str:
    """kstatus' result for a resource it has no type-specific rules for: deletion → Terminating;
    ``status.observedGeneration`` present and not ``metadata.generation`` → InProgress; the first
    ``Reconciling=True`` (InProgress) or ``Stalled=True`` (Failed) condition; else ``Ready``: True →
    Current, False/Unknown → InProgress; no such condition at all → Current."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    status = obj.get("status") or {}
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return "InProgress"
    conditions = status.get("conditions") or []
    for cond in conditions:
        if cond.get("type") == "Reconciling" and cond.get("status") == "True":
            return "InProgress"
        if cond.get("type") == "Stalled" and cond.get("status") == "True":
            return "Failed"
    for cond in conditions:
        if cond.get("type") == "Ready":
            return "Current" if cond.get("status") == "True" else "InProgress"
    return "Current"


def test_the_kstatus_rules_as_encoded() -> None:
    def obj(gen: int, observed: int | None, *conds: tuple[str, str]) -> dict[str, Any]:
        status: dict[str, Any] = {"conditions": [{"type": t, "status": s} for t, s in conds]}
        if observed is not None:
            status["observedGeneration"] = observed
        return {"metadata": {"generation": gen}, "status": status}

    assert kstatus(obj(2, 1, ("Ready", "True"))) == "InProgress"
    assert kstatus(obj(2, None, ("Ready", "True"))) == "Current"  # no observedGeneration: not checked
    assert kstatus(obj(1, 1, ("Stalled", "True"), ("Reconciling", "True"))) == "Failed"  # the first one wins
    assert kstatus(obj(1, 1, ("Reconciling", "False"), ("Ready", "False"))) == "InProgress"
    assert kstatus(obj(1, 1, ("Ready", "Unknown"))) == "InProgress"
    assert kstatus(obj(1, 1)) == "Current"
    assert kstatus({"metadata": {"generation": 1, "deletionTimestamp": "x"}}) == "Terminating"


# --- Argo CD ---------------------------------------------------------------------------------------


def to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, Mapping):
        return runtime.table_from({k: to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([to_lua(runtime, v) for v in value])
    return value


def argocd(obj: Mapping[str, Any]) -> tuple[str, str]:
    """``(hs.status, hs.message)`` of health.lua for ``obj``, as Argo CD runs it (``obj`` global)."""
    runtime = lua51.LuaRuntime()
    # Argo CD's sandbox: base library only. Fail loudly if the script reaches for more.
    for name in ("os", "io", "require", "dofile", "loadfile", "package", "debug"):
        runtime.execute(f"{name} = nil")
    runtime.globals().obj = to_lua(runtime, json.loads(json.dumps(obj)))
    hs = runtime.execute(HEALTH_LUA.read_text())
    return str(hs.status), str(hs.message)


def test_the_argocd_cm_snippet_holds_the_same_script() -> None:
    cm = yaml.safe_load(ARGOCD_CM.read_text())
    assert (cm["kind"], cm["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    assert cm["data"] == {"resource.customizations.health.tuneloop.dev_FineTuneJob": HEALTH_LUA.read_text()}


# --- fixtures from the real planner ------------------------------------------------------------------


def running(manifest: dict[str, Any] | None = None) -> World:
    w = World(manifest)
    w.reconcile()
    w.start()
    w.reconcile()
    return w


def no_status() -> World:
    return World()


def pending() -> World:
    w = World()
    w.reconcile()
    return w


def training() -> World:
    return running()


def backing_off() -> World:
    w = running(job_manifest(backoffLimit=3))
    w.fail(POD, 1, "Traceback (most recent call last):\nRuntimeError: CUDA error")
    w.reconcile()
    return w


def backoff_exhausted() -> World:
    w = running(job_manifest(backoffLimit=0))
    w.fail(POD, 1, "RuntimeError: CUDA error")
    w.reconcile()
    return w


def promoted() -> World:
    w = running()
    w.succeed(POD, json.dumps(SUCCESS))
    w.reconcile()
    return w


def gated(**promotion: Any) -> dict[str, Any]:
    return job_manifest(promotion={"gates": [{"metric": "f1", "min": 0.95}], **promotion})


def not_promoted() -> World:
    w = running(gated())
    gate = [{"metric": "f1", "passed": False, "value": 0.9}]
    w.terminate(POD, 13, json.dumps({**SUCCESS, "result": "GateFailed", "gates": gate}))
    w.reconcile()
    return w


def awaiting_approval() -> World:
    w = running(job_manifest(promotion={"requireApproval": True}))
    w.succeed(POD, json.dumps(SUCCESS))
    w.reconcile()
    return w


def rejected() -> World:
    w = awaiting_approval()
    w.body["metadata"].setdefault("annotations", {})["tuneloop.dev/reject"] = "1"
    w.reconcile()
    return w


def suspended_mid_run() -> World:
    w = running()
    w.set_spec(suspend=True)
    w.reconcile()  # deletes the pod: still InProgress while it stops
    w.reconcile()
    return w


def created_suspended() -> World:
    w = World(job_manifest(suspend=True))
    w.reconcile()
    return w


def invalid_spec() -> World:
    w = World(BROKEN[0].manifest())
    w.reconcile()
    return w


def output_owned() -> World:
    w = World()
    w.output_owner = OwnerRecord(owner=JobIdentity(name="other", namespace="ml", uid="another-uid"))
    w.reconcile()
    return w


def image_pull_error() -> World:
    w = pending()
    w.wait(POD, "ImagePullBackOff", 'Back-off pulling image "ghcr.io/tuneloop/trainer:nope"')
    w.reconcile()
    return w


def generation_not_observed() -> World:
    w = promoted()
    w.set_spec(hyperparameters={"epochs": 7})  # the API server bumps the generation; no reconcile yet
    return w


def next_generation_starting() -> World:
    w = promoted()
    w.set_spec(hyperparameters={"epochs": 7})
    w.reconcile()
    return w


STATES: dict[str, tuple[Callable[[], World], str, str]] = {
    # state: (fixture, kstatus, Argo CD)
    "no status yet": (no_status, "Current", "Progressing"),  # kstatus cannot know (documented)
    "generation not observed": (generation_not_observed, "InProgress", "Progressing"),
    "pending": (pending, "InProgress", "Progressing"),
    "running": (training, "InProgress", "Progressing"),
    "backoff": (backing_off, "InProgress", "Progressing"),
    "backoff exhausted": (backoff_exhausted, "Failed", "Degraded"),
    "succeeded and promoted": (promoted, "Current", "Healthy"),
    "not promoted (gates)": (not_promoted, "Failed", "Degraded"),
    "awaiting approval": (awaiting_approval, "Current", "Suspended"),
    "candidate rejected": (rejected, "Failed", "Degraded"),
    "suspended mid-run": (suspended_mid_run, "Current", "Suspended"),
    "created suspended": (created_suspended, "Current", "Suspended"),
    "invalid spec": (invalid_spec, "Failed", "Degraded"),
    "output owned by another job": (output_owned, "Failed", "Degraded"),
    "pod cannot pull its image": (image_pull_error, "Failed", "Degraded"),
    "new generation starting": (next_generation_starting, "InProgress", "Progressing"),
}


@pytest.mark.parametrize("state", list(STATES))
def test_flux_and_argocd_see_each_lifecycle_state(state: str) -> None:
    fixture, want_kstatus, want_argo = STATES[state]
    w = fixture()
    assert kstatus(w.body) == want_kstatus
    health, message = argocd(w.body)
    assert health == want_argo
    assert message


@pytest.mark.parametrize("state", [s for s in STATES if s not in ("no status yet", "generation not observed")])
def test_exactly_one_of_ready_reconciling_stalled_and_every_generation_current(state: str) -> None:
    w = STATES[state][0]()
    generation = w.body["metadata"]["generation"]
    status = w.status
    assert status.observed_generation == generation
    assert all(c.observed_generation == generation for c in status.conditions)
    trues = [
        t
        for t in (ConditionType.READY, ConditionType.RECONCILING, ConditionType.STALLED)
        if w.condition(t).status == "True"
    ]
    assert len(trues) == 1, trues


def test_messages_tell_what_to_do() -> None:
    assert argocd(awaiting_approval().body)[1].endswith("tuneloop.dev/approve=1 or tuneloop.dev/reject=1")
    assert "backoffLimit 0" in argocd(backoff_exhausted().body)[1]
    assert "ImagePullBackOff" in argocd(image_pull_error().body)[1]
    assert "generation 2" in argocd(generation_not_observed().body)[1]
    assert "spec.suspend" in argocd(created_suspended().body)[1]
    w = awaiting_approval()
    ready = w.condition(ConditionType.READY)
    assert (ready.reason, "no model is promoted yet" in ready.message) == (Reason.AWAITING_APPROVAL, True)


def test_a_failed_job_does_not_stay_in_progress() -> None:
    """However long one waits, a failed run with nothing pending stays Failed (Flux gives up at once
    instead of at its timeout); a later trigger or a spec change makes it InProgress again."""
    w = backoff_exhausted()
    for _ in range(3):
        w.advance(3600)
        w.reconcile()
        assert kstatus(w.body) == "Failed"
    w.set_spec(hyperparameters={"epochs": 2})
    w.reconcile()
    assert kstatus(w.body) == "InProgress" and w.status.current_run.number == 2  # type: ignore[union-attr]


def test_suspending_is_in_progress_until_the_pods_are_gone() -> None:
    w = running(job_manifest())
    w.graceful_deletes = True
    w.set_spec(suspend=True)
    w.reconcile()
    w.reconcile()
    assert (kstatus(w.body), argocd(w.body)[0]) == ("InProgress", "Progressing")
    assert POD in w.condition(ConditionType.RECONCILING).message
    w.finish_deletion()
    w.reconcile()
    assert (kstatus(w.body), argocd(w.body)[0]) == ("Current", "Suspended")


def test_progress_shows_in_the_argocd_message() -> None:
    w = training()
    w.body["status"]["currentRun"]["progress"] = {"step": 5, "progressPercentage": 25}
    assert argocd(w.body)[1].endswith("(25% of run 1)")
