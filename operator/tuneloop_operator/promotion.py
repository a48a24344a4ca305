"""Promotion: whether a finished run's model replaces the promoted one. Pure.

The trainer evaluates its candidate and the model promoted when the run started on the same test
split and checks the gates (``minImprovement`` against those fresh numbers); its summary says
whether they passed. From that, :func:`decide` makes the promotion decision:

- ``spec.promotion.pin`` set → nothing is promoted by gates (the pin holds);
- the run failed, or a gate failed → ``NotPromoted``, with the trainer's reasons; the promoted
  model stays;
- the candidate was compared with another model than the one promoted now (a run approved in the
  meantime) and a gate compares with it → ``NotPromoted``: it was not measured against the current one;
- ``requireApproval`` → ``AwaitingApproval`` until ``tuneloop.dev/approve=<run>`` or
  ``tuneloop.dev/reject=<run>``;
- otherwise → ``Promoted``: ``promoted.json`` is written, then the status says so.

:func:`decide_annotations` handles approvals and rejections, :func:`pinned` a rollback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, cast, get_args

from tuneloop.api.spec import Promotion as PromotionSpec
from tuneloop.api.status import (
    AwaitingApproval,
    ConditionStatus,
    Promoted,
    PromotionDecision,
    Reason,
    RunRecord,
    RunTrigger,
)
from tuneloop.contract import PromotedPointer

#: What a pin whose run has no model says (the ``PinInvalid`` decision's reason, read back when a
#: wiped status is rebuilt from the lineage index, which keeps decisions, not condition reasons).
PIN_HAS_NO_MODEL: Final = "has no model to promote"
#: Who a pin's decisions are by: this, then the pinned run.
PIN_BY: Final = "spec.promotion.pin="
ANNOTATION_APPROVE: Final = "tuneloop.dev/approve"
"""``tuneloop.dev/approve=<run>`` promotes a run awaiting approval."""
ANNOTATION_REJECT: Final = "tuneloop.dev/reject"
"""``tuneloop.dev/reject=<run>`` closes a run awaiting approval without promoting it."""


@dataclass(frozen=True)
class Candidate:
    """A finished run, as its trainer summarised it."""

    run: int
    trigger: RunTrigger
    result: str
    """``Succeeded`` (gates passed), ``GateFailed``, ``Failed``..."""
    reason: str
    message: str
    model_uri: str | None
    metrics: Mapping[str, float]
    promoted_run: int | None = None
    """The promoted run the trainer compared with (``None``: nothing was promoted)."""
    promoted_metrics: Mapping[str, float] = field(default_factory=dict)
    data_fingerprint: str | None = None
    failed_gates: Sequence[str] = ()
    """The gates that did not pass, in words (from the trainer's summary)."""

    @classmethod
    def of(cls, record: RunRecord, *, promoted_run: int | None = None, failed_gates: Sequence[str] = ()) -> Candidate:
        """A finished run, from its record in the status."""
        return cls(
            run=record.number,
            trigger=record.trigger,
            result=record.result,
            reason=record.reason or "",
            message=record.message,
            model_uri=record.model_uri,
            metrics=record.metrics,
            promoted_run=promoted_run,
            promoted_metrics=record.promoted_metrics,
            data_fingerprint=record.data_fingerprint,
            failed_gates=failed_gates,
        )


@dataclass
class PromotionOutcome:
    """A decision and what it changes."""

    decision: PromotionDecision
    promoted: Promoted | None = None
    """The new promoted model (when this decision promotes)."""
    pointer: PromotedPointer | None = None
    """``promoted.json`` to write before the status says so."""
    awaiting: AwaitingApproval | None = None
    """The candidate now waiting for approval."""
    condition: tuple[str, str, str] = ("False", Reason.NOT_PROMOTED, "")
    """``(status, reason, message)`` of the ``Promoted`` condition."""
    event: tuple[str, str, str] | None = None
    """``(type, reason, message)``."""


def promoted_of(pointer: PromotedPointer) -> Promoted:
    """``status.promoted`` as ``promoted.json`` records it (what :func:`pointer_for` wrote with it)."""
    trigger = cast(RunTrigger, pointer.trigger) if pointer.trigger in get_args(RunTrigger) else None
    return Promoted(
        run=pointer.run,
        model_uri=pointer.model_uri,
        metrics=dict(pointer.metrics),
        time=pointer.time,
        trigger=trigger,
        by=pointer.promoted_by,
    )


def condition_of(decision: PromotionDecision) -> tuple[ConditionStatus, str, str]:
    """``(status, reason, message)`` of the ``Promoted`` condition a recorded decision set (its
    ``reason`` is the condition's message)."""
    if decision.decision == "Promoted":
        return "True", Reason.PROMOTED, decision.reason
    if decision.decision == "AwaitingApproval":
        return "Unknown", Reason.AWAITING_APPROVAL, decision.reason
    if decision.decision == "Rejected":
        return "False", Reason.REJECTED, decision.reason
    pin_invalid = decision.by.startswith(PIN_BY) and PIN_HAS_NO_MODEL in decision.reason
    return "False", Reason.PIN_INVALID if pin_invalid else Reason.NOT_PROMOTED, decision.reason


def _numbers(metrics: Mapping[str, float], limit: int = 4) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:limit])


