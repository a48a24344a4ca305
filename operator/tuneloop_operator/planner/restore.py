"""Restore: a status found empty while the job has runs (wiped, or written by an unknown version)
is rebuilt from what the output remembers — the lineage index ``runs/index.json`` and the
promoted pointer ``promoted.json`` — so that nothing is decided, recorded or run twice.

The history is read only when :func:`looks_wiped` says so (``Plan.needs`` ``history``): a pass over
a job whose status records its runs never reads it.
"""

from __future__ import annotations

from tuneloop.api import ConditionType, FineTuneJob, Reason
from tuneloop.api.status import MAX_RUN_HISTORY, AwaitingApproval, CurrentRun, HandledAnnotations, RunRecord
from tuneloop.contract import spec_hashes
from tuneloop_operator import promotion as promo
from tuneloop_operator import triggers
from tuneloop_operator.planner.context import Pass
from tuneloop_operator.planner.observe import parse_index, spec_hash
from tuneloop_operator.planner.status import headline_metric

__all__ = ["looks_wiped", "restore_history"]


def looks_wiped(ctx: Pass) -> bool:
    """The status records nothing of the job's runs while the job has some: its pods exist, or
    the output prefix it owns has runs (read when a run would start) other than one it claimed and
    never started. A new job's status is empty too, but it has neither, and neither has a job
    whose first run's pods were refused before its status was written: a normal pass, or its
    retry, never reads the history."""
    status = ctx.status
    if status.current_run is not None or status.runs or status.promoted is not None or status.awaiting_approval:
        return False
    if ctx.view.pods:
        return True
    output = ctx.view.obs.output
    return (
        output is not None
        and output.error is None
        and output.highest_run > 0
        and output.owner is not None
        and output.owner.owner.same_job(ctx.view.identity)
        and not (output.unstarted_claimant is not None and output.unstarted_claimant.same_job(ctx.view.identity))
    )


def restore_history(ctx: Pass, job: FineTuneJob) -> None:
    """A status found empty while the job has runs (wiped, or written by an unknown version):
    rebuild what the output remembers — the finished runs from the lineage index
    (``runs/index.json``; the latest becomes ``currentRun`` unless pods of a newer run exist,
    which :func:`adopt_orphans` follows), the promoted model from ``promoted.json``, a candidate
    awaiting approval, the ``Promoted`` condition and the annotations already acted on — so that
    nothing is decided, recorded or run twice. An event says what was restored and from where;
    what cannot be read is named with its URI and left empty, and the pass goes on."""
    if not looks_wiped(ctx):
        return
    history = ctx.view.obs.history
    if history is None:
        ctx.plan.needs.add("history")
        return
    found = parse_index(history.records)
    restored: list[str] = []
    problems: list[str] = []
    if history.index_error is not None:
        problems.append(f"could not restore the run history from {history.index_uri}: {history.index_error}")
    elif found.unreadable:
        problems.append(f"{found.unreadable} record(s) of {history.index_uri} could not be read and were skipped")
    records = [found.runs[n] for n in sorted(found.runs)]
    if records:
        ctx.status.runs = records[-MAX_RUN_HISTORY:]
        ctx.restored = [r.number for r in records]
        numbers = ", ".join(str(r.number) for r in ctx.status.runs)
        restored.append(f"status.runs ({numbers}) from {history.index_uri}")
        latest = records[-1]
        if latest.number >= max((p.run for p in ctx.view.pods), default=0):
            guessed = restore_current(ctx, job, latest, history.spec_hashes.get(latest.number))
            restored.append(
                f"currentRun (run {latest.number}, {latest.result}) from {history.index_uri}"
                + (" (its spec guessed: the current one)" if guessed else "")
            )
        headline = next((h for h in (headline_metric(job, r.metrics) for r in reversed(records)) if h), None)
        if headline is not None:
            ctx.status.metric = headline
    if history.pointer_error is not None:
        problems.append(f"could not restore status.promoted from {history.pointer_uri}: {history.pointer_error}")
    pointer = history.pointer
    if pointer is not None:
        by = pointer.job.get("uid")
        if by and ctx.view.identity.uid and by != ctx.view.identity.uid:
            problems.append(
                f"{history.pointer_uri} names run {pointer.run}, promoted by another job (uid {by}): "
                "status.promoted left empty"
            )
        else:
            ctx.status.promoted = promo.promoted_of(pointer)
            restored.append(f"status.promoted (run {pointer.run}) from {history.pointer_uri}")
    waiting = next(
        (
            r
            for r in reversed(records)
            if r.promotion is not None and r.promotion.decision == "AwaitingApproval" and r.model_uri is not None
        ),
        None,
    )
    if waiting is not None and (ctx.status.promoted is None or ctx.status.promoted.run != waiting.number):
        ctx.status.awaiting_approval = AwaitingApproval(
            run=waiting.number,
            model_uri=waiting.model_uri or "",
            metrics=waiting.metrics,
            promoted_metrics=waiting.promoted_metrics,
            since=waiting.promotion.time if waiting.promotion is not None else None,
        )
        restored.append(f"status.awaitingApproval (run {waiting.number}) from {history.index_uri}")
    if found.last_decision is not None and found.last_decision[0] in found.runs:
        ctx.report.cond(ConditionType.PROMOTED, *promo.condition_of(found.last_decision[1]))
    handled = restored_annotations(ctx, records)
    if handled:
        ctx.status.annotations = HandledAnnotations.model_validate(handled)
        shown = ", ".join(f"tuneloop.dev/{k}" for k in handled)
        restored.append(f"the annotations already acted on ({shown}) from {history.index_uri}")
    if restored:
        ctx.report.event(
            "Normal",
            Reason.STATUS_RESTORED,
            "the status was empty; restored "
            + "; ".join(restored)
            + " (the attempts of finished runs are not in the index)",
        )
    if problems:
        ctx.report.event("Warning", Reason.STATUS_RESTORED, "the status was empty; " + "; ".join(problems))


