"""The FineTuneJob status: what the operator observed.

Conditions follow ``metav1.Condition`` (type, status, reason, message,
lastTransitionTime, observedGeneration) so kubectl, Argo CD and Flux (kstatus) read them
without teaching. ``phase`` is derived from the conditions (:func:`derive_phase`), never
stored apart from them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import Field

from tuneloop.api.types import ApiModel

Phase = Literal["Pending", "Validating", "Running", "Evaluating", "Succeeded", "Failed", "Suspended"]
ConditionStatus = Literal["True", "False", "Unknown"]
RunTrigger = Literal["Created", "SpecChange", "NewData", "Drift", "Schedule", "Manual"]
RunResult = Literal["Succeeded", "Failed", "GateFailed", "Superseded", "Cancelled"]


class ConditionType:
    """Condition types a FineTuneJob reports."""

    READY: Final = "Ready"
    """The job is at rest in a good state: the operator acted on the current generation, no run
    is in progress and nothing waits for a fix. ``True`` once a run ended well (its model promoted,
    awaiting approval, or not promoted while an earlier model stays promoted), while suspended, or
    while waiting for the next trigger; ``False`` while ``Reconciling`` or ``Stalled`` is ``True``
    (same reason and message). Whether a model is available is ``status.promoted``."""
    RUNNING: Final = "Running"
    """A run is in progress (pods exist or are being created)."""
    COMPLETE: Final = "Complete"
    """The latest run finished successfully."""
    FAILED: Final = "Failed"
    """The latest run failed, or the spec is invalid."""
    SUSPENDED: Final = "Suspended"
    """``spec.suspend`` is true and the run's pods are gone."""
    DATA_VALID: Final = "DataValid"
    """The latest run's data passed validation."""
    PROMOTED: Final = "Promoted"
    """The latest finished run's model was promoted (``False``: why not; ``Unknown`` while it
    awaits approval)."""
    TRIGGERS_HEALTHY: Final = "TriggersHealthy"
    """Every configured retraining trigger can look (the data listing and the drift query work);
    ``False`` names the one that cannot and why. No run starts from a trigger that cannot look."""

    RECONCILING: Final = "Reconciling"
    """kstatus' "abnormal-true" condition: ``True`` while the operator is still working towards
    the spec — a run is starting, running, evaluating or backing off before a retry, the pods of
    an earlier run are stopping, or a follow-up run is waiting to start; ``False`` otherwise."""
    STALLED: Final = "Stalled"
    """kstatus' "abnormal-true" condition: ``True`` when the job cannot make progress without a
    person: the spec is invalid, the output belongs to another job or cannot be read, a pod cannot
    start, or the latest run failed (retries exhausted, a permanent exit, its gates) or its
    candidate was refused while no model is promoted, and no follow-up run is pending."""

    ALL: Final = (
        READY,
        RUNNING,
        COMPLETE,
        FAILED,
        SUSPENDED,
        DATA_VALID,
        PROMOTED,
        TRIGGERS_HEALTHY,
        RECONCILING,
        STALLED,
    )


