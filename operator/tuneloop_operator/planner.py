"""Planning a reconcile: what the operator should do about one FineTuneJob. Pure.

:func:`plan` takes everything observed about a job (its body, its pods and other children,
the trainer's heartbeat, the time) and returns a :class:`Plan`: objects to create and delete,
the new status, the events to post and when to look again. Every trigger (create, update,
resume after an operator restart, a pod event, a timer) recomputes the same plan from the same
observations, so a lost event or a restarted operator never loses track of a run.

A *run* trains one version of the spec; it is carried out by one or more *attempts*, each a
fresh set of pods (one per node) named ``<job>-r<run>-a<attempt>-n<rank>``. An attempt ends:

- all pods ``Succeeded`` → the run succeeded;
- a pod failed with a permanent exit code (:mod:`tuneloop.contract`) → the run failed, no retry;
- a pod failed with a retryable code → retried after an exponential backoff, until more than
  ``spec.backoffLimit`` failures → ``BackoffLimitExceeded``;
- a pod was lost (deleted, evicted, preempted, its node lost) → a new attempt at once, which
  resumes from the last checkpoint, counted apart and bounded by ``max_preemptions``;
- ``spec.suspend`` → pods deleted; unsuspending starts a new attempt from the checkpoint;
- ``spec.activeDeadlineSeconds`` passed (suspended time excluded) → ``DeadlineExceeded``.

The pods of an attempt end together: when one fails, the others are deleted, and the next
attempt starts only when no pod of an earlier attempt is still alive (two trainers never
write to the same run prefix at once).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, TypeGuard

from pydantic import ValidationError

from tuneloop.api import ConditionType, FineTuneJob, Reason
from tuneloop.api.spec import METRIC_OUTPUTS, FineTuneJobSpec, Resources
from tuneloop.api.status import (
    MAX_ATTEMPT_HISTORY,
    MAX_PENDING_TRIGGERS,
    MAX_RUN_HISTORY,
    Attempt,
    AttemptCause,
    CheckpointRef,
    Condition,
    ConditionStatus,
    CurrentRun,
    FineTuneJobStatus,
    HandledAnnotations,
    PendingTrigger,
    PromotionDecision,
    RunRecord,
    RunResult,
    RunTrigger,
    find_condition,
)
from tuneloop.contract import (
    LIFECYCLE_FIELDS,
    PLACEMENT_FIELDS,
    ExitCode,
    Heartbeat,
    PromotedPointer,
    is_retryable,
    spec_hashes,
)
from tuneloop.contract import spec_hash as contract_spec_hash
from tuneloop.ownership import JobIdentity, OwnerRecord, ownership_problem
from tuneloop.validate import Problem, validate_manifest
from tuneloop_operator import promotion as promo
from tuneloop_operator import triggers
from tuneloop_operator.conditions import set_condition, with_phase
from tuneloop_operator.render import (
    CONFIG_KEY,
    LABEL_ATTEMPT,
    LABEL_NODE_RANK,
    LABEL_RUN,
    NO_DEFAULTS,
    Manifest,
    TrainerDefaults,
    names,
    render_config_map,
    render_pod,
    render_service,
)

#: Spec fields (:data:`tuneloop.contract.LIFECYCLE_FIELDS`), as attribute names of the spec model.
_LIFECYCLE_ATTRS: Final = tuple(
    name for name, info in FineTuneJobSpec.model_fields.items() if (info.alias or name) in LIFECYCLE_FIELDS
)
#: Placement fields of ``spec.resources`` (:data:`tuneloop.contract.PLACEMENT_FIELDS`), as attribute names.
_PLACEMENT_ATTRS: Final = tuple(
    name for name, info in Resources.model_fields.items() if (info.alias or name) in PLACEMENT_FIELDS
)
#: Container waiting reasons that mean a pod cannot start without someone acting.
STUCK_WAITING_REASONS: Final = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
#: Pod ``status.reason`` values (and DisruptionTarget reasons) that mean the pod was taken
#: away, not that the trainer failed.
DISRUPTION_REASONS: Final = frozenset(
    {
        "Evicted",
        "Preempted",
        "NodeLost",
        "Shutdown",
        "NodeShutdown",
        "Terminated",
        "UnexpectedAdmissionError",
        "PreemptionByScheduler",
        "PreemptionByKubeScheduler",
        "EvictionByEvictionAPI",
        "DeletionByTaintManager",
        "DeletionByPodGC",
        "TerminationByKubelet",
    }
)
PERMANENT_REASONS: Final[dict[int, str]] = {
    ExitCode.INVALID_CONFIG: Reason.INVALID_CONFIG,
    ExitCode.INVALID_DATA: Reason.INVALID_DATA,
    ExitCode.UNSUPPORTED_MODEL: Reason.UNSUPPORTED_MODEL,
    ExitCode.GATE_FAILED: Reason.GATE_FAILED,
}
MAX_EVENT_MESSAGE: Final = 1024
MAX_URI: Final = 2048
MAX_ATTEMPT_MESSAGE: Final = 1024
#: Seconds before a job refused for its output (``OutputOwned``) looks at the owner again: the
#: other job may be deleted and its owner record removed, and the job then starts by itself.
OUTPUT_RECHECK_SECONDS: Final = 300.0
#: Seconds before an output that could not be read is tried again.
OUTPUT_RETRY_SECONDS: Final = 30.0


@dataclass(frozen=True)
class PlannerSettings:
    """Operator-wide knobs of planning (see :mod:`tuneloop_operator.settings`)."""

    trainer_image: str
    """Trainer image for jobs that do not name one."""
    backoff_base_seconds: float = 10.0
    """Delay before the first retry; it doubles with each further failure (as Kubernetes Jobs do)."""
    backoff_max_seconds: float = 360.0
    """Longest delay between retries."""
    max_preemptions: int = 20
    """Attempts a run may lose to preemption before it fails (a flapping node cannot loop forever)."""
    stuck_terminating_seconds: float = 300.0
    """How long past its deletion deadline (``deletionTimestamp``, grace period included) a pod
    may still be terminating before the next attempt stops waiting for it: a pod on a node that
    no longer answers stays ``Terminating`` forever, and the job must not wait forever with it."""
    metrics_port: int = 9400
    """Port of the trainer's Prometheus endpoint."""
    trainer_defaults: TrainerDefaults = NO_DEFAULTS
    """The platform's defaults for what a job leaves out (S3 endpoint, region, Secret; ServiceAccount)."""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post about the job."""

    type: str
    """``Normal`` or ``Warning``."""
    reason: str
    """A :class:`~tuneloop.api.Reason` constant."""
    message: str


@dataclass(frozen=True)
class ObjectRef:
    """A child object to delete."""

    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class OutputView:
    """What the output prefix (``spec.output.uri``) says, read before a run starts."""

    owner: OwnerRecord | None = None
    """``owner.json`` (``None``: nobody claimed the prefix yet)."""
    highest_run: int = 0
    """The highest ``runs/<n>/`` under the prefix: new runs are numbered above it."""
    error: str | None = None
    """Why the prefix could not be read (then nothing else is known)."""
    unstarted_claimant: JobIdentity | None = None
    """Who claimed the highest run when ``runs/<highest>/`` holds nothing but that claim
    (``run.json``): claimed by an operator that died before the run started."""


@dataclass(frozen=True)
class OutputClaim:
    """Claims the executor makes before it creates a run's objects: the prefix for the job (if
    not yet its own) and the run number. A lost race aborts the plan; the next reconcile reads
    the prefix again (:mod:`tuneloop.ownership`)."""

    identity: JobIdentity
    run: int
    spec_hash: str
    continue_lineage: bool


@dataclass
class Plan:
    """What to do. The executor makes the output claim (if any), deletes, then creates (in
    order), then patches the status (only if it differs from the observed one), then posts the
    events."""

    status: FineTuneJobStatus
    job: FineTuneJob | None = None
    """The job whose output the executor writes to (claims, listing, pointer, index): the live
    job, or the spec a run started with when the live spec is invalid."""
    claim: OutputClaim | None = None
    """Claim the output prefix and this run number before creating anything."""
    needs: set[str] = field(default_factory=set)
    """Observe these and plan again before carrying anything out: ``output`` (a run would
    start: :class:`OutputView`), ``data``/``rows``/``drift``/``watermark`` (the retraining
    triggers: :class:`tuneloop_operator.triggers.Observations`), ``pin`` (the pinned run's model)."""
    pointer: PromotedPointer | None = None
    """Write ``promoted.json`` (before the status says the run is promoted)."""
    index: list[dict[str, Any]] = field(default_factory=list)
    """Records to append to the lineage index (``runs/index.json``)."""
    record_listing: int | None = None
    """Write the dataset listing observed in this pass as this run's (its data watermark)."""
    trigger_counts: list[tuple[str, str]] = field(default_factory=list)
    """``(trigger, outcome)`` for the triggers metric."""
    trigger_schedule: dict[str, datetime] = field(default_factory=dict)
    """When the triggers look next, for the operator to remember and pass back
    (``Observed.triggers.schedule``): the status has it only as of its last refresh."""
    promotions: list[str] = field(default_factory=list)
    """Promotion decisions made (for metrics)."""
    create: list[Manifest] = field(default_factory=list)
    delete: list[ObjectRef] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    """Seconds after which the job must be looked at again even if nothing happens (a backoff
    or a deadline expiring, a pod still terminating)."""
    started_run: int | None = None
    """The number of the run this plan starts, if any (for metrics)."""
    finished: tuple[str, str] | None = None
    """``(result, reason)`` of the run this plan ends, if any (for metrics)."""
    retried: bool = False
    """This plan schedules a retry after a retryable failure."""
    preempted: bool = False
    """This plan replaces an attempt lost to preemption."""

    def requeue(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass(frozen=True)
class PodView:
    """What the planner needs to know about one trainer pod."""

    name: str
    run: int
    attempt: int
    rank: int
    phase: str
    deleting: bool
    exit_code: int | None = None
    termination_message: str = ""
    disruption: str | None = None
    """Why the pod was taken away (a DisruptionTarget condition or a disruption status reason)."""
    stuck: str | None = None
    """Why the pod cannot start, in the pod's own words."""
    detail: str = ""
    """The pod's own ``status.reason: status.message``, when it has one."""
    deletion_deadline: datetime | None = None
    """``metadata.deletionTimestamp``: when the pod is due to be gone (its grace period included)."""
    gated: bool = False
    """The pod waits behind scheduling gates (a queue such as Kueue admits it): pending, not stuck."""

    @property
    def permanent_exit(self) -> bool:
        """The trainer ended with a permanent exit code (see :mod:`tuneloop.contract`)."""
        return self.exit_code is not None and not is_retryable(self.exit_code)

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def alive(self) -> bool:
        """The process may still run (or start): not finished."""
        return not self.terminal

    @classmethod
    def from_manifest(cls, pod: Mapping[str, Any]) -> PodView | None:
        """The view of a pod the operator made (None for a pod without Tuneloop's labels)."""
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        try:
            run, attempt, rank = int(labels[LABEL_RUN]), int(labels[LABEL_ATTEMPT]), int(labels[LABEL_NODE_RANK])
        except (KeyError, TypeError, ValueError):
            return None
        status = pod.get("status") or {}
        phase = str(status.get("phase") or "Pending")
        exit_code: int | None = None
        message = ""
        stuck: str | None = None
        for cs in status.get("containerStatuses") or []:
            state = cs.get("state") or {}
            terminated = state.get("terminated")
            if terminated:
                code = terminated.get("exitCode")
                if isinstance(code, int) and (exit_code is None or exit_code == 0):
                    exit_code = code
                    message = str(terminated.get("message") or "")
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING_REASONS:
                detail = str(waiting.get("message") or "").strip()
                stuck = f"{waiting['reason']}" + (f": {detail}" if detail else "")
        disruption: str | None = None
        gated = bool((pod.get("spec") or {}).get("schedulingGates"))
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "SchedulingGated":
                gated = True  # waiting for admission (Kueue removes its gate), not unschedulable
                continue
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and stuck is None:
                why = str(cond.get("reason") or "Unschedulable")
                detail = str(cond.get("message") or "").strip()
                stuck = why + (f": {detail}" if detail else "")
            if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
                disruption = str(cond.get("reason") or "DisruptionTarget")
        pod_reason = status.get("reason")
        if pod_reason in DISRUPTION_REASONS:
            disruption = str(pod_reason)
        if phase == "Unknown":
            disruption = disruption or "NodeLost"
        detail = ": ".join(str(x) for x in (pod_reason, status.get("message")) if x)
        deleted_at = meta.get("deletionTimestamp")
        return cls(
            name=str(meta.get("name")),
            run=run,
            attempt=attempt,
            rank=rank,
            phase=phase,
            deleting=bool(meta.get("deletionTimestamp")),
            exit_code=exit_code,
            termination_message=message,
            disruption=disruption,
            stuck=stuck if phase == "Pending" else None,
            detail=detail,
            deletion_deadline=_parse_time(deleted_at) if isinstance(deleted_at, str) else None,
            gated=gated and phase == "Pending",
        )


@dataclass(frozen=True)
class Observed:
    """Everything the planner looks at."""

    body: Mapping[str, Any]
    """The FineTuneJob as the API server has it."""
    now: datetime
    pods: Sequence[Mapping[str, Any]] = ()
    """Pods labelled with the job's name."""
    config_maps: Sequence[Mapping[str, Any]] = ()
    """ConfigMaps labelled with the job's name."""
    services: Sequence[Mapping[str, Any]] = ()
    """Services labelled with the job's name."""
    heartbeat: Heartbeat | None = None
    """The current run's heartbeat, when it was read."""
    output: OutputView | None = None
    """The output prefix's owner and runs, read when the plan asked for it (``needs``)."""
    triggers: triggers.Observations = field(default_factory=triggers.Observations)
    """What the retraining triggers asked to observe (``needs``)."""
    pin_target: promo.Candidate | None = None
    """The run ``spec.promotion.pin`` names, as found in storage (``None``: no model)."""
    pin_read: bool = False
    """The pinned run was looked for."""


# --- helpers -----------------------------------------------------------------------------


def _parse_time(value: str) -> datetime | None:
    """An RFC 3339 timestamp as the API server writes it (None if it is not one)."""
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def parse_status(raw: Any) -> FineTuneJobStatus:
    """The stored status; an unreadable one (written by another version) starts afresh."""
    if not isinstance(raw, Mapping):
        return FineTuneJobStatus()
    try:
        return FineTuneJobStatus.model_validate(raw)
    except ValidationError:
        return FineTuneJobStatus()


def parse_job(body: Mapping[str, Any]) -> tuple[FineTuneJob | None, list[Problem]]:
    """The job validated by the same models the CLI and the trainer use (status left out)."""
    meta = dict(body.get("metadata") or {})
    manifest = {k: body.get(k) for k in ("apiVersion", "kind", "spec")} | {"metadata": meta}
    return validate_manifest(manifest)


def spec_hash(job: FineTuneJob) -> str:
    """Hash of what a run trains (:func:`tuneloop.contract.spec_hash`)."""
    return contract_spec_hash(job.spec)


def owner_of(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
    }


def backoff_seconds(failures: int, settings: PlannerSettings) -> float:
    """Delay before the retry after the ``failures``-th failure: base · 2^(failures-1), capped."""
    return float(min(settings.backoff_max_seconds, settings.backoff_base_seconds * 2 ** max(0, failures - 1)))


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split()) if "\n" not in text.strip() else text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cause_of(text: str) -> str:
    """The cause in a pod's own words: a termination message that is not the trainer's summary
    is the tail of its log (``FallbackToLogsOnError``: an out-of-memory kill, a crash before the
    trainer could write one). From a Python traceback that is its last line (``Type: message``),
    not a cut-off middle of the stack; otherwise the last line of the log."""
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        # The exception line is the last one not indented (the stack frames are).
        unindented = [line for line in lines if not line[:1].isspace()]
        return unindented[-1] if unindented else lines[-1]
    return lines[-1]


def parse_summary(message: str) -> dict[str, Any]:
    """The trainer's termination message as a dict (empty when it is not the JSON summary)."""
    try:
        value = json.loads(message)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def headline_metric(job: FineTuneJob, metrics: Mapping[str, float]) -> str | None:
    """``name=value`` of the metric a user looks at first: the first gate's, else the task's
    first metric, else the evaluation loss."""
    candidates = [g.metric for g in job.spec.promotion.gates]
    candidates += [METRIC_OUTPUTS[f][0] for f in job.spec.metric_families()]
    candidates.append("eval_loss")
    for name in candidates:
        value = metrics.get(name)
        if isinstance(value, int | float) and math.isfinite(value):
            return f"{name}={value:.4g}"
    return None


def _float_metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        return {}
    return {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _failed_gates(summary: Mapping[str, Any]) -> list[str]:
    """The gates the trainer's summary says did not pass, in words (``f1=0.871``)."""
    out: list[str] = []
    for gate in summary.get("gates") or []:
        if isinstance(gate, Mapping) and gate.get("passed") is False:
            value = gate.get("value")
            shown = f"{value:.4g}" if isinstance(value, int | float) else "n/a"
            out.append(f"{gate.get('metric')}={shown}")
    return out


def _child_run(obj: Mapping[str, Any]) -> int | None:
    try:
        return int(((obj.get("metadata") or {}).get("labels") or {})[LABEL_RUN])
    except (KeyError, TypeError, ValueError):
        return None


# --- the planner -------------------------------------------------------------------------


class _Planner:
    """One planning pass. Builds the plan step by step; :func:`plan` is its only entry."""

    def __init__(self, observed: Observed, settings: PlannerSettings) -> None:
        self.obs = observed
        self.settings = settings
        self.now = observed.now
        meta = observed.body.get("metadata") or {}
        self.name = str(meta.get("name"))
        self.generation = int(meta.get("generation") or 0)
        self.old = parse_status(observed.body.get("status"))
        self.status = self.old.model_copy(deep=True)
        self.plan = Plan(status=self.status)
        self.pods = [v for v in (PodView.from_manifest(p) for p in observed.pods) if v is not None]
        self.owner = owner_of(observed.body)
        self.live: FineTuneJob | None = None
        """The job as it is now (None while its spec is invalid)."""
        self.resumed = False
        self.adopting: set[str] = set()
        """Pods this pass creates for an attempt it adopted (not missing: never created yet)."""

    # -- conditions and events --

    def cond(self, type_: str, status: ConditionStatus, reason: str, message: str = "") -> None:
        self.status.conditions = set_condition(
            self.status.conditions, type_, status, reason, message, generation=self.generation, at=self.now
        )

    def event(self, type_: str, reason: str, message: str) -> None:
        self.plan.events.append(Event(type_, reason, _short(message, MAX_EVENT_MESSAGE)))

    def cond_changed(self, type_: str) -> bool:
        """Whether this pass changed the condition's status, reason or message."""
        before = find_condition(self.old.conditions, type_)
        after = find_condition(self.status.conditions, type_)
        if after is None:
            return False
        return before is None or (before.status, before.reason, before.message) != (
            after.status,
            after.reason,
            after.message,
        )

    # -- children --

    def stuck_terminating(self, pod: PodView) -> bool:
        """The pod was deleted and is still not gone long after its grace period (see
        :attr:`PlannerSettings.stuck_terminating_seconds`)."""
        if not pod.deleting or pod.deletion_deadline is None:
            return False
        return (self.now - pod.deletion_deadline).total_seconds() >= self.settings.stuck_terminating_seconds

    def delete_pod(self, pod: PodView) -> None:
        ref = ObjectRef("v1", "Pod", pod.name)
        if not pod.deleting and ref not in self.plan.delete:
            self.plan.delete.append(ref)

    def run_pods(self, run: int) -> list[PodView]:
        return [p for p in self.pods if p.run == run]

    def render_attempt(self, job: FineTuneJob, run: int, attempt: int) -> list[Manifest]:
        """The attempt's pods, plus the run's ConfigMap and Service unless they exist."""
        out: list[Manifest] = []
        child = names(self.name, run, attempt)
        existing_cms = {str((c.get("metadata") or {}).get("name")) for c in self.obs.config_maps}
        existing_svcs = {str((s.get("metadata") or {}).get("name")) for s in self.obs.services}
        if child.config_map not in existing_cms:
            out.append(render_config_map(job, run, self.owner))
        if job.spec.resources.nodes > 1 and child.service not in existing_svcs:
            out.append(render_service(job, run, self.owner))
        out += [
            render_pod(
                job,
                run,
                attempt,
                rank,
                image=self.settings.trainer_image,
                owner=self.owner,
                metrics_port=self.settings.metrics_port,
                defaults=self.settings.trainer_defaults,
            )
            for rank in range(job.spec.resources.nodes)
        ]
        return out

    # -- entry --

    def run(self) -> Plan:
        job, problems = parse_job(self.obs.body)
        self.live = job
        if job is None:
            self.keep_active_run_going()
            self.invalid_spec(problems)
        else:
            self.reconcile(job)
        self.gitops()
        self.status.observed_generation = self.generation
        self.status.conditions = [
            c.model_copy(update={"observed_generation": self.generation}) for c in self.status.conditions
        ]
        self.plan.status = with_phase(self.status)
        return self.plan

    def invalid_spec(self, problems: list[Problem]) -> None:
        """Report; no new run starts. An active run goes on under its own spec (see
        :meth:`keep_active_run_going`)."""
        listed = "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        message = f"FineTuneJob {self.name} is invalid: {listed}{more}"
        self.cond(ConditionType.FAILED, "True", Reason.INVALID_SPEC, message)
        active = self.status.current_run is not None and self.status.current_run.result is None
        if not active:
            self.cond(ConditionType.RUNNING, "False", Reason.INVALID_SPEC, "no pod is created for an invalid spec")
        if self.cond_changed(ConditionType.FAILED):
            self.event("Warning", Reason.INVALID_SPEC, message)

    def reconcile(self, job: FineTuneJob) -> None:
        failed = find_condition(self.status.conditions, ConditionType.FAILED)
        if failed is not None and failed.reason == Reason.INVALID_SPEC:
            # The spec was fixed: the Failed condition tells about the latest run again.
            last = self.status.current_run
            if last is not None and last.result is not None and last.result != "Succeeded":
                self.cond(ConditionType.FAILED, "True", last.reason or "Failed", "the latest run failed")
            else:
                self.cond(ConditionType.FAILED, "False", Reason.NO_RUN, "the spec is valid")
        self.track_spec_change(job)
        self.adopt_orphans(job)
        self.decisions(job)
        current = self.status.current_run
        if current is None or current.result is not None:
            if job.spec.suspend:
                self.suspended_idle()
                return
            wanted: PendingTrigger | None = None
            if current is None:
                wanted = PendingTrigger(trigger="Created", detail="the job was created", time=self.now)
            elif self.wants_new_run(job, current):
                wanted = PendingTrigger(
                    trigger="SpecChange", detail=f"spec generation {self.generation}", time=self.now
                )
            fired = self.retrain_triggers(job, active=False)
            if wanted is None and fired is not None:
                wanted = fired
            elif wanted is not None and fired is not None:
                wanted = wanted.model_copy(update={"detail": f"{wanted.detail}; also {fired.trigger}: {fired.detail}"})
            if wanted is not None:
                self.start_triggered(job, wanted, fired)
                return
            suspended = find_condition(self.status.conditions, ConditionType.SUSPENDED)
            if suspended is not None and suspended.status == "True":
                self.cond(ConditionType.SUSPENDED, "False", Reason.RESUMED, "spec.suspend is false")
            self.cleanup_finished(job)
            return
        if job.spec.retrain.concurrency_policy == "Replace" and self.wants_new_run(job, current):
            self.supersede(job, current)
            return
        self.retrain_triggers(job, active=True)
        self.active_run(self.pinned(job, current), current)

    # -- the loop: triggers, promotion, approval --

    def retrain_triggers(self, job: FineTuneJob, *, active: bool) -> PendingTrigger | None:
        """Evaluate the retraining triggers; the run they start now (only when idle)."""
        retrain = job.spec.retrain
        annotations = (self.obs.body.get("metadata") or {}).get("annotations") or {}
        handled = self.status.annotations or HandledAnnotations()
        value = annotations.get(triggers.ANNOTATION_RETRAIN)
        decided = triggers.evaluate(
            retrain,
            self.status.triggers,
            now=self.now,
            key=f"{self.identity().namespace}/{self.name}",
            active=active,
            observed=self.obs.triggers,
            retrain_annotation=value if isinstance(value, str) else None,
            handled_annotation=handled.retrain,
            has_runs=self.status.current_run is not None,
        )
        self.plan.needs |= decided.needs
        if decided.needs:
            return None  # decide nothing before the handler has observed what is asked
        configured = decided.state.new_data or decided.state.drift or decided.state.schedule or decided.state.pending
        self.status.triggers = decided.state if configured or decided.state.last_automatic_start else None
        if decided.manual is not None:
            self.status.annotations = handled.model_copy(update={"retrain": decided.manual})
        for type_, reason, message in decided.events:
            self.event(type_, reason, message)
        self.plan.trigger_counts += decided.counts
        self.plan.trigger_schedule = decided.schedule
        if decided.wake_at is not None:
            self.plan.requeue((decided.wake_at - self.now).total_seconds())
        if decided.health is None:
            self.status.conditions = [c for c in self.status.conditions if c.type != ConditionType.TRIGGERS_HEALTHY]
        else:
            healthy, message = decided.health
            if healthy:
                self.cond(ConditionType.TRIGGERS_HEALTHY, "True", Reason.TRIGGERS_OK, message)
            else:
                self.cond(ConditionType.TRIGGERS_HEALTHY, "False", Reason.TRIGGER_ERROR, _short(message, 1024))
                if self.cond_changed(ConditionType.TRIGGERS_HEALTHY):
                    self.event("Warning", Reason.TRIGGER_ERROR, message)
        return decided.start

    def start_triggered(self, job: FineTuneJob, wanted: PendingTrigger, fired: PendingTrigger | None) -> None:
        """Start a run for ``wanted``: after the pods of earlier runs are gone, with the output
        claimed and, when new data is watched, the listing it starts with recorded."""

        def keep_waiting() -> None:
            # Not started after all: a trigger that fired stays pending for the next pass.
            if fired is not None and self.status.triggers is not None:
                self.status.triggers.pending = [fired, *self.status.triggers.pending][:MAX_PENDING_TRIGGERS]

        leftovers = [
            p
            for p in self.pods
            if p.alive and (self.status.current_run is None or p.run <= self.status.current_run.number)
        ]
        if leftovers:
            for pod in leftovers:
                self.delete_pod(pod)
            self.cond(
                ConditionType.RUNNING,
                "True",
                Reason.POD_PENDING,
                f"waiting for pod(s) {', '.join(p.name for p in leftovers)} of an earlier run to end",
            )
            self.plan.requeue(1.0)
            keep_waiting()
            return
        watch = job.spec.retrain.on_new_data
        if watch is not None and watch.enabled and self.obs.triggers.data is None:
            self.plan.needs.add("data")  # the run records the listing it starts with
        number = self.claimable_run(job)
        if number is None or self.plan.needs:
            keep_waiting()
            return
        self.start_run(job, number, wanted)
        self.status.triggers = triggers.starting(self.status.triggers, wanted.trigger, now=self.now)
        data = self.obs.triggers.data
        if watch is not None and watch.enabled and data is not None and data.fingerprint is not None:
            state = self.status.triggers.new_data if self.status.triggers is not None else None
            if state is not None:
                state.watermark, state.watermark_run, state.new_rows = data.fingerprint, number, 0
            self.plan.record_listing = number

    def supersede(self, job: FineTuneJob, current: CurrentRun) -> None:
        """``concurrencyPolicy: Replace``: the active run stops (checkpoints kept) for the new spec."""
        self.close_attempt(current, Reason.SUPERSEDED, f"spec generation {self.generation} replaces it")
        self.event(
            "Normal",
            Reason.SUPERSEDED,
            f"run {current.number} stopped for spec generation {self.generation} (retrain.concurrencyPolicy: "
            "Replace); its checkpoints are kept",
        )
        self.finish(
            job,
            current,
            "Superseded",
            Reason.SUPERSEDED,
            f"replaced by spec generation {self.generation} (retrain.concurrencyPolicy: Replace)",
        )
        self.plan.requeue(0.0)

    def decisions(self, job: FineTuneJob) -> None:
        """Approvals, rejections and a pinned run: promotion decisions made outside a run's end."""
        self.plan.job = job
        annotations = (self.obs.body.get("metadata") or {}).get("annotations") or {}
        handled = self.status.annotations or HandledAnnotations()
        awaiting = self.status.awaiting_approval
        candidate = self.candidate_of(awaiting.run) if awaiting is not None else None
        spec = job.spec.promotion
        for decided in promo.decide_annotations(
            annotations,
            {"approve": handled.approve, "reject": handled.reject},
            awaiting=awaiting,
            awaiting_candidate=candidate,
            spec=spec,
            current=self.status.promoted,
            now=self.now,
            base_model_uri=job.spec.model.uri,
            job=self.identity().to_wire(),
        ):
            handled = handled.model_copy(update={decided.annotation: decided.value})
            if decided.event is not None:
                self.event(*decided.event)
            if decided.outcome is not None and awaiting is not None:
                self.status.awaiting_approval = None
                self.apply_promotion(awaiting.run, decided.outcome)
        if handled != (self.status.annotations or HandledAnnotations()):
            self.status.annotations = handled
        if spec.pin is not None and (self.status.promoted is None or self.status.promoted.run != spec.pin):
            if not self.obs.pin_read:
                self.plan.needs.add("pin")
                return
            outcome = promo.pinned(
                spec,
                current=self.status.promoted,
                target=self.obs.pin_target,
                now=self.now,
                base_model_uri=job.spec.model.uri,
                job=self.identity().to_wire(),
            )
            if outcome is not None:
                before = find_condition(self.status.conditions, ConditionType.PROMOTED)
                if outcome.promoted is not None or before is None or before.reason != Reason.PIN_INVALID:
                    self.apply_promotion(spec.pin, outcome)

    def candidate_of(self, run: int) -> promo.Candidate | None:
        """A finished run as a promotion candidate, from the status' run history."""
        record = next((r for r in self.status.runs if r.number == run), None)
        return promo.Candidate.of(record) if record is not None else None

    def apply_promotion(self, run: int, outcome: promo.PromotionOutcome) -> None:
        """Record a promotion decision: the run's record, ``status.promoted`` and the pointer to
        write, the awaiting candidate, the ``Promoted`` condition, an event, the lineage index."""
        self.status.runs = [
            r.model_copy(update={"promotion": outcome.decision}) if r.number == run else r for r in self.status.runs
        ]
        if outcome.promoted is not None:
            self.status.promoted = outcome.promoted
            self.plan.pointer = outcome.pointer
        if outcome.awaiting is not None:
            self.status.awaiting_approval = outcome.awaiting
        status, reason, message = outcome.condition
        self.cond(ConditionType.PROMOTED, status, reason, _short(message, 1024))  # type: ignore[arg-type]
        if outcome.event is not None:
            self.event(*outcome.event)
        self.plan.promotions.append(outcome.decision.decision)
        self.plan.index.append(
            {"run": run, "event": "promotion", **outcome.decision.model_dump(mode="json", by_alias=True)}
        )

    def gitops(self) -> None:
        """``Ready``, ``Reconciling`` and ``Stalled`` from the rest of the status, following
        kstatus (sigs.k8s.io/cli-utils): ``Reconciling=True`` → InProgress, ``Stalled=True`` →
        Failed, otherwise ``Ready=True`` → Current. Exactly one of the three is ``True``."""
        conditions = {c.type: c for c in self.status.conditions}
        running = conditions.get(ConditionType.RUNNING)
        failed = conditions.get(ConditionType.FAILED)
        suspended = conditions.get(ConditionType.SUSPENDED)
        decision = conditions.get(ConditionType.PROMOTED)
        current = self.status.current_run
        active = current is not None and current.result is None

        def true(cond: Condition | None) -> TypeGuard[Condition]:
            return cond is not None and cond.status == "True"

        reconciling: tuple[str, str] | None = None
        stalled: tuple[str, str] | None = None
        if true(failed) and failed.reason in (Reason.INVALID_SPEC, Reason.OUTPUT_OWNED):
            stalled = (failed.reason, failed.message)
        elif running is not None and (
            running.reason == Reason.OUTPUT_UNAVAILABLE
            or (running.status == "True" and running.reason == Reason.POD_STUCK)
        ):
            stalled = (running.reason, running.message)  # a pod that cannot start, an unreadable output
        elif true(suspended):
            if any(p.alive for p in self.pods):
                reconciling = (Reason.SUSPENDED, suspended.message)
        elif active or true(running):
            reconciling = (running.reason, running.message) if running is not None else (Reason.CREATED, "")
        elif current is None:
            reconciling = (Reason.CREATED, "the first run is being set up")
        elif self.follow_up(current, failed=true(failed)):
            reconciling = (Reason.FOLLOW_UP_PENDING, self.follow_up_message(current))
        elif true(failed):
            stalled = (failed.reason, failed.message)
        elif (
            self.status.promoted is None
            and self.status.awaiting_approval is None
            and decision is not None
            and decision.status == "False"
        ):
            stalled = (decision.reason, f"no model is promoted: {decision.message}")
        if reconciling is not None:
            self.cond(ConditionType.RECONCILING, "True", *reconciling)
            self.cond(ConditionType.STALLED, "False", Reason.RECONCILED, "")
            self.cond(ConditionType.READY, "False", *reconciling)
        elif stalled is not None:
            self.cond(ConditionType.RECONCILING, "False", Reason.RECONCILED, "")
            self.cond(ConditionType.STALLED, "True", *stalled)
            self.cond(ConditionType.READY, "False", stalled[0], "stalled: see the Stalled condition")
        else:
            self.cond(ConditionType.RECONCILING, "False", Reason.RECONCILED, "")
            self.cond(ConditionType.STALLED, "False", Reason.RECONCILED, "")
            self.cond(ConditionType.READY, "True", *self.at_rest(suspended if true(suspended) else None))

    def follow_up(self, last: CurrentRun, *, failed: bool) -> bool:
        """Another run is about to start after ``last``: the spec changed (it starts at once), or
        the latest run failed and a trigger waits for the cooldown to end."""
        if self.live is not None and self.wants_new_run(self.live, last):
            return True
        return failed and self.status.triggers is not None and bool(self.status.triggers.pending)

    def follow_up_message(self, last: CurrentRun) -> str:
        if self.live is not None and self.wants_new_run(self.live, last):
            return f"run {last.number} ended; the next run trains spec generation {self.generation}"
        pending = self.status.triggers.pending if self.status.triggers is not None else []
        what = ", ".join(sorted({p.trigger for p in pending}))
        return f"run {last.number} failed; a follow-up run ({what}) starts when the cooldown ends"

    def at_rest(self, suspended: Condition | None) -> tuple[str, str]:
        """``Ready=True``: why, and what a model is there."""
        promoted = self.status.promoted
        model = (
            f"run {promoted.run}'s model is promoted: {promoted.model_uri}"
            if promoted is not None
            else "no model is promoted yet"
        )
        awaiting = self.status.awaiting_approval
        if suspended is not None:
            return Reason.SUSPENDED, f"{suspended.message}; {model}"
        if awaiting is not None:
            return (
                Reason.AWAITING_APPROVAL,
                f"run {awaiting.run} awaits approval (annotate tuneloop.dev/approve={awaiting.run} or "
                f"tuneloop.dev/reject={awaiting.run}); {model}",
            )
        if promoted is not None:
            return Reason.PROMOTED, model
        return Reason.IDLE, f"nothing to do until the next trigger; {model}"

    def active_run(self, job: FineTuneJob, current: CurrentRun) -> None:
        self.cleanup_finished(job, keep=current.number)
        if job.spec.suspend:
            self.suspend(job, current)
            return
        if current.suspended_since is not None:
            self.resume(current)
        self.advance(job, current)

    # -- the spec a run trains --

    def stored_job(self, current: CurrentRun) -> FineTuneJob | None:
        """The job as the run's ConfigMap holds it (what its pods read), if it is there and is
        the spec the run started with."""
        name = names(self.name, current.number, 1).config_map
        for config_map in self.obs.config_maps:
            if (config_map.get("metadata") or {}).get("name") != name:
                continue
            try:
                manifest = json.loads(str((config_map.get("data") or {}).get(CONFIG_KEY)))
            except ValueError:
                return None
            job, _ = validate_manifest(manifest)
            return job if job is not None and current.spec_hash in spec_hashes(job.spec) else None
        return None

    def pinned(self, job: FineTuneJob, current: CurrentRun) -> FineTuneJob:
        """The job the active run trains: its stored spec with today's lifecycle fields and
        today's placement. A spec edited mid-run is trained by the next run; retries of this one
        keep their image and node count as they were (a retry with the old ConfigMap but new pods
        would mix two specs). Placement (``resources.nodeSelector``/``tolerations``,
        :data:`tuneloop.contract.PLACEMENT_FIELDS`) is not what a run trains: a queue such as Kueue
        may change it while the job is suspended, and the next attempt's pods go where it says."""
        stored = self.stored_job(current)
        if stored is None:
            return job
        lifecycle = {attr: getattr(job.spec, attr) for attr in _LIFECYCLE_ATTRS}
        placement = {attr: getattr(job.spec.resources, attr) for attr in _PLACEMENT_ATTRS}
        lifecycle["resources"] = stored.spec.resources.model_copy(update=placement)
        return stored.model_copy(update={"metadata": job.metadata, "spec": stored.spec.model_copy(update=lifecycle)})

    def keep_active_run_going(self) -> None:
        """The spec became invalid while a run is active: that run goes on under the spec it
        started with (its pods still read it), so it can still finish, be retried, time out or
        be suspended; ``spec.suspend`` is honoured as long as it reads as a boolean (Kueue sets
        it whatever else is wrong with the spec)."""
        current = self.status.current_run
        if current is None or current.result is not None:
            return
        stored = self.stored_job(current)
        if stored is None:
            return  # nothing to go by: the pods run on, and are looked at once the spec is fixed
        raw = self.obs.body.get("spec")
        suspend = raw.get("suspend") if isinstance(raw, Mapping) else None
        if isinstance(suspend, bool):
            stored = stored.model_copy(update={"spec": stored.spec.model_copy(update={"suspend": suspend})})
        self.active_run(stored, current)

    # -- a status that lost track of its runs --

    def adopt_orphans(self, job: FineTuneJob) -> None:
        """Pods of a run newer than the status knows (the status was lost, or written before the
        operator died between creating pods and recording them): adopt that run if its pods are
        alive, else record it as ended, so that run numbers (and S3 prefixes) are never reused."""
        newest = max((p.run for p in self.pods), default=0)
        known = self.status.current_run.number if self.status.current_run is not None else 0
        if newest <= known:
            return
        pods = self.run_pods(newest)
        attempt = max(p.attempt for p in pods)
        alive = [p for p in pods if p.attempt == attempt and p.alive]
        trigger: RunTrigger = "Created" if newest == 1 else "SpecChange"
        run = CurrentRun(
            number=newest,
            trigger=trigger,
            pods=sorted(p.name for p in pods if p.attempt == attempt),
            start_time=self.now,
            attempts=attempt,
            generation=self.generation,
            spec_hash=spec_hash(job),
            history=[Attempt(number=attempt, cause="Started", start_time=self.now)],
            # Run 1 is always the job's creation (as plan_start words it); a later run's detail is unknown.
            trigger_detail="the job was created" if newest == 1 else "",
        )
        # Followed, or judged by how its pods ended (a run that succeeded is not trained again; one
        # whose trainer failed while nothing was recorded is retried, not replaced by a new run).
        if alive or any(p.attempt == attempt and not p.deleting for p in pods):
            self.status.current_run = run
            self.cond(ConditionType.RUNNING, "True", Reason.POD_CREATED, f"run {newest}: found its pods")
            self.cond(ConditionType.COMPLETE, "False", Reason.RUN_STARTED, f"run {newest} is in progress")
            self.cond(ConditionType.FAILED, "False", Reason.RUN_STARTED, f"run {newest} is in progress")
            self.cond(ConditionType.DATA_VALID, "Unknown", Reason.RUN_STARTED, f"run {newest} validates its data")
            self.complete_adopted(job, newest, attempt)
            self.event(
                "Normal",
                Reason.RUN_STARTED,
                f"the status did not record run {newest}: found its pods (attempt {attempt}) and follows them; "
                f"guessed: trigger {trigger}, the current spec, start time now, earlier attempts and runs unknown",
            )
            return
        run.history = [run.history[0].model_copy(update={"end_time": self.now, "reason": "Unknown"})]
        run.result, run.reason, run.completion_time = "Cancelled", "Unknown", self.now
        run.spec_hash = None  # unknown: the next run trains the current spec
        self.status.current_run = run
        self.event(
            "Warning",
            Reason.RUN_STARTED,
            f"run {newest} ended while its status was not recorded; the next run is {newest + 1}",
        )

    def complete_adopted(self, job: FineTuneJob, run: int, attempt: int) -> None:
        """An operator that died while creating an attempt's objects left some ranks without a
        pod: create them, as long as no pod of the attempt has ended (a trainer waits for all its
        ranks before it trains), rather than take the attempt for lost."""
        pods = [p for p in self.run_pods(run) if p.attempt == attempt]
        if any(p.terminal or p.deleting for p in pods):
            return
        have = {p.name for p in pods}
        rendered = self.render_attempt(job, run, attempt)
        missing = [o for o in rendered if o["kind"] == "Pod" and o["metadata"]["name"] not in have]
        if not missing:
            return
        self.plan.create += [o for o in rendered if o["kind"] != "Pod" or o in missing]
        self.adopting |= {str(o["metadata"]["name"]) for o in missing}
        current = self.status.current_run
        if current is not None and current.number == run:
            current.pods = sorted(have | self.adopting)

    # -- spec changes --

    def wants_new_run(self, job: FineTuneJob, last: CurrentRun) -> bool:
        return job.spec.retrain.on_spec_change and last.spec_hash not in spec_hashes(job.spec)

    def track_spec_change(self, job: FineTuneJob) -> None:
        current = self.status.current_run
        seen = self.status.observed_generation
        if current is None or current.result is not None or seen is None or seen == self.generation:
            return
        if current.spec_hash in spec_hashes(job.spec):
            return  # lifecycle fields only (suspend, deadlines...): no new run
        if job.spec.retrain.on_spec_change:
            self.event(
                "Normal",
                Reason.SPEC_CHANGED,
                f"generation {self.generation} will be trained by the next run, after run {current.number} ends",
            )
        else:
            self.event(
                "Normal",
                Reason.SPEC_CHANGED,
                f"generation {self.generation} observed; retrain.onSpecChange is false, so no new run starts",
            )

    # -- the output prefix --

    def identity(self) -> JobIdentity:
        meta = self.obs.body.get("metadata") or {}
        uid = meta.get("uid")
        return JobIdentity(name=self.name, namespace=meta.get("namespace"), uid=str(uid) if uid else None)

    def claimable_run(self, job: FineTuneJob) -> int | None:
        """The number of the run to start, when the output prefix may be written by this job
        (the claim goes into the plan); ``None`` when it may not (said in the conditions) or
        was not read yet (``plan.needs``)."""
        view = self.obs.output
        if view is None:
            self.plan.needs.add("output")
            return None
        uri = job.spec.output.uri
        if view.error is not None:
            message = f"cannot read spec.output.uri {uri} to claim it: {view.error}; retrying"
            self.cond(ConditionType.RUNNING, "False", Reason.OUTPUT_UNAVAILABLE, _short(message, 1024))
            if self.cond_changed(ConditionType.RUNNING):
                self.event("Warning", Reason.OUTPUT_UNAVAILABLE, message)
            self.plan.requeue(OUTPUT_RETRY_SECONDS)
            return None
        me = self.identity()
        lineage = job.spec.output.continue_lineage
        problem = ownership_problem(view.owner, me, continue_lineage=lineage, output_uri=uri)
        if problem is not None:
            self.cond(ConditionType.FAILED, "True", Reason.OUTPUT_OWNED, problem)
            self.cond(ConditionType.RUNNING, "False", Reason.OUTPUT_OWNED, "no run starts: see the Failed condition")
            if self.cond_changed(ConditionType.FAILED):
                self.event("Warning", Reason.OUTPUT_OWNED, problem)
            self.plan.requeue(OUTPUT_RECHECK_SECONDS)
            return None
        last = self.status.current_run.number if self.status.current_run is not None else 0
        number = max(last, view.highest_run) + 1
        claimant = view.unstarted_claimant
        if (
            claimant is not None
            and claimant.same_job(me)
            and view.highest_run > last
            and not self.run_pods(view.highest_run)
        ):
            number = view.highest_run  # claimed by this job and never started: an operator died in between
        self.plan.claim = OutputClaim(identity=me, run=number, spec_hash=spec_hash(job), continue_lineage=lineage)
        self.plan.job = job
        if view.owner is not None and not view.owner.owner.same_job(me):
            self.event(
                "Normal",
                Reason.RUN_STARTED,
                f"spec.output.continueLineage: continuing the runs of {view.owner.owner.describe()} under {uri}; "
                f"the first run of this job is run {number}",
            )
        return number

    # -- starting --

    def start_run(self, job: FineTuneJob, number: int, why: PendingTrigger) -> None:
        trigger: RunTrigger = why.trigger
        child = names(self.name, number, 1)
        pods = [child.pod(r) for r in range(job.spec.resources.nodes)]
        self.plan.create += self.render_attempt(job, number, 1)
        self.status.current_run = CurrentRun(
            number=number,
            trigger=trigger,
            pods=pods,
            start_time=self.now,
            attempts=1,
            generation=self.generation,
            spec_hash=spec_hash(job),
            history=[Attempt(number=1, cause="Started", start_time=self.now)],
            trigger_detail=_short(why.detail, 512),
        )
        self.plan.started_run = number
        if job.spec.active_deadline_seconds is not None:
            self.plan.requeue(job.spec.active_deadline_seconds)
        what = f"{trigger}: {why.detail}"
        created = f"run {number} ({what}): created {len(pods)} pod(s)"
        self.cond(ConditionType.RUNNING, "True", Reason.POD_CREATED, created)
        self.cond(ConditionType.COMPLETE, "False", Reason.RUN_STARTED, f"run {number} is in progress")
        self.cond(ConditionType.FAILED, "False", Reason.RUN_STARTED, f"run {number} is in progress")
        self.cond(ConditionType.DATA_VALID, "Unknown", Reason.RUN_STARTED, f"run {number} validates its data")
        if find_condition(self.status.conditions, ConditionType.SUSPENDED) is not None:
            self.cond(ConditionType.SUSPENDED, "False", Reason.RESUMED, "spec.suspend is false")
        self.event("Normal", Reason.RUN_STARTED, _short(f"run {number} ({what}) started: pods {', '.join(pods)}", 1024))

    def start_attempt(self, job: FineTuneJob, current: CurrentRun, cause: AttemptCause) -> None:
        number = current.attempts + 1
        child = names(self.name, current.number, number)
        current.pods = [child.pod(r) for r in range(job.spec.resources.nodes)]
        current.attempts = number
        current.retry_after = None
        self.push_attempt(current, Attempt(number=number, cause=cause, start_time=self.now))
        self.plan.create += self.render_attempt(job, current.number, number)
        self.cond(
            ConditionType.RUNNING,
            "True",
            Reason.POD_CREATED,
            f"run {current.number}, attempt {number} ({cause.lower()}): created {len(current.pods)} pod(s); "
            f"resumes from the last checkpoint",
        )

    @staticmethod
    def push_attempt(current: CurrentRun, attempt: Attempt) -> None:
        current.history = [*current.history, attempt][-MAX_ATTEMPT_HISTORY:]

    # -- the active run --

    def open_attempt(self, current: CurrentRun) -> Attempt | None:
        if current.history and current.history[-1].end_time is None and current.history[-1].number == current.attempts:
            return current.history[-1]
        return None

    def close_attempt(self, current: CurrentRun, reason: str, message: str = "", exit_code: int | None = None) -> None:
        attempt = self.open_attempt(current)
        if attempt is None:
            return
        closed = attempt.model_copy(
            update={
                "end_time": self.now,
                "reason": reason,
                "exit_code": exit_code,
                "message": _short(message, MAX_ATTEMPT_MESSAGE),
            }
        )
        current.history = [*current.history[:-1], closed]
        for pod in self.run_pods(current.number):
            if pod.attempt == attempt.number and pod.alive:
                self.delete_pod(pod)

    def active_seconds(self, current: CurrentRun) -> float:
        start = current.start_time or self.now
        total = (self.now - start).total_seconds() - current.suspended_seconds
        if current.suspended_since is not None:
            total -= (self.now - current.suspended_since).total_seconds()
        return max(0.0, total)

    def advance(self, job: FineTuneJob, current: CurrentRun) -> None:
        self.apply_heartbeat(current)
        attempt = self.open_attempt(current)
        if attempt is not None:
            self.watch_attempt(job, current, attempt)
            if current.result is not None:
                return
        deadline = job.spec.active_deadline_seconds
        if deadline is not None:
            left = deadline - self.active_seconds(current)
            if left <= 0:
                self.close_attempt(current, Reason.DEADLINE_EXCEEDED, "the run's active deadline passed")
                self.finish(
                    job,
                    current,
                    "Failed",
                    Reason.DEADLINE_EXCEEDED,
                    f"run {current.number} was active longer than spec.activeDeadlineSeconds ({deadline}s)",
                )
                return
            self.plan.requeue(left)
        if self.open_attempt(current) is None:
            self.next_attempt(job, current)

    def next_attempt(self, job: FineTuneJob, current: CurrentRun) -> None:
        """Start the next attempt once its backoff is over and no earlier pod is alive."""
        if current.retry_after is not None and self.now < current.retry_after:
            self.plan.requeue((current.retry_after - self.now).total_seconds())
            return
        # Pods of the very attempt about to start were created by a pass whose status patch was
        # lost (the operator died in between): that attempt is started again over them, not fenced.
        alive = [
            p for p in self.run_pods(current.number) if p.alive and (p.attempt != current.attempts + 1 or p.deleting)
        ]
        overdue = [p for p in alive if self.stuck_terminating(p)]
        alive = [p for p in alive if p not in overdue]
        if alive:
            for pod in alive:
                self.delete_pod(pod)
            waiting = ", ".join(p.name for p in alive)
            self.cond(
                ConditionType.RUNNING,
                "True",
                Reason.POD_PENDING,
                f"run {current.number}: waiting for pod(s) {waiting} of the previous attempt to end",
            )
            self.plan.requeue(1.0)
            return
        for pod in overdue:
            late = (self.now - pod.deletion_deadline).total_seconds() if pod.deletion_deadline else 0.0
            self.event(
                "Warning",
                Reason.POD_STUCK,
                f"pod {pod.name} is still terminating {late:.0f}s after its grace period ended (its node may "
                "be unreachable); the next attempt starts without waiting for it",
            )
        previous = current.history[-1] if current.history else None
        cause: AttemptCause = "Retry"
        if previous is None:
            cause = "Started"
        elif previous.reason == Reason.PREEMPTED:
            cause = "Preempted"
        elif previous.reason == Reason.SUSPENDED or self.resumed:
            cause = "Resumed"
        self.start_attempt(job, current, cause)

    def watch_attempt(self, job: FineTuneJob, current: CurrentRun, attempt: Attempt) -> None:
        """Judge the open attempt by its pods."""
        nodes = job.spec.resources.nodes
        expected = {names(self.name, current.number, attempt.number).pod(r): r for r in range(nodes)}
        by_name = {p.name: p for p in self.run_pods(current.number) if p.attempt == attempt.number}
        pods = [by_name.get(name) for name in expected]
        missing = [name for name, pod in zip(expected, pods, strict=True) if pod is None and name not in self.adopting]
        present = [p for p in pods if p is not None]
        # What the trainer said wins over how its pod went away: a pod that finished (exit 0, or a
        # permanent code) and was deleted afterwards (a drain, kubectl delete) still ended the run.
        permanent = [p for p in present if p.phase == "Failed" and p.permanent_exit]
        if permanent:
            self.attempt_failed(job, current, min(permanent, key=lambda p: p.rank))
            return
        if not missing and present and all(p.phase == "Succeeded" for p in present):
            self.succeeded(job, current, present)
            return
        # A pod deleted long ago and still not gone sits on a node that no longer answers.
        lost = [
            p for p in present if p.disruption is not None or (p.deleting and (p.terminal or self.stuck_terminating(p)))
        ]
        failed = [p for p in present if p.phase == "Failed" and p.disruption is None]
        if missing and not lost and failed:
            # A rank's trainer failed and the operator deleted the others (its status patch may
            # have been lost since): the failure, not a preemption.
            self.attempt_failed(job, current, min(failed, key=lambda p: p.rank))
            return
        if missing or lost:
            what = (
                f"pod {missing[0]} was deleted"
                if missing
                else f"pod {lost[0].name} was {lost[0].disruption or 'deleted'}"
            )
            self.preempted(job, current, what)
            return
        failed = [p for p in present if p.phase == "Failed"]
        if failed:
            self.attempt_failed(job, current, min(failed, key=lambda p: p.rank))
            return
        if any(p.deleting for p in present):
            self.plan.requeue(1.0)  # someone is deleting a pod: see how it ends
        stuck = [p for p in present if p.stuck]
        if stuck:
            pod = stuck[0]
            before = find_condition(self.old.conditions, ConditionType.RUNNING)
            self.cond(ConditionType.RUNNING, "True", Reason.POD_STUCK, f"pod {pod.name} cannot start: {pod.stuck}")
            if before is None or before.reason != Reason.POD_STUCK:
                # One event when it gets stuck, not one per message change (ErrImagePull ↔ ImagePullBackOff).
                self.event("Warning", Reason.POD_STUCK, f"pod {pod.name} cannot start: {pod.stuck}")
            return
        if present and all(p.phase in ("Running", "Succeeded") for p in present):
            self.running(current)  # every rank started (some may already be done)
        else:
            pending = ", ".join(p.name for p in present if p.phase == "Pending")
            message = f"waiting for pod(s) {pending} to start"
            if any(p.gated for p in present):
                message = f"waiting for pod(s) {pending} to be admitted (scheduling gates, e.g. a Kueue queue)"
            self.cond(ConditionType.RUNNING, "True", Reason.POD_PENDING, message)

    def running(self, current: CurrentRun) -> None:
        beat = self.own_heartbeat(current)
        phase = beat.phase if beat is not None else ""
        progress = current.progress
        if phase == "evaluating":
            self.cond(ConditionType.RUNNING, "True", Reason.EVALUATING, f"run {current.number} is evaluating")
        else:
            detail = ""
            if progress is not None and progress.total_steps:
                detail = f": step {progress.step}/{progress.total_steps}"
            self.cond(ConditionType.RUNNING, "True", Reason.TRAINING, f"run {current.number} is training{detail}")
        if phase in ("training", "evaluating", "uploading"):
            self.data_valid()

    def data_valid(self) -> None:
        data = find_condition(self.status.conditions, ConditionType.DATA_VALID)
        if data is None or data.status != "True":
            self.cond(ConditionType.DATA_VALID, "True", Reason.DATA_VALIDATED, "the data passed validation")

    def own_heartbeat(self, current: CurrentRun) -> Heartbeat | None:
        """The heartbeat, if this run's pods wrote it (same run, same job uid): a heartbeat left
        under the prefix by another job is never this job's progress."""
        beat = self.obs.heartbeat
        if beat is None or beat.run != current.number or beat.job_uid != self.identity().uid:
            return None
        return beat

    def apply_heartbeat(self, current: CurrentRun) -> None:
        beat = self.own_heartbeat(current)
        if beat is None:
            return
        current.progress = beat.progress()
        if beat.last_checkpoint is not None:
            current.last_checkpoint = CheckpointRef(step=beat.last_checkpoint.step, uri=beat.last_checkpoint.uri)

    # -- endings of an attempt --

    def preempted(self, job: FineTuneJob, current: CurrentRun, what: str) -> None:
        self.close_attempt(current, Reason.PREEMPTED, what)
        current.preemptions += 1
        self.plan.preempted = True
        if current.preemptions > self.settings.max_preemptions:
            self.finish(
                job,
                current,
                "Failed",
                Reason.PREEMPTION_LIMIT_EXCEEDED,
                f"run {current.number} lost {current.preemptions} attempts to preemption "
                f"(the operator allows {self.settings.max_preemptions}); last: {what}",
            )
            return
        self.event(
            "Warning",
            Reason.PREEMPTED,
            f"run {current.number}, attempt {current.attempts}: {what}; a new attempt resumes from the last "
            f"checkpoint (preemption {current.preemptions}, not counted against backoffLimit)",
        )

    def attempt_failed(self, job: FineTuneJob, current: CurrentRun, pod: PodView) -> None:
        summary = parse_summary(pod.termination_message)
        said = str(summary.get("message") or "") if summary else cause_of(pod.termination_message)
        if pod.exit_code is None:
            # Failed before (or without) a container exit: rejected by the kubelet, say. Retryable.
            code = None
            detail = f"pod {pod.name} failed before its trainer ran" + (f": {pod.detail}" if pod.detail else "")
        else:
            code = pod.exit_code
            detail = f"pod {pod.name} exited with code {code}" + (f": {_short(said, 600)}" if said.strip() else "")
        if code is not None and not is_retryable(code):
            reason = PERMANENT_REASONS.get(code, Reason.INVALID_CONFIG)
            if code == ExitCode.INVALID_CONFIG and summary.get("reason") == Reason.OUTPUT_OWNED:
                reason = Reason.OUTPUT_OWNED  # the trainer found its output or run claimed by another job
            self.close_attempt(current, reason, detail, exit_code=code)
            if reason == Reason.INVALID_DATA:
                self.cond(ConditionType.DATA_VALID, "False", Reason.INVALID_DATA, _short(said or detail, 1000))
            elif reason == Reason.GATE_FAILED:
                self.data_valid()
            result: RunResult = "GateFailed" if reason == Reason.GATE_FAILED else "Failed"
            self.finish(job, current, result, reason, f"{detail} (permanent: not retried)", summary=summary)
            return
        self.close_attempt(current, Reason.TRAINER_FAILED, detail, exit_code=code)
        current.failures += 1
        limit = job.spec.backoff_limit
        if current.failures > limit:
            self.finish(
                job,
                current,
                "Failed",
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"run {current.number} failed {current.failures} times (backoffLimit {limit}); last: {detail}",
            )
            return
        delay = backoff_seconds(current.failures, self.settings)
        current.retry_after = self.now + timedelta(seconds=delay)
        self.plan.retried = True
        self.plan.requeue(delay)
        message = (
            f"run {current.number}, attempt {current.attempts}: {detail}; retry {current.failures} of {limit} "
            f"in {delay:.0f}s from the last checkpoint"
        )
        self.cond(ConditionType.RUNNING, "True", Reason.RETRYING, message)
        self.event("Warning", Reason.RETRYING, message)

    def succeeded(self, job: FineTuneJob, current: CurrentRun, pods: list[PodView]) -> None:
        rank0 = min(pods, key=lambda p: p.rank)
        summary = parse_summary(rank0.termination_message)
        self.close_attempt(current, Reason.SUCCEEDED, "all pods succeeded", exit_code=0)
        self.data_valid()
        self.finish(job, current, "Succeeded", Reason.SUCCEEDED, "", summary=summary)

    def finish(
        self,
        job: FineTuneJob,
        current: CurrentRun,
        result: RunResult,
        reason: str,
        message: str,
        *,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """End the run: delete what still runs, record it, set the conditions, tell the user."""
        for pod in self.run_pods(current.number):
            if pod.alive:
                self.delete_pod(pod)
        summary = summary or {}
        metrics = _float_metrics(summary.get("metrics"))
        model_uri = summary.get("modelUri") if isinstance(summary.get("modelUri"), str) else None
        if model_uri is not None and len(model_uri) > MAX_URI:
            model_uri = None  # a cut URI would point elsewhere; the model card in S3 still has it
        fingerprint = summary.get("dataFingerprint") if isinstance(summary.get("dataFingerprint"), str) else None
        current.result = result
        current.reason = reason
        current.completion_time = self.now
        current.retry_after = None
        headline = headline_metric(job, metrics)
        if result == "Succeeded" and not message:
            message = "succeeded" + (f" ({headline})" if headline else "")
        promoted_metrics = _float_metrics(summary.get("promotedMetrics"))
        drift = summary.get("dataDrift")
        record = RunRecord(
            number=current.number,
            trigger=current.trigger,
            trigger_detail=current.trigger_detail,
            result=result,
            reason=reason,
            metrics=metrics,
            promoted_metrics=promoted_metrics,
            data_drift=float(drift) if isinstance(drift, int | float) and math.isfinite(drift) else None,
            model_uri=model_uri,
            data_fingerprint=fingerprint[:128] if fingerprint else None,
            start_time=current.start_time,
            completion_time=self.now,
            attempts=current.attempts,
            preemptions=current.preemptions,
            message=_short(message, 1024),
        )
        self.status.runs = [*(r for r in self.status.runs if r.number != current.number), record][-MAX_RUN_HISTORY:]
        if headline is not None:
            self.status.metric = headline
        self.plan.finished = (result, reason)
        self.plan.job = job
        self.plan.index.append(
            {"event": "finished", **record.model_dump(mode="json", by_alias=True, exclude_none=True)}
        )
        if job.spec.ttl_seconds_after_finished is not None:
            self.plan.requeue(job.spec.ttl_seconds_after_finished)
        if self.live is not None and self.wants_new_run(self.live, current):
            self.plan.requeue(0.0)
        # The whole story goes once, into the condition that tells it (Complete or Failed);
        # the others say where it went.
        if result == "Succeeded":
            where = f"; model at {model_uri}" if model_uri else ""
            text = f"run {current.number} succeeded{f' ({headline})' if headline else ''}{where}"
            self.cond(ConditionType.RUNNING, "False", Reason.SUCCEEDED, f"run {current.number} ended")
            self.cond(ConditionType.COMPLETE, "True", Reason.SUCCEEDED, text)
            self.cond(ConditionType.FAILED, "False", Reason.SUCCEEDED, f"run {current.number} succeeded")
            self.event("Normal", Reason.SUCCEEDED, text)
        else:
            text = f"run {current.number} failed ({reason}): {message}"
            short = f"run {current.number} failed ({reason}): see the Failed condition"
            self.cond(ConditionType.RUNNING, "False", reason, f"run {current.number} ended")
            self.cond(ConditionType.COMPLETE, "False", reason, short)
            self.cond(ConditionType.FAILED, "True", reason, text)
            self.event("Warning", reason, text)
        if result != "Superseded":
            self.promote_or_not(job, record, summary)

    def promote_or_not(self, job: FineTuneJob, record: RunRecord, summary: Mapping[str, Any]) -> None:
        """The promotion decision for a run that just ended (:func:`tuneloop_operator.promotion.decide`)."""
        promoted_run = summary.get("promotedRun")
        candidate = promo.Candidate.of(
            record,
            promoted_run=promoted_run if isinstance(promoted_run, int) and promoted_run >= 1 else None,
            failed_gates=_failed_gates(summary),
        )
        if self.status.awaiting_approval is not None and record.result == "Succeeded":
            older = self.status.awaiting_approval.run
            self.status.awaiting_approval = None
            superseded = promo.PromotionOutcome(
                decision=PromotionDecision(
                    decision="NotPromoted",
                    reason=f"superseded by run {record.number} before it was approved",
                    by="gates",
                    time=self.now,
                )
            )
            self.apply_promotion(older, superseded)
        self.apply_promotion(
            record.number,
            promo.decide(
                candidate,
                job.spec.promotion,
                current=self.status.promoted,
                now=self.now,
                base_model_uri=job.spec.model.uri,
                job=self.identity().to_wire(),
            ),
        )

    # -- suspend --

    def suspend(self, job: FineTuneJob, current: CurrentRun) -> None:
        del job
        if current.suspended_since is None:
            current.suspended_since = self.now
            self.close_attempt(current, Reason.SUSPENDED, "spec.suspend is true")
            self.event(
                "Normal",
                Reason.SUSPENDED,
                f"run {current.number} suspended: pods deleted, checkpoints kept; unsuspend to resume",
            )
        for pod in self.run_pods(current.number):
            if pod.alive:
                self.delete_pod(pod)
        alive = [p.name for p in self.run_pods(current.number) if p.alive]
        message = f"run {current.number} is suspended; it resumes from its last checkpoint when spec.suspend is false"
        if alive:
            message += f" (pods still stopping: {', '.join(alive)})"
            self.plan.requeue(1.0)
        self.cond(ConditionType.SUSPENDED, "True", Reason.SUSPENDED, message)
        self.cond(ConditionType.RUNNING, "False", Reason.SUSPENDED, message)

    def suspended_idle(self) -> None:
        message = "spec.suspend is true: no run starts until it is false"
        self.cond(ConditionType.SUSPENDED, "True", Reason.SUSPENDED, message)
        if find_condition(self.status.conditions, ConditionType.RUNNING) is None:
            self.cond(ConditionType.RUNNING, "False", Reason.SUSPENDED, message)

    def resume(self, current: CurrentRun) -> None:
        assert current.suspended_since is not None
        current.suspended_seconds += max(0, int((self.now - current.suspended_since).total_seconds()))
        current.suspended_since = None
        self.resumed = True
        self.cond(ConditionType.SUSPENDED, "False", Reason.RESUMED, "spec.suspend is false")
        self.event("Normal", Reason.RESUMED, f"run {current.number} resumes from its last checkpoint")

    # -- cleanup --

    def cleanup_finished(self, job: FineTuneJob, keep: int | None = None) -> None:
        """``ttlSecondsAfterFinished``: delete the pods, ConfigMaps and Services of finished runs
        (never anything in S3)."""
        ttl = job.spec.ttl_seconds_after_finished
        if ttl is None:
            return
        finished = {r.number: r.completion_time for r in self.status.runs}
        current = self.status.current_run
        oldest_known = min(finished, default=0)
        doomed: list[ObjectRef] = []
        cleaned: set[int] = set()
        kinds = (("v1", "Pod", self.obs.pods), ("v1", "ConfigMap", self.obs.config_maps))
        for api_version, kind, objs in (*kinds, ("v1", "Service", self.obs.services)):
            for obj in objs:
                run = _child_run(obj)
                meta = obj.get("metadata") or {}
                if run is None or run == keep or meta.get("deletionTimestamp"):
                    continue
                done = finished.get(run)
                if done is not None:
                    left = ttl - (self.now - done).total_seconds()
                elif current is not None and run < min(current.number, oldest_known or current.number):
                    left = 0.0  # older than the bounded history: long finished
                else:
                    continue  # not known to have finished
                if left > 0:
                    self.plan.requeue(left)
                    continue
                doomed.append(ObjectRef(api_version, kind, str(meta.get("name"))))
                cleaned.add(run)
        if doomed:
            self.plan.delete += doomed
            self.event(
                "Normal",
                Reason.CLEANED_UP,
                f"ttlSecondsAfterFinished ({ttl}s) passed: deleted the pods and ConfigMaps of run(s) "
                f"{', '.join(map(str, sorted(cleaned)))}; checkpoints and models in {job.spec.output.uri} are kept",
            )


def plan(observed: Observed, settings: PlannerSettings) -> Plan:
    """What to do about one FineTuneJob, given what was observed (see the module docstring)."""
    return _Planner(observed, settings).run()


def plan_deletion(body: Mapping[str, Any]) -> tuple[list[Event], str]:
    """What to say when a job is deleted: its children go (owner references and the finalizer),
    its S3 artifacts stay."""
    spec = body.get("spec") or {}
    uri = str((spec.get("output") or {}).get("uri") or "its output URI")
    message = (
        f"deleted; pods and ConfigMaps removed; checkpoints and models under {uri} are kept "
        "(delete them there if unwanted)"
    )
    return [Event("Normal", Reason.ARTIFACTS_RETAINED, message)], uri
