"""Decide: the retraining loop's part of a pass — triggers and promotion decisions.

:func:`retrain_triggers` evaluates the triggers (:mod:`tuneloop_operator.triggers`) and says
which run they start; :func:`promotion_decisions` applies approvals, rejections and a pinned run;
:func:`promote_or_not` decides about a run that just ended (:mod:`tuneloop_operator.promotion`).
:func:`apply_promotion` records any of these decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tuneloop.api import ConditionType, FineTuneJob, Reason
from tuneloop.api.status import HandledAnnotations, PendingTrigger, PromotionDecision, RunRecord, find_condition
from tuneloop_operator import promotion as promo
from tuneloop_operator import triggers
from tuneloop_operator.planner.context import Pass
from tuneloop_operator.planner.observe import failed_gates
from tuneloop_operator.planner.types import short


def retrain_triggers(ctx: Pass, job: FineTuneJob, *, active: bool) -> PendingTrigger | None:
    """Evaluate the retraining triggers; the run they start now (only when idle)."""
    retrain = job.spec.retrain
    annotations = ctx.view.annotations
    handled = ctx.status.annotations or HandledAnnotations()
    value = annotations.get(triggers.ANNOTATION_RETRAIN)
    decided = triggers.evaluate(
        retrain,
        ctx.status.triggers,
        now=ctx.now,
        key=f"{ctx.view.identity.namespace}/{ctx.view.name}",
        active=active,
        observed=ctx.view.obs.triggers,
        retrain_annotation=value if isinstance(value, str) else None,
        handled_annotation=handled.retrain,
        has_runs=ctx.status.current_run is not None,
    )
    ctx.plan.needs |= decided.needs
    if decided.needs:
        return None  # decide nothing before the handler has observed what is asked
    configured = decided.state.new_data or decided.state.drift or decided.state.schedule or decided.state.pending
    ctx.status.triggers = decided.state if configured or decided.state.last_automatic_start else None
    if decided.manual is not None:
        ctx.status.annotations = handled.model_copy(update={"retrain": decided.manual})
    for type_, reason, message in decided.events:
        ctx.report.event(type_, reason, message)
    ctx.plan.trigger_counts += decided.counts
    ctx.plan.trigger_schedule = decided.schedule
    if decided.wake_at is not None:
        ctx.plan.requeue((decided.wake_at - ctx.now).total_seconds())
    if decided.health is None:
        ctx.status.conditions = [c for c in ctx.status.conditions if c.type != ConditionType.TRIGGERS_HEALTHY]
    else:
        healthy, message = decided.health
        if healthy:
            ctx.report.cond(ConditionType.TRIGGERS_HEALTHY, "True", Reason.TRIGGERS_OK, message)
        else:
            ctx.report.cond(ConditionType.TRIGGERS_HEALTHY, "False", Reason.TRIGGER_ERROR, short(message, 1024))
            if ctx.report.changed(ConditionType.TRIGGERS_HEALTHY):
                ctx.report.event("Warning", Reason.TRIGGER_ERROR, message)
    return decided.start


def promotion_decisions(ctx: Pass, job: FineTuneJob) -> None:
    """Approvals, rejections and a pinned run: promotion decisions made outside a run's end."""
    ctx.plan.job = job
    annotations = ctx.view.annotations
    handled = ctx.status.annotations or HandledAnnotations()
    awaiting = ctx.status.awaiting_approval
    candidate = candidate_of(ctx, awaiting.run) if awaiting is not None else None
    spec = job.spec.promotion
    for decided in promo.decide_annotations(
        annotations,
        {"approve": handled.approve, "reject": handled.reject},
        awaiting=awaiting,
        awaiting_candidate=candidate,
        spec=spec,
        current=ctx.status.promoted,
        now=ctx.now,
        base_model_uri=job.spec.model.uri,
        job=ctx.view.identity.to_wire(),
    ):
        handled = handled.model_copy(update={decided.annotation: decided.value})
        if decided.event is not None:
            ctx.report.event(*decided.event)
        if decided.outcome is not None and awaiting is not None:
            ctx.status.awaiting_approval = None
            apply_promotion(ctx, awaiting.run, decided.outcome)
    if handled != (ctx.status.annotations or HandledAnnotations()):
        ctx.status.annotations = handled
    if spec.pin is not None and (ctx.status.promoted is None or ctx.status.promoted.run != spec.pin):
        if not ctx.view.obs.pin_read:
            ctx.plan.needs.add("pin")
            return
        outcome = promo.pinned(
            spec,
            current=ctx.status.promoted,
            target=ctx.view.obs.pin_target,
            now=ctx.now,
            base_model_uri=job.spec.model.uri,
            job=ctx.view.identity.to_wire(),
        )
        if outcome is not None:
            before = find_condition(ctx.status.conditions, ConditionType.PROMOTED)
            if outcome.promoted is not None or before is None or before.reason != Reason.PIN_INVALID:
                apply_promotion(ctx, spec.pin, outcome)


def candidate_of(ctx: Pass, run: int) -> promo.Candidate | None:
    """A finished run as a promotion candidate, from the status' run history."""
    record = next((r for r in ctx.status.runs if r.number == run), None)
    return promo.Candidate.of(record) if record is not None else None


def apply_promotion(ctx: Pass, run: int, outcome: promo.PromotionOutcome) -> None:
    """Record a promotion decision: the run's record, ``status.promoted`` and the pointer to
    write, the awaiting candidate, the ``Promoted`` condition, an event, the lineage index."""
    ctx.status.runs = [
        r.model_copy(update={"promotion": outcome.decision}) if r.number == run else r for r in ctx.status.runs
    ]
    if outcome.promoted is not None:
        ctx.status.promoted = outcome.promoted
        ctx.plan.pointer = outcome.pointer
    if outcome.awaiting is not None:
        ctx.status.awaiting_approval = outcome.awaiting
    status, reason, message = outcome.condition
    ctx.report.cond(ConditionType.PROMOTED, status, reason, short(message, 1024))  # type: ignore[arg-type]
    if outcome.event is not None:
        ctx.report.event(*outcome.event)
    ctx.plan.promotions.append(outcome.decision.decision)
    ctx.plan.index.append({"run": run, "event": "promotion", **outcome.decision.model_dump(mode="json", by_alias=True)})


def promote_or_not(ctx: Pass, job: FineTuneJob, record: RunRecord, summary: Mapping[str, Any]) -> None:
    """The promotion decision for a run that just ended (:func:`tuneloop_operator.promotion.decide`)."""
    promoted_run = summary.get("promotedRun")
    candidate = promo.Candidate.of(
        record,
        promoted_run=promoted_run if isinstance(promoted_run, int) and promoted_run >= 1 else None,
        failed_gates=failed_gates(summary),
    )
    if ctx.status.awaiting_approval is not None and record.result == "Succeeded":
        older = ctx.status.awaiting_approval.run
        ctx.status.awaiting_approval = None
        superseded = promo.PromotionOutcome(
            decision=PromotionDecision(
                decision="NotPromoted",
                reason=f"superseded by run {record.number} before it was approved",
                by="gates",
                time=ctx.now,
            )
        )
        apply_promotion(ctx, older, superseded)
    apply_promotion(
        ctx,
        record.number,
        promo.decide(
            candidate,
            job.spec.promotion,
            current=ctx.status.promoted,
            now=ctx.now,
            base_model_uri=job.spec.model.uri,
            job=ctx.view.identity.to_wire(),
        ),
    )