class Reason:
    """Reasons used in conditions and events (CamelCase, as Kubernetes expects)."""

    CREATED: Final = "Created"
    """The job was created; the first run is being set up."""
    INVALID_SPEC: Final = "InvalidSpec"
    """The spec breaks a rule the CRD schema cannot check; no pod is created."""
    POD_CREATED: Final = "PodCreated"
    """Trainer pods were created."""
    POD_PENDING: Final = "PodPending"
    """Trainer pods exist but are not running yet (scheduling, image pull)."""
    POD_STUCK: Final = "PodStuck"
    """A trainer pod cannot start (image pull error, unschedulable), or stays ``Terminating``
    long after its grace period (its node no longer answers); the message says why."""
    TRAINING: Final = "Training"
    """The trainer is training."""
    EVALUATING: Final = "Evaluating"
    """The trainer is evaluating the trained model."""
    SUCCEEDED: Final = "Succeeded"
    """The run finished and wrote its model."""
    DATA_VALIDATED: Final = "DataValidated"
    """The data passed validation."""
    INVALID_DATA: Final = "InvalidData"
    """The data failed validation (permanent; not retried)."""
    INVALID_CONFIG: Final = "InvalidConfig"
    """The trainer rejected its configuration (permanent; not retried)."""
    UNSUPPORTED_MODEL: Final = "UnsupportedModel"
    """The model does not fit the task or method (permanent; not retried)."""
    GATE_FAILED: Final = "GateFailed"
    """The run trained but did not pass its promotion gates."""
    BACKOFF_LIMIT_EXCEEDED: Final = "BackoffLimitExceeded"
    """Retryable failures exceeded ``spec.backoffLimit``."""
    PREEMPTION_LIMIT_EXCEEDED: Final = "PreemptionLimitExceeded"
    """The run was preempted more often than the operator allows."""
    DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
    """The run was active longer than ``spec.activeDeadlineSeconds``."""
    RETRYING: Final = "Retrying"
    """A retryable failure; the run is retried with backoff from its last checkpoint."""
    PREEMPTED: Final = "Preempted"
    """A pod was preempted, evicted or lost with its node; recreated without using a retry."""
    SUSPENDED: Final = "Suspended"
    """``spec.suspend`` is true."""
    RESUMED: Final = "Resumed"
    """The job was unsuspended; the run continues from its last checkpoint."""
    AWAITING_APPROVAL: Final = "AwaitingApproval"
    """Gates passed; promotion waits for the approval annotation."""
    PROMOTED: Final = "Promoted"
    """The run's model was promoted."""
    NOT_PROMOTED: Final = "NotPromoted"
    """The run's model was not promoted (gates or approval); the message says why."""
    REJECTED: Final = "Rejected"
    """A run awaiting approval was rejected by the annotation ``tuneloop.dev/reject``."""
    PINNED: Final = "Pinned"
    """``spec.promotion.pin`` names the promoted run."""
    PIN_INVALID: Final = "PinInvalid"
    """``spec.promotion.pin`` names a run whose model does not exist (any more)."""
    TRIGGERS_OK: Final = "TriggersOK"
    """Every configured trigger looked successfully."""
    DECISION_REFUSED: Final = "DecisionRefused"
    """An approve or reject annotation named a run that is not awaiting approval."""
    TRIGGERED: Final = "Triggered"
    """A retraining trigger fired (new data, drift, schedule, a manual request)."""
    TRIGGER_SUPPRESSED: Final = "TriggerSuppressed"
    """A trigger fired but no run starts yet (cooldown, a run is active); the message says
    until when. Coalesced: one follow-up run, whatever the number of triggers."""
    TRIGGER_SKIPPED: Final = "TriggerSkipped"
    """A trigger looked and found no reason to run (too few new rows, a missed schedule)."""
    TRIGGER_ERROR: Final = "TriggerError"
    """A trigger could not look (a listing or a query failed, or returned no single number)."""
    SUPERSEDED: Final = "Superseded"
    """The run was stopped for a newer spec (``retrain.concurrencyPolicy: Replace``)."""
    NO_RUN: Final = "NoRun"
    """No run has happened yet."""
    RUN_STARTED: Final = "RunStarted"
    """A new run started (its first attempt's pods were created)."""
    SPEC_CHANGED: Final = "SpecChanged"
    """The spec changed while a run was active; the next run trains the new spec."""
    TRAINER_FAILED: Final = "TrainerFailed"
    """The trainer ended with a retryable failure (a crash, an out-of-memory kill, a signal)."""
    POD_CREATE_FAILED: Final = "PodCreateFailed"
    """The API server refused to create a trainer pod (quota, admission); retried."""
    CLEANED_UP: Final = "CleanedUp"
    """``ttlSecondsAfterFinished`` passed: the finished runs' pods and ConfigMaps were deleted."""
    ARTIFACTS_RETAINED: Final = "ArtifactsRetained"
    """The job was deleted: its pods are gone, its checkpoints and models stay in S3."""
    OUTPUT_OWNED: Final = "OutputOwned"
    """``spec.output.uri`` belongs to another job (or to a deleted job of the same name without
    ``spec.output.continueLineage``); no run starts. The message names the owner."""
    OUTPUT_UNAVAILABLE: Final = "OutputUnavailable"
    """The output location could not be read or claimed (access, endpoint); retried."""
    RECONCILED: Final = "Reconciled"
    """``Reconciling``/``Stalled`` are ``False``: nothing is in progress and nothing is stuck."""
    IDLE: Final = "Idle"
    """``Ready``: no run has anything left to do; the job waits for its next trigger."""
    FOLLOW_UP_PENDING: Final = "FollowUpPending"
    """``Reconciling``: the latest run ended and another run is about to start (a new generation,
    a pending trigger)."""
    STATUS_RESTORED: Final = "StatusRestored"
    """The status was found empty while the job has runs (it was wiped, or written by an unknown
    version): the run history was rebuilt from the output's lineage index (``runs/index.json``)
    and the promoted model from ``promoted.json``; the event says what was restored, and what
    could not be (with the object's URI)."""


