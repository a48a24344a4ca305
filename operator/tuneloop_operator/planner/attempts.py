"""Decide: the attempts of the active run, from the first pod to the run's end.

An attempt is judged by its pods (:func:`watch_attempt`) and ends:

- all pods ``Succeeded`` → the run succeeded;
- a pod failed with a permanent exit code (:mod:`tuneloop.contract`) → the run failed, no retry;
- a pod failed with a retryable code → retried after an exponential backoff, until more than
  ``spec.backoffLimit`` failures → ``BackoffLimitExceeded``;
- a pod was lost (deleted, evicted, preempted, its node lost) → a new attempt at once, which
  resumes from the last checkpoint, counted apart and bounded by ``TUNELOOP_MAX_PREEMPTIONS``;
- ``spec.suspend`` → pods deleted; unsuspending starts a new attempt from the checkpoint;
- ``spec.activeDeadlineSeconds`` passed (suspended time excluded) → ``DeadlineExceeded``.

The pods of an attempt end together: when one fails, the others are deleted, and the next
attempt starts only when no pod of an earlier attempt is still alive (two trainers never
write to the same run prefix at once). A run's end (:func:`finish`) is recorded in the run
history and handed to the promotion decision (:func:`~.loop.promote_or_not`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final

from tuneloop.api import ConditionType, FineTuneJob, Reason
from tuneloop.api.status import (
    MAX_ATTEMPT_HISTORY,
    MAX_RUN_HISTORY,
    Attempt,
    AttemptCause,
    CheckpointRef,
    CurrentRun,
    RunRecord,
    RunResult,
    find_condition,
)
from tuneloop.contract import ExitCode, is_retryable
from tuneloop_operator.planner.context import Pass
from tuneloop_operator.planner.loop import promote_or_not
from tuneloop_operator.planner.observe import PodView, cause_of, float_metrics, parse_summary, wants_new_run
from tuneloop_operator.planner.status import headline_metric
from tuneloop_operator.planner.types import short
from tuneloop_operator.render import names
from tuneloop_operator.settings import OperatorSettings

MAX_URI: Final = 2048
MAX_ATTEMPT_MESSAGE: Final = 1024


def backoff_seconds(failures: int, settings: OperatorSettings) -> float:
    """Delay before the retry after the ``failures``-th failure: base · 2^(failures-1), capped."""
    return float(min(settings.backoff_max_seconds, settings.backoff_base_seconds * 2 ** max(0, failures - 1)))


def suspend(ctx: Pass, current: CurrentRun) -> None:
    """``spec.suspend``: the attempt ends, its pods go, the run waits with its checkpoints."""
    if current.suspended_since is None:
        current.suspended_since = ctx.now
        close_attempt(ctx, current, Reason.SUSPENDED, "spec.suspend is true")
        ctx.report.event(
            "Normal",
            Reason.SUSPENDED,
            f"run {current.number} suspended: pods deleted, checkpoints kept; unsuspend to resume",
        )
    for pod in ctx.view.run_pods(current.number):
        if pod.alive:
            ctx.delete_pod(pod)
    alive = [p.name for p in ctx.view.run_pods(current.number) if p.alive]
    message = f"run {current.number} is suspended; it resumes from its last checkpoint when spec.suspend is false"
    if alive:
        message += f" (pods still stopping: {', '.join(alive)})"
        ctx.plan.requeue(1.0)
    ctx.report.cond(ConditionType.SUSPENDED, "True", Reason.SUSPENDED, message)
    ctx.report.cond(ConditionType.RUNNING, "False", Reason.SUSPENDED, message)


def resume(ctx: Pass, current: CurrentRun) -> None:
    """``spec.suspend`` turned false: the suspended time stops counting; the next attempt resumes."""
    assert current.suspended_since is not None
    current.suspended_seconds += max(0, int((ctx.now - current.suspended_since).total_seconds()))
    current.suspended_since = None
    ctx.resumed = True
    ctx.report.cond(ConditionType.SUSPENDED, "False", Reason.RESUMED, "spec.suspend is false")
    ctx.report.event("Normal", Reason.RESUMED, f"run {current.number} resumes from its last checkpoint")


def advance(ctx: Pass, job: FineTuneJob, current: CurrentRun) -> None:
    """Take the active run one step: judge its open attempt, its deadline, or start the next attempt."""
    apply_heartbeat(ctx, current)
    attempt = open_attempt(ctx, current)
    if attempt is not None:
        watch_attempt(ctx, job, current, attempt)
        if current.result is not None:
            return
    deadline = job.spec.active_deadline_seconds
    if deadline is not None:
        left = deadline - active_seconds(ctx, current)
        if left <= 0:
            close_attempt(ctx, current, Reason.DEADLINE_EXCEEDED, "the run's active deadline passed")
            finish(
                ctx,
                job,
                current,
                "Failed",
                Reason.DEADLINE_EXCEEDED,
                message=f"run {current.number} was active longer than spec.activeDeadlineSeconds ({deadline}s)",
            )
            return
        ctx.plan.requeue(left)
    if open_attempt(ctx, current) is None:
        next_attempt(ctx, job, current)


def next_attempt(ctx: Pass, job: FineTuneJob, current: CurrentRun) -> None:
    """Start the next attempt once its backoff is over and no earlier pod is alive."""
    if current.retry_after is not None and ctx.now < current.retry_after:
        ctx.plan.requeue((current.retry_after - ctx.now).total_seconds())
        return
    # Pods of the very attempt about to start were created by a pass whose status patch was
    # lost (the operator died in between): that attempt is started again over them, not fenced.
    alive = [
        p for p in ctx.view.run_pods(current.number) if p.alive and (p.attempt != current.attempts + 1 or p.deleting)
    ]
    overdue = [p for p in alive if stuck_terminating(ctx, p)]
    alive = [p for p in alive if p not in overdue]
    if alive:
        for pod in alive:
            ctx.delete_pod(pod)
        waiting = ", ".join(p.name for p in alive)
        ctx.report.cond(
            ConditionType.RUNNING,
            "True",
            Reason.POD_PENDING,
            f"run {current.number}: waiting for pod(s) {waiting} of the previous attempt to end",
        )
        ctx.plan.requeue(1.0)
        return
    for pod in overdue:
        late = (ctx.now - pod.deletion_deadline).total_seconds() if pod.deletion_deadline else 0.0
        ctx.report.event(
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
    elif previous.reason == Reason.SUSPENDED or ctx.resumed:
        cause = "Resumed"
    start_attempt(ctx, job, current, cause)


def start_attempt(ctx: Pass, job: FineTuneJob, current: CurrentRun, cause: AttemptCause) -> None:
    number = current.attempts + 1
    child = names(ctx.view.name, current.number, number)
    current.pods = [child.pod(r) for r in range(job.spec.resources.nodes)]
    current.attempts = number
    current.retry_after = None
    push_attempt(current, Attempt(number=number, cause=cause, start_time=ctx.now))
    ctx.plan.create += ctx.render_attempt(job, current.number, number)
    ctx.report.cond(
        ConditionType.RUNNING,
        "True",
        Reason.POD_CREATED,
        f"run {current.number}, attempt {number} ({cause.lower()}): created {len(current.pods)} pod(s); "
        f"resumes from the last checkpoint",
    )


def push_attempt(current: CurrentRun, attempt: Attempt) -> None:
    current.history = [*current.history, attempt][-MAX_ATTEMPT_HISTORY:]


def open_attempt(ctx: Pass, current: CurrentRun) -> Attempt | None:
    if current.history and current.history[-1].end_time is None and current.history[-1].number == current.attempts:
        return current.history[-1]
    return None


def close_attempt(ctx: Pass, current: CurrentRun, reason: str, message: str = "", exit_code: int | None = None) -> None:
    attempt = open_attempt(ctx, current)
    if attempt is None:
        return
    closed = attempt.model_copy(
        update={
            "end_time": ctx.now,
            "reason": reason,
            "exit_code": exit_code,
            "message": short(message, MAX_ATTEMPT_MESSAGE),
        }
    )
    current.history = [*current.history[:-1], closed]
    for pod in ctx.view.run_pods(current.number):
        if pod.attempt == attempt.number and pod.alive:
            ctx.delete_pod(pod)


def active_seconds(ctx: Pass, current: CurrentRun) -> float:
    """How long the run has been active (suspended time excluded), for ``activeDeadlineSeconds``."""
    start = current.start_time or ctx.now
    total = (ctx.now - start).total_seconds() - current.suspended_seconds
    if current.suspended_since is not None:
        total -= (ctx.now - current.suspended_since).total_seconds()
    return max(0.0, total)


def stuck_terminating(ctx: Pass, pod: PodView) -> bool:
    """The pod was deleted and is still not gone long after its grace period (see
    :attr:`~tuneloop_operator.settings.OperatorSettings.stuck_terminating_seconds`)."""
    if not pod.deleting or pod.deletion_deadline is None:
        return False
    return (ctx.now - pod.deletion_deadline).total_seconds() >= ctx.settings.stuck_terminating_seconds


def watch_attempt(ctx: Pass, job: FineTuneJob, current: CurrentRun, attempt: Attempt) -> None:
    """Judge the open attempt by its pods."""
    nodes = job.spec.resources.nodes
    expected = {names(ctx.view.name, current.number, attempt.number).pod(r): r for r in range(nodes)}
    by_name = {p.name: p for p in ctx.view.run_pods(current.number) if p.attempt == attempt.number}
    pods = [by_name.get(name) for name in expected]
    missing = [name for name, pod in zip(expected, pods, strict=True) if pod is None and name not in ctx.adopting]
    present = [p for p in pods if p is not None]
    # What the trainer said wins over how its pod went away: a pod that finished (exit 0, or a
    # permanent code) and was deleted afterwards (a drain, kubectl delete) still ended the run.
    permanent = [p for p in present if p.phase == "Failed" and p.permanent_exit]
    if permanent:
        attempt_failed(ctx, job, current, min(permanent, key=lambda p: p.rank))
        return
    if not missing and present and all(p.phase == "Succeeded" for p in present):
        succeeded(ctx, job, current, present)
        return
    # A pod deleted long ago and still not gone sits on a node that no longer answers.
    lost = [
        p for p in present if p.disruption is not None or (p.deleting and (p.terminal or stuck_terminating(ctx, p)))
    ]
    failed = [p for p in present if p.phase == "Failed" and p.disruption is None]
    if missing and not lost and failed:
        # A rank's trainer failed and the operator deleted the others (its status patch may
        # have been lost since): the failure, not a preemption.
        attempt_failed(ctx, job, current, min(failed, key=lambda p: p.rank))
        return
    if missing or lost:
        what = (
            f"pod {missing[0]} was deleted" if missing else f"pod {lost[0].name} was {lost[0].disruption or 'deleted'}"
        )
        preempted(ctx, job, current, what)
        return
    failed = [p for p in present if p.phase == "Failed"]
    if failed:
        attempt_failed(ctx, job, current, min(failed, key=lambda p: p.rank))
        return
    if any(p.deleting for p in present):
        ctx.plan.requeue(1.0)  # someone is deleting a pod: see how it ends
    stuck = [p for p in present if p.stuck]
    if stuck:
        pod = stuck[0]
        before = find_condition(ctx.view.old.conditions, ConditionType.RUNNING)
        ctx.report.cond(ConditionType.RUNNING, "True", Reason.POD_STUCK, f"pod {pod.name} cannot start: {pod.stuck}")
        if before is None or before.reason != Reason.POD_STUCK:
            # One event when it gets stuck, not one per message change (ErrImagePull ↔ ImagePullBackOff).
            ctx.report.event("Warning", Reason.POD_STUCK, f"pod {pod.name} cannot start: {pod.stuck}")
        return
    if present and all(p.phase in ("Running", "Succeeded") for p in present):
        ctx.report.training(current, ctx.view.own_heartbeat(current))  # every rank started (some may already be done)
    else:
        pending = ", ".join(p.name for p in present if p.phase == "Pending")
        message = f"waiting for pod(s) {pending} to start"
        if any(p.gated for p in present):
            message = f"waiting for pod(s) {pending} to be admitted (scheduling gates, e.g. a Kueue queue)"
        ctx.report.cond(ConditionType.RUNNING, "True", Reason.POD_PENDING, message)


def apply_heartbeat(ctx: Pass, current: CurrentRun) -> None:
    """The run's progress and last checkpoint, as its own heartbeat says."""
    beat = ctx.view.own_heartbeat(current)
    if beat is None:
        return
    current.progress = beat.progress()
    if beat.last_checkpoint is not None:
        current.last_checkpoint = CheckpointRef(step=beat.last_checkpoint.step, uri=beat.last_checkpoint.uri)


