"""A simulated cluster for the planner tests: one FineTuneJob, its children, a kubelet and a
fake clock. Pure Python, no API server: :class:`World` applies a :class:`~tuneloop_operator.planner.Plan`
the way the operator's executor and the API server would, and lets a test change pods the way
a kubelet (or a scheduler, an eviction, a lost node) would."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.manifests import minimal_job
from tuneloop.api.status import Condition, FineTuneJobStatus, find_condition
from tuneloop.contract import Heartbeat, PromotedPointer
from tuneloop.ownership import JobIdentity, OwnerRecord
from tuneloop_operator.conditions import status_patch
from tuneloop_operator.planner import Event, HistoryView, Observed, OutputView, Plan, parse_status, plan
from tuneloop_operator.promotion import Candidate
from tuneloop_operator.settings import OperatorSettings
from tuneloop_operator.triggers import DataObservation, DriftObservation, Observations, RowObservation

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
IMAGE = "ghcr.io/tuneloop/trainer:0.1.0"
UID = "0b7f6c1e-5d2a-4c1b-9e3f-1a2b3c4d5e6f"
TERMINAL = ("Succeeded", "Failed")

Manifest = dict[str, Any]


def job_manifest(name: str = "job", **spec: Any) -> Manifest:
    """``minimal_job`` with top-level spec fields set (camelCase keys, as in a manifest)."""
    m = minimal_job(name=name)
    m["spec"].update(copy.deepcopy(spec))
    return m


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: ``patch`` applied to ``target`` (null deletes; objects merge; the rest replaces)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def ts(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


class World:
    """One job, its children and a clock. :meth:`reconcile` plans and carries the plan out."""

    def __init__(
        self,
        manifest: Manifest | None = None,
        *,
        settings: OperatorSettings | None = None,
        now: datetime = T0,
        graceful_deletes: bool = False,
    ) -> None:
        self.body: Manifest = copy.deepcopy(manifest if manifest is not None else job_manifest())
        meta = self.body.setdefault("metadata", {})
        meta.setdefault("uid", UID)
        meta.setdefault("generation", 1)
        self.settings = settings or OperatorSettings(trainer_image=IMAGE)
        self.now = now
        self.graceful_deletes = graceful_deletes
        """Deleted pods keep running with a deletionTimestamp until :meth:`finish_deletion`."""
        self.pods: dict[str, Manifest] = {}
        self.config_maps: dict[str, Manifest] = {}
        self.services: dict[str, Manifest] = {}
        self.heartbeat: Heartbeat | None = None
        self.events: list[Event] = []
        """Every event posted so far."""
        self.created: list[str] = []
        """``Kind/name`` of everything created so far, in order."""
        self.deleted: list[str] = []
        """``Kind/name`` of everything the plans deleted so far, in order."""
        self.patches = 0
        """Status patches sent so far (only on change)."""
        self.last_plan: Plan | None = None
        self.output_owner: OwnerRecord | None = None
        """``owner.json`` of the job's output prefix."""
        self.output_runs: dict[int, JobIdentity] = {}
        """``runs/<n>/run.json`` claims under the prefix (or runs found there, by whoever)."""
        self.output_error: str | None = None
        """Set to make the prefix unreadable."""
        self.output_reads = 0
        """How often the executor read the prefix."""
        self.dataset_fingerprint: str | None = "listing-0"
        self.dataset_objects = 1
        self.dataset_error: str | None = None
        self.new_rows = 0
        """Rows the Observer counts in new objects (when asked)."""
        self.drift: DriftObservation = DriftObservation(value=0.0)
        self.recorded_watermark: tuple[str, int] | None = None
        """What ``runs/<n>/data-listing.json`` of the latest run says, after a status loss."""
        self.pin_targets: dict[int, Candidate] = {}
        self.requests: list[str] = []
        """What the Observer was asked, in order."""
        self.pointers: list[PromotedPointer] = []
        """``promoted.json`` as written, in order."""
        self.index: list[dict[str, Any]] = []
        self.schedule: dict[str, datetime] = {}
        """The operator's memory of when the triggers look next (lost by :meth:`restart_operator`)."""
        self.listings: dict[int, str] = {}
        """Run → the listing fingerprint recorded when it started."""
        self.claimed_specs: dict[int, str] = {}
        """Run → the spec hash its claim (``runs/<n>/run.json``) records."""
        self.index_error: str | None = None
        """Set to make ``runs/index.json`` unreadable (what the Observer then reports)."""
        self.pointer_error: str | None = None
        """Set to make ``promoted.json`` unreadable."""

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    # -- the operator's side --

    def observed(self) -> Observed:
        return Observed(
            body=copy.deepcopy(self.body),
            now=self.now,
            pods=[copy.deepcopy(p) for p in self.pods.values()],
            config_maps=[copy.deepcopy(c) for c in self.config_maps.values()],
            services=[copy.deepcopy(s) for s in self.services.values()],
            heartbeat=self.heartbeat,
            triggers=Observations(schedule=dict(self.schedule)),
        )

    def output_view(self) -> OutputView:
        self.output_reads += 1
        if self.output_error is not None:
            return OutputView(error=self.output_error)
        highest = max(self.output_runs, default=0)
        # Claimed, and no pod of it was ever created: nothing but the claim is in runs/<highest>/.
        unstarted = highest and not any(c.startswith(f"Pod/{self.name}-r{highest}-") for c in self.created)
        return OutputView(
            owner=self.output_owner,
            highest_run=highest,
            unstarted_claimant=self.output_runs[highest] if unstarted else None,
        )

    def history_view(self) -> HistoryView:
        """What :meth:`tuneloop_operator.outputs.OutputAccess.read_history` would read."""
        output = self.body["spec"]["output"]["uri"].rstrip("/")
        finished = [r["number"] for r in self.index if r.get("event") == "finished" and isinstance(r["number"], int)]
        latest = max(finished, default=None)
        return HistoryView(
            index_uri=f"{output}/runs/index.json",
            pointer_uri=f"{output}/promoted.json",
            records=[] if self.index_error else copy.deepcopy(self.index),
            index_error=self.index_error,
            pointer=None if self.pointer_error or not self.pointers else self.pointers[-1],
            pointer_error=self.pointer_error,
            spec_hashes={latest: self.claimed_specs[latest]} if latest in self.claimed_specs else {},
        )

    def observe(self, observed: Observed, needs: set[str]) -> Observed:
        """What the handler's Observer would find: the simulated output, dataset and drift."""
        changes: dict[str, Any] = {}
        if "output" in needs:
            changes["output"] = self.output_view()
        if "pin" in needs:
            changes["pin_target"] = self.pin_targets.get(self.body["spec"].get("promotion", {}).get("pin"))
            changes["pin_read"] = True
        if "history" in needs:
            self.requests.append("history")
            changes["history"] = self.history_view()
        obs = observed.triggers
        if "watermark" in needs:
            self.requests.append("watermark")
            obs = dataclasses.replace(obs, watermark=self.recorded_watermark, watermark_read=True)
        if "data" in needs or "rows" in needs:
            self.requests.append("data")
            data = (
                DataObservation(error=self.dataset_error)
                if self.dataset_error
                else DataObservation(fingerprint=self.dataset_fingerprint, objects=self.dataset_objects)
            )
            obs = dataclasses.replace(obs, data=data)
            if "rows" in needs:
                self.requests.append("rows")
                obs = dataclasses.replace(obs, rows=RowObservation(rows=self.new_rows, objects=1))
        if "drift" in needs:
            self.requests.append("drift")
            obs = dataclasses.replace(obs, drift=self.drift)
        changes["triggers"] = obs
        return dataclasses.replace(observed, **changes)

    def plan(self) -> Plan:
        """Plan without carrying the plan out; like the executor, observe what the plan asks
        for and plan again."""
        observed = self.observed()
        the_plan = plan(observed, self.settings)
        for _ in range(4):
            if not the_plan.needs:
                break
            observed = self.observe(observed, the_plan.needs)
            the_plan = plan(observed, self.settings)
        return the_plan

    def reconcile(self) -> Plan:
        """Plan, then carry it out as the executor does: delete, create, patch status, post events."""
        the_plan = self.plan()
        self.apply(the_plan)
        return the_plan

    def claim(self, the_plan: Plan) -> bool:
        """The executor's claims: ``False`` when lost (the plan is then not carried out)."""
        claim = the_plan.claim
        if claim is None:
            return True
        me = claim.identity
        owner = self.output_owner
        if owner is not None and not owner.owner.same_job(me) and not claim.continue_lineage:
            return False
        taken = self.output_runs.get(claim.run)
        if taken is not None and not taken.same_job(me):
            return False
        if owner is None or not owner.owner.same_job(me):
            lineage = (*owner.lineage, owner.owner) if owner is not None else ()
            self.output_owner = OwnerRecord(owner=me, lineage=lineage)
        self.output_runs[claim.run] = me
        self.claimed_specs[claim.run] = claim.spec_hash
        return True

    def apply(self, the_plan: Plan) -> None:
        if not self.claim(the_plan):
            self.last_plan = the_plan
            return
        if the_plan.record_listing is not None and self.dataset_fingerprint is not None:
            self.listings[the_plan.record_listing] = self.dataset_fingerprint
        if the_plan.pointer is not None:
            self.pointers.append(the_plan.pointer)
        if the_plan.trigger_schedule:
            self.schedule = dict(the_plan.trigger_schedule)
        self.index += the_plan.index
        for ref in the_plan.delete:
            self.deleted.append(f"{ref.kind}/{ref.name}")
            if ref.kind == "Pod":
                pod = self.pods.get(ref.name)
                if pod is None:
                    continue
                if self.graceful_deletes and pod.get("status", {}).get("phase") not in TERMINAL:
                    # The API server sets it to when the grace period ends.
                    grace = pod.get("spec", {}).get("terminationGracePeriodSeconds", 30)
                    pod["metadata"]["deletionTimestamp"] = ts(self.now + timedelta(seconds=grace))
                else:
                    del self.pods[ref.name]
            elif ref.kind == "ConfigMap":
                self.config_maps.pop(ref.name, None)
            elif ref.kind == "Service":
                self.services.pop(ref.name, None)
        for obj in the_plan.create:
            name = obj["metadata"]["name"]
            store = {"Pod": self.pods, "ConfigMap": self.config_maps, "Service": self.services}[obj["kind"]]
            if name in store:  # the API server answers 409; the executor retries later
                continue
            created = copy.deepcopy(obj)
            created["metadata"]["creationTimestamp"] = ts(self.now)
            if obj["kind"] == "Pod":
                created["status"] = {"phase": "Pending"}
            store[name] = created
            self.created.append(f"{obj['kind']}/{name}")
        stored = self.body.get("status")
        patch = status_patch(stored if isinstance(stored, dict) else None, the_plan.status)
        if patch is not None:
            # As the API server applies the executor's merge patch (RFC 7386).
            self.body["status"] = merge_patch(self.body.get("status") or {}, patch)
            self.patches += 1
        self.events += the_plan.events
        self.last_plan = the_plan

    # -- the user's side --

    def edit_spec(self, change: Callable[[Manifest], None]) -> None:
        """``kubectl edit``: change the spec; the API server bumps ``metadata.generation``."""
        before = copy.deepcopy(self.body["spec"])
        change(self.body["spec"])
        if self.body["spec"] != before:
            self.body["metadata"]["generation"] += 1

    def set_spec(self, **fields: Any) -> None:
        def change(spec: Manifest) -> None:
            spec.update(copy.deepcopy(fields))

        self.edit_spec(change)

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    # -- the kubelet's side --

    def pod(self, name: str) -> Manifest:
        return self.pods[name]

    def _status(self, name: str) -> Manifest:
        status: Manifest = self.pods[name].setdefault("status", {})
        return status

    def start(self, *names: str) -> None:
        """Pods scheduled, container running."""
        for name in names or tuple(self.alive_pods()):
            status = self._status(name)
            status["phase"] = "Running"
            status["conditions"] = [{"type": "PodScheduled", "status": "True"}]
            status["containerStatuses"] = [{"name": "trainer", "state": {"running": {"startedAt": ts(self.now)}}}]

    def terminate(self, name: str, exit_code: int, message: str = "", *, reason: str | None = None) -> None:
        """The trainer exited: ``Succeeded`` for 0, else ``Failed``, with the termination message."""
        status = self._status(name)
        status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
        terminated: Manifest = {"exitCode": exit_code, "finishedAt": ts(self.now)}
        if message:
            terminated["message"] = message
        terminated["reason"] = reason or ("Completed" if exit_code == 0 else "Error")
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]

    def succeed(self, name: str, message: str = "") -> None:
        self.terminate(name, 0, message)

    def fail(self, name: str, exit_code: int = 1, message: str = "") -> None:
        self.terminate(name, exit_code, message)

    def disrupt(self, name: str, reason: str = "PreemptionByScheduler", *, exit_code: int = 143) -> None:
        """The pod was preempted: a DisruptionTarget condition, then killed by SIGTERM."""
        self.terminate(name, exit_code)
        status = self._status(name)
        status["conditions"] = [
            *status.get("conditions", []),
            {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "preempted"},
        ]

    def evict(self, name: str, reason: str = "Evicted") -> None:
        """The kubelet evicted the pod (node pressure) or its node was lost."""
        status = self._status(name)
        status["phase"] = "Failed"
        status["reason"] = reason
        status["message"] = f"The node was low on resource: memory. ({reason})"

    def lose_node(self, name: str) -> None:
        """The node stopped reporting: the pod's phase becomes Unknown."""
        self._status(name)["phase"] = "Unknown"

    def remove(self, name: str) -> None:
        """The pod is gone (deleted by someone, garbage-collected with its node)."""
        del self.pods[name]

    def finish_deletion(self, *names: str) -> None:
        """Pods being deleted are gone now."""
        for name in names or [n for n, p in self.pods.items() if p["metadata"].get("deletionTimestamp")]:
            self.pods.pop(name, None)

    def wait(self, name: str, reason: str, message: str = "") -> None:
        """The container cannot start: ``waiting`` with a reason (ImagePullBackOff...)."""
        status = self._status(name)
        status["phase"] = "Pending"
        waiting: Manifest = {"reason": reason}
        if message:
            waiting["message"] = message
        status["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]

    def unschedulable(self, name: str, message: str) -> None:
        status = self._status(name)
        status["phase"] = "Pending"
        scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
        status["conditions"] = [scheduled]

    # -- reading --

    @property
    def status(self) -> FineTuneJobStatus:
        return parse_status(self.body.get("status"))

    @property
    def phase(self) -> str | None:
        return self.status.phase

    def condition(self, type_: str) -> Condition:
        cond = find_condition(self.status.conditions, type_)
        assert cond is not None, f"no {type_} condition in {self.body.get('status')}"
        return cond

    def alive_pods(self) -> list[str]:
        """Pods not terminal, sorted by name."""
        return sorted(n for n, p in self.pods.items() if p.get("status", {}).get("phase") not in TERMINAL)