class Condition(ApiModel):
    """One aspect of the job's state, in the shape of ``metav1.Condition``."""

    type: Annotated[str, Field(min_length=1, max_length=316)]
    """Condition type, e.g. ``Running`` (see the ConditionType constants)."""
    status: ConditionStatus
    """``True``, ``False`` or ``Unknown``."""
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")]
    """Machine-readable CamelCase reason (see the Reason constants)."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable detail."""
    last_transition_time: datetime
    """When ``status`` last changed (not when the message did)."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The ``metadata.generation`` this condition was computed for."""


class TrainingProgress(ApiModel):
    """How far training is and how fast it goes (Kubeflow Trainer's names): the fields the
    status' :class:`Progress` and the trainer's heartbeat (:class:`tuneloop.contract.Heartbeat`)
    share."""

    step: Annotated[int, Field(ge=0)] = 0
    """Optimizer steps done."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps planned."""
    epoch: Annotated[float, Field(ge=0)] = 0.0
    """Fractional epoch."""
    progress_percentage: Annotated[int, Field(ge=0, le=100)] | None = None
    """Percent of planned steps done."""
    estimated_remaining_seconds: Annotated[int, Field(ge=0)] | None = None
    """Estimated seconds to the end of training."""
    loss: float | None = None
    """Latest training loss."""
    tokens_per_second: Annotated[float, Field(ge=0)] | None = None
    """Training throughput in non-padding tokens per second."""


class Progress(TrainingProgress):
    """Training progress, read from the trainer's heartbeat (Kubeflow Trainer's names)."""

    metrics: dict[str, float] = Field(default_factory=dict)
    """Latest evaluation metrics by name."""
    last_updated_time: datetime | None = None
    """When the heartbeat was written."""


class CheckpointRef(ApiModel):
    """A complete checkpoint (its manifest was written)."""

    step: Annotated[int, Field(ge=0)]
    """Step of the checkpoint."""
    uri: Annotated[str, Field(max_length=2048)]
    """Where it is."""


AttemptCause = Literal["Started", "Retry", "Preempted", "Resumed"]


class Attempt(ApiModel):
    """One attempt of a run: a set of trainer pods, one per node. A retry, a preemption or an
    unsuspend starts a new attempt, which resumes from the run's last complete checkpoint."""

    number: Annotated[int, Field(ge=1)]
    """Attempt number within the run (pods are named ``<job>-r<run>-a<attempt>-n<rank>``)."""
    cause: AttemptCause
    """Why the attempt started: the run ``Started``, a ``Retry`` after a retryable failure, the
    previous attempt was ``Preempted`` (or evicted, or lost with its node), or the job was
    ``Resumed`` after a suspension."""
    start_time: datetime | None = None
    """When its pods were created."""
    end_time: datetime | None = None
    """When it ended."""
    reason: Annotated[str, Field(max_length=1024)] | None = None
    """How it ended (a Reason constant), unset while it runs."""
    exit_code: int | None = None
    """The trainer's exit code, when a process ended (see the trainer's exit-code table)."""
    message: Annotated[str, Field(max_length=1024)] = ""
    """Detail: the pod's own reason, or the trainer's last words."""