def pointer_for(
    candidate: Candidate,
    *,
    by: str,
    now: datetime,
    previous: Promoted | None,
    base_model_uri: str,
    job: Mapping[str, str | None],
) -> PromotedPointer:
    """``promoted.json`` for a promoted candidate."""
    assert candidate.model_uri is not None
    return PromotedPointer(
        run=candidate.run,
        model_uri=candidate.model_uri,
        base_model_uri=base_model_uri,
        metrics=dict(candidate.metrics),
        previous_metrics=dict(candidate.promoted_metrics),
        previous_run=previous.run if previous is not None else None,
        data_fingerprint=candidate.data_fingerprint,
        trigger=candidate.trigger,
        promoted_by=by,
        time=now,
        job=dict(job),
    )


def _promote(
    candidate: Candidate,
    *,
    by: str,
    now: datetime,
    current: Promoted | None,
    base_model_uri: str,
    job: Mapping[str, str | None],
) -> PromotionOutcome:
    assert candidate.model_uri is not None
    promoted = Promoted(
        run=candidate.run,
        model_uri=candidate.model_uri,
        metrics=dict(candidate.metrics),
        time=now,
        trigger=candidate.trigger,
        by=by,
    )
    replaced = f"; replaces run {current.run}" if current is not None else ""
    message = f"run {candidate.run} promoted ({_numbers(candidate.metrics)}){replaced}, by {by}"
    return PromotionOutcome(
        decision=PromotionDecision(decision="Promoted", reason=message, by=by, time=now),
        promoted=promoted,
        pointer=pointer_for(candidate, by=by, now=now, previous=current, base_model_uri=base_model_uri, job=job),
        condition=("True", Reason.PROMOTED, message),
        event=("Normal", Reason.PROMOTED, message),
    )


def _not_promoted(
    candidate: Candidate, why: str, *, by: str, now: datetime, current: Promoted | None
) -> PromotionOutcome:
    kept = f"; run {current.run} stays promoted" if current is not None else "; no model is promoted yet"
    message = f"run {candidate.run} not promoted: {why}{kept}"
    # A run that failed has said so in its own event; a passing or gate-failed one says it here.
    told = candidate.result in ("Succeeded", "GateFailed")
    return PromotionOutcome(
        decision=PromotionDecision(decision="NotPromoted", reason=message[:1024], by=by, time=now),
        condition=("False", Reason.NOT_PROMOTED, message),
        event=("Normal", Reason.NOT_PROMOTED, message) if told else None,
    )


def decide(
    candidate: Candidate,
    spec: PromotionSpec,
    *,
    current: Promoted | None,
    now: datetime,
    base_model_uri: str,
    job: Mapping[str, str | None],
) -> PromotionOutcome:
    """The decision for a run that just ended (see the module docstring)."""
    if spec.pin is not None:
        return _not_promoted(
            candidate,
            f"spec.promotion.pin={spec.pin} holds the promoted model",
            by="spec.promotion.pin",
            now=now,
            current=current,
        )
    if candidate.result != "Succeeded" or candidate.model_uri is None:
        if candidate.result == "GateFailed":
            why = "gates failed: " + ("; ".join(candidate.failed_gates) or candidate.message or "see the model card")
        else:
            why = f"the run ended {candidate.result} ({candidate.reason})"
        return _not_promoted(candidate, why, by="gates", now=now, current=current)
    compares = any(g.min_improvement is not None for g in spec.gates)
    if compares and current is not None and candidate.promoted_run != current.run:
        compared = f"run {candidate.promoted_run}" if candidate.promoted_run is not None else "no promoted model"
        return _not_promoted(
            candidate,
            f"its minImprovement gate compared it with {compared}, but run {current.run} was promoted since; "
            "the next run compares with it",
            by="gates",
            now=now,
            current=current,
        )
    if spec.require_approval:
        awaiting = AwaitingApproval(
            run=candidate.run,
            model_uri=candidate.model_uri,
            metrics=dict(candidate.metrics),
            promoted_metrics=dict(candidate.promoted_metrics),
            since=now,
        )
        against = (
            f" vs promoted run {candidate.promoted_run} ({_numbers(candidate.promoted_metrics)})"
            if candidate.promoted_run is not None and candidate.promoted_metrics
            else ""
        )
        message = (
            f"run {candidate.run} passed its gates ({_numbers(candidate.metrics)}){against} and awaits approval: "
            f"kubectl annotate ftj <name> {ANNOTATION_APPROVE}={candidate.run} (or {ANNOTATION_REJECT}={candidate.run})"
        )
        return PromotionOutcome(
            decision=PromotionDecision(decision="AwaitingApproval", reason=message[:1024], by="gates", time=now),
            awaiting=awaiting,
            condition=("Unknown", Reason.AWAITING_APPROVAL, message),
            event=("Normal", Reason.AWAITING_APPROVAL, message),
        )
    return _promote(candidate, by="gates", now=now, current=current, base_model_uri=base_model_uri, job=job)