def restore_current(ctx: Pass, job: FineTuneJob, record: RunRecord, claimed: str | None) -> bool:
    """``currentRun`` as the latest finished run (no pods of a newer run exist), with its
    conditions as when it ended (no event: it was posted then). The spec it trained is the one
    its claim (``runs/<n>/run.json``) records; ``True`` when that is unknown and the current spec
    is guessed (as :func:`adopt_orphans` does): the same spec is then not trained again."""
    pods = ctx.view.run_pods(record.number)
    attempt = max((p.attempt for p in pods), default=0)
    trained = claimed or spec_hash(job)
    ctx.status.current_run = CurrentRun(
        number=record.number,
        trigger=record.trigger,
        trigger_detail=record.trigger_detail,
        pods=sorted(p.name for p in pods if p.attempt == attempt),
        start_time=record.start_time,
        attempts=record.attempts,
        preemptions=record.preemptions,
        generation=ctx.view.generation if trained in spec_hashes(job.spec) else None,
        spec_hash=trained,
        result=record.result,
        reason=record.reason,
        completion_time=record.completion_time,
    )
    if record.result == "Succeeded":
        ctx.report.data_valid()
    ctx.report.run_ended(
        record.number,
        record.result,
        record.reason or record.result,
        record.message,
        headline=headline_metric(job, record.metrics),
        model_uri=record.model_uri,
        announce=False,
    )
    return claimed is None


def restored_annotations(ctx: Pass, records: list[RunRecord]) -> dict[str, str]:
    """The request annotations the history shows were acted on (a run started by
    ``tuneloop.dev/retrain=<value>``, a decision by ``tuneloop.dev/approve=<run>`` or
    ``reject``): handled, so a wiped status does not act on them a second time."""
    annotations = ctx.view.annotations
    handled: dict[str, str] = {}
    retrain = annotations.get(triggers.ANNOTATION_RETRAIN)
    if isinstance(retrain, str):
        detail = f"annotation {triggers.ANNOTATION_RETRAIN}={retrain[:64]}"
        if any(r.trigger == "Manual" and r.trigger_detail == detail for r in records):
            handled["retrain"] = retrain
    for kind, name in (("approve", promo.ANNOTATION_APPROVE), ("reject", promo.ANNOTATION_REJECT)):
        value = annotations.get(name)
        if isinstance(value, str) and any(
            r.promotion is not None and r.promotion.by == f"annotation {name}={value[:64]}" for r in records
        ):
            handled[kind] = value
    return handled