MAX_ATTEMPT_HISTORY: Final = 20


class CurrentRun(ApiModel):
    """The run in progress (or the latest one)."""

    number: Annotated[int, Field(ge=1)]
    """Run number, counting from 1 per job."""
    trigger: RunTrigger
    """What started the run."""
    trigger_detail: Annotated[str, Field(max_length=512)] = ""
    """Why, in a sentence (``1,240 new rows in 3 objects``, ``drift 0.31 above 0.2 for 30m``...)."""
    pods: list[str] = Field(default_factory=list)
    """Names of the current attempt's pods."""
    start_time: datetime | None = None
    """When the run started."""
    attempts: Annotated[int, Field(ge=0)] = 0
    """Attempts started so far (the current one included)."""
    failures: Annotated[int, Field(ge=0)] = 0
    """Retryable failures so far; more than ``spec.backoffLimit`` fails the run."""
    preemptions: Annotated[int, Field(ge=0)] = 0
    """Attempts lost to preemption, eviction or node failure (do not count against ``backoffLimit``)."""
    retry_after: datetime | None = None
    """While backing off after a retryable failure: when the next attempt starts."""
    suspended_seconds: Annotated[int, Field(ge=0)] = 0
    """Seconds the run spent suspended (not counted against ``activeDeadlineSeconds``)."""
    suspended_since: datetime | None = None
    """While suspended: since when."""
    generation: Annotated[int, Field(ge=0)] | None = None
    """The spec generation the run trains."""
    spec_hash: Annotated[str, Field(max_length=64)] | None = None
    """Hash of the training-relevant spec the run trains (lifecycle fields such as ``suspend``,
    ``backoffLimit``, deadlines and TTL excluded): a different hash means a new run."""
    progress: Progress | None = None
    """Training progress."""
    last_checkpoint: CheckpointRef | None = None
    """Latest complete checkpoint."""
    history: Annotated[list[Attempt], Field(max_length=MAX_ATTEMPT_HISTORY)] = Field(default_factory=list)
    """The run's attempts, newest last (the most recent ones)."""
    result: RunResult | None = None
    """How the run ended; unset while it is active."""
    reason: Annotated[str, Field(max_length=1024)] | None = None
    """Reason of the result (a Reason constant)."""
    completion_time: datetime | None = None
    """When the run ended."""


class PromotionDecision(ApiModel):
    """What became of a finished run's model."""

    decision: Literal["Promoted", "NotPromoted", "AwaitingApproval", "Rejected"]
    """``Promoted``; ``NotPromoted`` (a gate failed, the run failed, or a pin holds another run);
    ``AwaitingApproval`` (gates passed, ``requireApproval``); ``Rejected`` (by annotation)."""
    reason: Annotated[str, Field(max_length=1024)] = ""
    """Why, with the numbers (``f1 0.871 < min 0.9``)."""
    by: Annotated[str, Field(max_length=256)] = ""
    """Who decided: ``gates``, ``annotation tuneloop.dev/approve=4``, ``spec.promotion.pin=3``."""
    time: datetime | None = None
    """When."""