def preempted(ctx: Pass, job: FineTuneJob, current: CurrentRun, what: str) -> None:
    """The attempt lost a pod (``what`` happened to it): a new attempt, unless the run lost too many."""
    close_attempt(ctx, current, Reason.PREEMPTED, what)
    current.preemptions += 1
    ctx.plan.preempted = True
    if current.preemptions > ctx.settings.max_preemptions:
        finish(
            ctx,
            job,
            current,
            "Failed",
            Reason.PREEMPTION_LIMIT_EXCEEDED,
            message=f"run {current.number} lost {current.preemptions} attempts to preemption "
            f"(the operator allows {ctx.settings.max_preemptions}); last: {what}",
        )
        return
    ctx.report.event(
        "Warning",
        Reason.PREEMPTED,
        f"run {current.number}, attempt {current.attempts}: {what}; a new attempt resumes from the last "
        f"checkpoint (preemption {current.preemptions}, not counted against backoffLimit)",
    )


def attempt_failed(ctx: Pass, job: FineTuneJob, current: CurrentRun, pod: PodView) -> None:
    """A trainer failed: the run fails (a permanent code, too many failures) or is retried after a backoff."""
    summary = parse_summary(pod.termination_message)
    said = str(summary.get("message") or "") if summary else cause_of(pod.termination_message)
    if pod.exit_code is None:
        # Failed before (or without) a container exit: rejected by the kubelet, say. Retryable.
        code = None
        detail = f"pod {pod.name} failed before its trainer ran" + (f": {pod.detail}" if pod.detail else "")
    else:
        code = pod.exit_code
        detail = f"pod {pod.name} exited with code {code}" + (f": {short(said, 600)}" if said.strip() else "")
    if code is not None and not is_retryable(code):
        reason = ExitCode(code).reason or Reason.INVALID_CONFIG
        if code == ExitCode.INVALID_CONFIG and summary.get("reason") == Reason.OUTPUT_OWNED:
            reason = Reason.OUTPUT_OWNED  # the trainer found its output or run claimed by another job
        close_attempt(ctx, current, reason, detail, exit_code=code)
        if reason == Reason.INVALID_DATA:
            ctx.report.cond(ConditionType.DATA_VALID, "False", Reason.INVALID_DATA, short(said or detail, 1000))
        elif reason == Reason.GATE_FAILED:
            ctx.report.data_valid()
        result: RunResult = "GateFailed" if reason == Reason.GATE_FAILED else "Failed"
        finish(ctx, job, current, result, reason, message=f"{detail} (permanent: not retried)", summary=summary)
        return
    close_attempt(ctx, current, Reason.TRAINER_FAILED, detail, exit_code=code)
    current.failures += 1
    limit = job.spec.backoff_limit
    if current.failures > limit:
        finish(
            ctx,
            job,
            current,
            "Failed",
            Reason.BACKOFF_LIMIT_EXCEEDED,
            message=f"run {current.number} failed {current.failures} times (backoffLimit {limit}); last: {detail}",
        )
        return
    delay = backoff_seconds(current.failures, ctx.settings)
    current.retry_after = ctx.now + timedelta(seconds=delay)
    ctx.plan.retried = True
    ctx.plan.requeue(delay)
    message = (
        f"run {current.number}, attempt {current.attempts}: {detail}; retry {current.failures} of {limit} "
        f"in {delay:.0f}s from the last checkpoint"
    )
    ctx.report.cond(ConditionType.RUNNING, "True", Reason.RETRYING, message)
    ctx.report.event("Warning", Reason.RETRYING, message)


