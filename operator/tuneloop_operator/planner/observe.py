"""Observe: one FineTuneJob and its children, read into the views the decisions are made on.

:class:`PodView` is one trainer pod as the planner judges it (which run, attempt and rank; how
it ended, why it was taken away or cannot start). :class:`View` is everything observed about the
job in one pass (:class:`~tuneloop_operator.planner.types.Observed`), parsed once and never
changed: the job as it is now, the status as it was written, the pods, what a run's ConfigMap
says it trains, the heartbeat that is this run's own. The helpers below read the trainer's
termination message (its JSON summary, or the tail of its log).

Only parsing happens here: what is read from the API server and from storage, and when, is
:mod:`tuneloop_operator.observe`'s and the handlers' business.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydantic import ValidationError

from tuneloop.api import FineTuneJob
from tuneloop.api.spec import FineTuneJobSpec, Resources
from tuneloop.api.status import CurrentRun, FineTuneJobStatus, PromotionDecision, RunRecord
from tuneloop.contract import LIFECYCLE_FIELDS, PLACEMENT_FIELDS, Heartbeat, is_retryable, spec_hashes
from tuneloop.contract import spec_hash as contract_spec_hash
from tuneloop.ownership import JobIdentity
from tuneloop.validate import Problem, validate_manifest
from tuneloop_operator.planner.types import Observed
from tuneloop_operator.render import CONFIG_KEY, LABEL_ATTEMPT, LABEL_NODE_RANK, LABEL_RUN, names

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


def float_metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        return {}
    return {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def failed_gates(summary: Mapping[str, Any]) -> list[str]:
    """The gates the trainer's summary says did not pass, in words (``f1=0.871``)."""
    out: list[str] = []
    for gate in summary.get("gates") or []:
        if isinstance(gate, Mapping) and gate.get("passed") is False:
            value = gate.get("value")
            shown = f"{value:.4g}" if isinstance(value, int | float) else "n/a"
            out.append(f"{gate.get('metric')}={shown}")
    return out


@dataclass(frozen=True)
class IndexHistory:
    """The lineage index (``runs/index.json``) read into what the status keeps."""

    runs: dict[int, RunRecord]
    """Each finished run's record (the last one the index holds for its number), with the last
    promotion decision recorded for it."""
    last_decision: tuple[int, PromotionDecision] | None = None
    """The newest promotion decision: the run it is about, and the decision."""
    unreadable: int = 0
    """Records this version cannot read (another event, or fields it does not know)."""


_RECORD_FIELDS: Final = frozenset(info.alias or name for name, info in RunRecord.model_fields.items())
_DECISION_FIELDS: Final = frozenset(info.alias or name for name, info in PromotionDecision.model_fields.items())


def parse_index(records: Sequence[Mapping[str, Any]]) -> IndexHistory:
    """The index's records (oldest first) as run records and decisions: a run's later record
    replaces an earlier one (a run recorded twice is one run), as does a later decision."""
    runs: dict[int, RunRecord] = {}
    decisions: dict[int, PromotionDecision] = {}
    last: tuple[int, PromotionDecision] | None = None
    unreadable = 0
    for raw in records:
        event = raw.get("event")
        try:
            if event == "finished":
                record = RunRecord.model_validate({k: v for k, v in raw.items() if k in _RECORD_FIELDS})
                runs[record.number] = record
                continue
            run = raw.get("run")
            if event == "promotion" and isinstance(run, int) and not isinstance(run, bool) and run >= 1:
                decision = PromotionDecision.model_validate({k: v for k, v in raw.items() if k in _DECISION_FIELDS})
                decisions[run] = decision
                last = (run, decision)
                continue
        except ValidationError:
            pass
        unreadable += 1
    for number, decision in decisions.items():
        if number in runs:
            runs[number] = runs[number].model_copy(update={"promotion": decision})
    return IndexHistory(runs=runs, last_decision=last, unreadable=unreadable)


def child_run(obj: Mapping[str, Any]) -> int | None:
    try:
        return int(((obj.get("metadata") or {}).get("labels") or {})[LABEL_RUN])
    except (KeyError, TypeError, ValueError):
        return None


def wants_new_run(job: FineTuneJob, last: CurrentRun) -> bool:
    """The spec asks for a run after ``last``: it trains something else (a lifecycle field such
    as ``suspend`` alone does not) and ``retrain.onSpecChange`` is on."""
    return job.spec.retrain.on_spec_change and last.spec_hash not in spec_hashes(job.spec)


class View:
    """One job as observed in this pass, parsed once; nothing here changes during the pass."""

    def __init__(self, observed: Observed) -> None:
        self.obs = observed
        self.now = observed.now
        meta = observed.body.get("metadata") or {}
        self.name = str(meta.get("name"))
        self.generation = int(meta.get("generation") or 0)
        self.old = parse_status(observed.body.get("status"))
        """The status as it was written (what this pass changes is compared against it)."""
        self.pods = [v for v in (PodView.from_manifest(p) for p in observed.pods) if v is not None]
        self.owner = owner_of(observed.body)
        uid = meta.get("uid")
        self.identity = JobIdentity(name=self.name, namespace=meta.get("namespace"), uid=str(uid) if uid else None)
        self.live, self.problems = parse_job(observed.body)
        """The job as it is now (``None`` while its spec is invalid, for the ``problems`` listed)."""
        self.annotations: Mapping[str, Any] = meta.get("annotations") or {}

    def run_pods(self, run: int) -> list[PodView]:
        return [p for p in self.pods if p.run == run]

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

    def job_of(self, current: CurrentRun, job: FineTuneJob) -> FineTuneJob:
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

    def own_heartbeat(self, current: CurrentRun) -> Heartbeat | None:
        """The heartbeat, if this run's pods wrote it (same run, same job uid): a heartbeat left
        under the prefix by another job is never this job's progress."""
        beat = self.obs.heartbeat
        if beat is None or beat.run != current.number or beat.job_uid != self.identity.uid:
            return None
        return beat