class RunRecord(ApiModel):
    """A finished run, kept in a bounded history."""

    number: Annotated[int, Field(ge=1)]
    """Run number."""
    trigger: RunTrigger
    """What started it."""
    trigger_detail: Annotated[str, Field(max_length=512)] = ""
    """Why it started."""
    result: RunResult
    """How it ended."""
    reason: Annotated[str, Field(max_length=1024)] | None = None
    """Reason of the result (a Reason constant)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Final test metrics."""
    promoted_metrics: dict[str, float] = Field(default_factory=dict)
    """The model promoted when the run started, evaluated by the run on the same test split
    (what ``minImprovement`` compares with)."""
    data_drift: float | None = None
    """How far the run's training data is from the promoted run's (Jensen-Shannon distance of
    label, length and token distributions; 0 = same, 1 = disjoint)."""
    promotion: PromotionDecision | None = None
    """What became of the model."""
    model_uri: Annotated[str, Field(max_length=2048)] | None = None
    """Where the model was written."""
    data_fingerprint: Annotated[str, Field(max_length=128)] | None = None
    """Hash of the data the run trained on."""
    start_time: datetime | None = None
    """When it started."""
    completion_time: datetime | None = None
    """When it ended."""
    attempts: Annotated[int, Field(ge=0)] = 0
    """Attempts it took."""
    preemptions: Annotated[int, Field(ge=0)] = 0
    """Attempts lost to preemption, eviction or node failure."""
    message: Annotated[str, Field(max_length=1024)] = ""
    """Detail of the result."""


class Promoted(ApiModel):
    """The model currently promoted (also written to ``promoted.json`` under the output)."""

    run: Annotated[int, Field(ge=1)]
    """Run that produced it."""
    model_uri: Annotated[str, Field(max_length=2048)]
    """Where it is."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Its test metrics."""
    time: datetime | None = None
    """When it was promoted."""
    trigger: RunTrigger | None = None
    """What started the run that produced it."""
    by: Annotated[str, Field(max_length=256)] = ""
    """Who promoted it: ``gates``, an approval annotation, ``spec.promotion.pin``."""


class AwaitingApproval(ApiModel):
    """A run that passed its gates and waits for a person (``promotion.requireApproval``)."""

    run: Annotated[int, Field(ge=1)]
    """The candidate run: approve with ``tuneloop.dev/approve=<run>``, reject with
    ``tuneloop.dev/reject=<run>``."""
    model_uri: Annotated[str, Field(max_length=2048)]
    """The candidate model."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """The candidate's test metrics."""
    promoted_metrics: dict[str, float] = Field(default_factory=dict)
    """The promoted model's metrics on the same test split."""
    since: datetime | None = None
    """Since when it waits."""


class PendingTrigger(ApiModel):
    """A trigger that fired while a run was active or the cooldown held: one follow-up run."""

    trigger: RunTrigger
    """What fired."""
    detail: Annotated[str, Field(max_length=512)] = ""
    """Why."""
    time: datetime | None = None
    """When it fired (the first of its kind while waiting)."""


class NewDataState(ApiModel):
    """What the last listing of ``dataset.uri`` found (``retrain.onNewData``)."""

    fingerprint: Annotated[str, Field(max_length=64)] | None = None
    """Hash of the listing (keys, sizes, ETags) at the last poll."""
    objects: Annotated[int, Field(ge=0)] = 0
    """Objects listed."""
    changed_time: datetime | None = None
    """When the listing last changed (it must stay unchanged for ``settlePeriod``)."""
    watermark: Annotated[str, Field(max_length=64)] | None = None
    """Fingerprint of the listing the latest run trained on: the same objects never trigger twice
    (also recorded in each run's ``run.json``, so a lost status does not forget it)."""
    watermark_run: Annotated[int, Field(ge=1)] | None = None
    """The run that trained on the watermark listing."""
    new_rows: Annotated[int, Field(ge=0)] | None = None
    """Rows in the objects added or changed since the watermark, once counted."""
    last_poll_time: datetime | None = None
    """When the prefix was last listed."""
    next_poll_time: datetime | None = None
    """When it is listed next."""
    message: Annotated[str, Field(max_length=1024)] = ""
    """The last poll's outcome in words."""


class DriftState(ApiModel):
    """What the last drift query returned (``retrain.onDrift``)."""

    value: float | None = None
    """The last value."""
    pending_since: datetime | None = None
    """Since when every value was past the threshold (a run starts once this is ``for`` old)."""
    last_query_time: datetime | None = None
    """When the query last ran."""
    next_query_time: datetime | None = None
    """When it runs next."""
    message: Annotated[str, Field(max_length=1024)] = ""
    """The last query's outcome in words (an error, an empty result...)."""