def succeeded(ctx: Pass, job: FineTuneJob, current: CurrentRun, pods: list[PodView]) -> None:
    rank0 = min(pods, key=lambda p: p.rank)
    summary = parse_summary(rank0.termination_message)
    close_attempt(ctx, current, Reason.SUCCEEDED, "all pods succeeded", exit_code=0)
    ctx.report.data_valid()
    finish(ctx, job, current, "Succeeded", Reason.SUCCEEDED, message="", summary=summary)


def finish(
    ctx: Pass,
    job: FineTuneJob,
    current: CurrentRun,
    result: RunResult,
    reason: str,
    *,
    message: str,
    summary: Mapping[str, Any] | None = None,
) -> None:
    """End the run: delete what still runs, record it, set the conditions, tell the user."""
    for pod in ctx.view.run_pods(current.number):
        if pod.alive:
            ctx.delete_pod(pod)
    summary = summary or {}
    metrics = float_metrics(summary.get("metrics"))
    model_uri = summary.get("modelUri") if isinstance(summary.get("modelUri"), str) else None
    if model_uri is not None and len(model_uri) > MAX_URI:
        model_uri = None  # a cut URI would point elsewhere; the model card in S3 still has it
    fingerprint = summary.get("dataFingerprint") if isinstance(summary.get("dataFingerprint"), str) else None
    current.result = result
    current.reason = reason
    current.completion_time = ctx.now
    current.retry_after = None
    headline = headline_metric(job, metrics)
    if result == "Succeeded" and not message:
        message = "succeeded" + (f" ({headline})" if headline else "")
    promoted_metrics = float_metrics(summary.get("promotedMetrics"))
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
        completion_time=ctx.now,
        attempts=current.attempts,
        preemptions=current.preemptions,
        message=short(message, 1024),
    )
    ctx.status.runs = [*(r for r in ctx.status.runs if r.number != current.number), record][-MAX_RUN_HISTORY:]
    if headline is not None:
        ctx.status.metric = headline
    ctx.plan.finished = (result, reason)
    ctx.plan.job = job
    ctx.plan.index.append({"event": "finished", **record.model_dump(mode="json", by_alias=True, exclude_none=True)})
    if job.spec.ttl_seconds_after_finished is not None:
        ctx.plan.requeue(job.spec.ttl_seconds_after_finished)
    if ctx.view.live is not None and wants_new_run(ctx.view.live, current):
        ctx.plan.requeue(0.0)
    ctx.report.run_ended(current.number, result, reason, message, headline=headline, model_uri=model_uri)
    if result != "Superseded":
        promote_or_not(ctx, job, record, summary)
