"""The planner's data types: what it is given (:class:`Observed`) and what it returns (:class:`Plan`).

Plain data, no logic beyond :meth:`Plan.requeue` and :func:`short`: the operator's reconcile
loop fills an :class:`Observed`, and :mod:`tuneloop_operator.executor` carries out a
:class:`Plan`; :mod:`tuneloop_operator.outputs` reads an :class:`OutputView` and makes an
:class:`OutputClaim`; :mod:`tuneloop_operator.kube` posts an :class:`Event`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tuneloop.api import FineTuneJob
from tuneloop.api.status import FineTuneJobStatus
from tuneloop.contract import Heartbeat, PromotedPointer
from tuneloop.ownership import JobIdentity, OwnerRecord
from tuneloop.text import clip
from tuneloop_operator import promotion as promo
from tuneloop_operator import triggers
from tuneloop_operator.render import Manifest


def short(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis); one line unless it has several."""
    text = " ".join(text.split()) if "\n" not in text.strip() else text.strip()
    return clip(text, limit)


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
class HistoryView:
    """What the output prefix remembers of a job's runs, read only when the status was found
    empty while the job has runs (its pods exist, or the prefix it owns has runs): the lineage
    index and the promoted pointer the status is rebuilt from."""

    index_uri: str
    """Where the lineage index is (``runs/index.json``)."""
    pointer_uri: str
    """Where the promoted pointer is (``promoted.json``)."""
    records: Sequence[Mapping[str, Any]] = ()
    """The index's records, oldest first (none: it does not exist, or could not be read)."""
    index_error: str | None = None
    """Why the index could not be read or is not a ``tuneloop-index/1`` object."""
    pointer: PromotedPointer | None = None
    """``promoted.json`` (``None``: nothing was promoted, or it could not be read)."""
    pointer_error: str | None = None
    """Why ``promoted.json`` could not be read or is not a ``tuneloop-promoted/1`` object."""
    spec_hashes: Mapping[int, str] = field(default_factory=dict)
    """Run → the spec hash its claim (``runs/<n>/run.json``) records, for the latest finished run."""


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
    triggers: :class:`tuneloop_operator.triggers.Observations`), ``pin`` (the pinned run's model),
    ``history`` (the status was found empty: :class:`HistoryView`)."""
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
    history: HistoryView | None = None
    """The lineage index and promoted pointer, read when the plan asked for them (``history``:
    the status was found empty while the job has runs)."""