class ScheduleState(ApiModel):
    """Where the schedule stands (``retrain.schedule``)."""

    last_schedule_time: datetime | None = None
    """The latest scheduled time acted on (run, coalesced or skipped)."""
    next_schedule_time: datetime | None = None
    """The next scheduled time."""


MAX_PENDING_TRIGGERS: Final = 8


class HandledAnnotations(ApiModel):
    """The last value of each request annotation that was acted on (or refused): a value is
    handled once, however long it stays on the object."""

    retrain: Annotated[str, Field(max_length=256)] | None = None
    """``tuneloop.dev/retrain``: a new value starts one run (trigger ``Manual``)."""
    approve: Annotated[str, Field(max_length=256)] | None = None
    """``tuneloop.dev/approve``: the run number to promote."""
    reject: Annotated[str, Field(max_length=256)] | None = None
    """``tuneloop.dev/reject``: the run number not to promote."""


class TriggerStatus(ApiModel):
    """The state of the retraining triggers (``spec.retrain``)."""

    new_data: NewDataState | None = None
    """New data."""
    drift: DriftState | None = None
    """Drift."""
    schedule: ScheduleState | None = None
    """Schedule."""
    pending: Annotated[list[PendingTrigger], Field(max_length=MAX_PENDING_TRIGGERS)] = Field(default_factory=list)
    """Triggers waiting for the active run or the cooldown to end: they start one run together."""
    last_automatic_start: datetime | None = None
    """When the latest run started by a trigger (new data, drift, schedule) started."""


MAX_RUN_HISTORY: Final = 20


class FineTuneJobStatus(ApiModel):
    """The observed state of a FineTuneJob."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The ``metadata.generation`` the operator last acted on."""
    phase: Phase | None = None
    """Summary derived from the conditions."""
    conditions: Annotated[list[Condition], Field(max_length=16)] = Field(default_factory=list)
    """Conditions (``metav1.Condition`` shape)."""
    current_run: CurrentRun | None = None
    """The run in progress, or the latest one."""
    runs: Annotated[list[RunRecord], Field(max_length=MAX_RUN_HISTORY)] = Field(default_factory=list)
    """The most recent finished runs, newest last."""
    promoted: Promoted | None = None
    """The promoted model."""
    awaiting_approval: AwaitingApproval | None = None
    """A candidate waiting for approval (``promotion.requireApproval``)."""
    triggers: TriggerStatus | None = None
    """The retraining triggers."""
    annotations: HandledAnnotations | None = None
    """Request annotations already handled."""
    metric: Annotated[str, Field(max_length=128)] | None = None
    """Headline metric of the latest run as ``name=value`` (shown by ``kubectl get``)."""


def find_condition(conditions: list[Condition], type_: str) -> Condition | None:
    """The condition of a type, if present."""
    return next((c for c in conditions if c.type == type_), None)


def derive_phase(conditions: list[Condition]) -> Phase:
    """The phase a set of conditions means, most decisive first."""
    running = find_condition(conditions, ConditionType.RUNNING)
    data = find_condition(conditions, ConditionType.DATA_VALID)
    complete = find_condition(conditions, ConditionType.COMPLETE)
    failed = find_condition(conditions, ConditionType.FAILED)
    suspended = find_condition(conditions, ConditionType.SUSPENDED)
    if suspended is not None and suspended.status == "True":
        return "Suspended"
    if failed is not None and failed.status == "True":
        return "Failed"
    if running is not None and running.status == "True":
        if running.reason in (Reason.POD_CREATED, Reason.POD_PENDING, Reason.POD_STUCK):
            return "Pending"  # pods exist but the trainer is not running yet (scheduling, image pull)
        if running.reason == Reason.EVALUATING:
            return "Evaluating"
        if data is not None and data.status == "Unknown":
            return "Validating"
        return "Running"
    if complete is not None and complete.status == "True":
        return "Succeeded"
    return "Pending"