@dataclass
class AnnotationDecision:
    """What an approve or reject annotation did."""

    annotation: Literal["approve", "reject"]
    value: str
    outcome: PromotionOutcome | None = None
    """The decision on the awaiting run (``None``: refused, see ``event``)."""
    event: tuple[str, str, str] | None = None


def decide_annotations(
    annotations: Mapping[str, Any],
    handled: Mapping[str, str | None],
    *,
    awaiting: AwaitingApproval | None,
    awaiting_candidate: Candidate | None,
    spec: PromotionSpec,
    current: Promoted | None,
    now: datetime,
    base_model_uri: str,
    job: Mapping[str, str | None],
) -> list[AnnotationDecision]:
    """Approvals and rejections with a value not handled before. A value naming the run that
    awaits approval decides it; any other value is refused with an event (and is then handled:
    it is not refused again)."""
    decisions: list[AnnotationDecision] = []
    for kind, name in (("approve", ANNOTATION_APPROVE), ("reject", ANNOTATION_REJECT)):
        value = annotations.get(name)
        if not isinstance(value, str) or value == handled.get(kind):
            continue
        shown = value[:64]
        if awaiting is None or awaiting_candidate is None or value.strip() != str(awaiting.run):
            waiting = f"run {awaiting.run} awaits approval" if awaiting is not None else "no run awaits approval"
            decisions.append(
                AnnotationDecision(
                    kind,  # type: ignore[arg-type]
                    value,
                    event=("Warning", Reason.DECISION_REFUSED, f"{name}={shown} refused: {waiting}"),
                )
            )
            continue
        by = f"annotation {name}={shown}"
        if kind == "approve":
            if spec.pin is not None:
                outcome = _not_promoted(
                    awaiting_candidate,
                    f"approved, but spec.promotion.pin={spec.pin} holds the promoted model",
                    by=by,
                    now=now,
                    current=current,
                )
            else:
                outcome = _promote(
                    awaiting_candidate, by=by, now=now, current=current, base_model_uri=base_model_uri, job=job
                )
        else:
            message = f"run {awaiting.run} rejected by {by}" + (
                f"; run {current.run} stays promoted" if current is not None else ""
            )
            outcome = PromotionOutcome(
                decision=PromotionDecision(decision="Rejected", reason=message, by=by, time=now),
                condition=("False", Reason.REJECTED, message),
                event=("Normal", Reason.REJECTED, message),
            )
        decisions.append(AnnotationDecision(kind, value, outcome=outcome))  # type: ignore[arg-type]
        awaiting = None  # decided: a second annotation in the same pass is refused
    return decisions


def pinned(
    spec: PromotionSpec,
    *,
    current: Promoted | None,
    target: Candidate | None,
    now: datetime,
    base_model_uri: str,
    job: Mapping[str, str | None],
) -> PromotionOutcome | None:
    """``spec.promotion.pin``: promote that run when it is not the promoted one. ``target`` is the
    pinned run's model as found in storage (``None``: its model does not exist). ``None`` when
    nothing changes."""
    if spec.pin is None or (current is not None and current.run == spec.pin):
        return None
    by = f"{PIN_BY}{spec.pin}"
    if target is None or target.model_uri is None:
        message = f"{by}: run {spec.pin} {PIN_HAS_NO_MODEL} (it does not exist, or was deleted)" + (
            f"; run {current.run} stays promoted" if current is not None else ""
        )
        return PromotionOutcome(
            decision=PromotionDecision(decision="NotPromoted", reason=message[:1024], by=by, time=now),
            condition=("False", Reason.PIN_INVALID, message),
            event=("Warning", Reason.PIN_INVALID, message),
        )
    return _promote(target, by=by, now=now, current=current, base_model_uri=base_model_uri, job=job)
