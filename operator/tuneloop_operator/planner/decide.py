"""Decide: what a pass does about one job's runs. The planner's entry, :func:`plan`.

A valid job (:func:`decide_valid`) first has its promotion decisions and triggers looked at
(:mod:`.loop`); then an idle job may start a run (once earlier pods are gone and the output
prefix is claimed), an active run is followed through its attempts (:mod:`.attempts`), and
``ttlSecondsAfterFinished`` cleans up finished runs. A job whose spec became invalid starts
nothing; a run it had going goes on under the spec it started with. A status that lost track of
a run (lost, or written before the operator died) adopts the run's pods, so run numbers are
never reused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from tuneloop.api import ConditionType, FineTuneJob, Reason
from tuneloop.api.status import (
    MAX_PENDING_TRIGGERS,
    Attempt,
    CurrentRun,
    PendingTrigger,
    RunTrigger,
    find_condition,
)
from tuneloop.contract import spec_hashes
from tuneloop.ownership import ownership_problem
from tuneloop_operator import triggers
from tuneloop_operator.planner.attempts import advance, close_attempt, finish, resume, suspend
from tuneloop_operator.planner.context import Pass
from tuneloop_operator.planner.loop import promotion_decisions, retrain_triggers
from tuneloop_operator.planner.observe import View, child_run, spec_hash, wants_new_run
from tuneloop_operator.planner.restore import restore_history
from tuneloop_operator.planner.types import Event, ObjectRef, Observed, OutputClaim, Plan, short
from tuneloop_operator.render import names
from tuneloop_operator.settings import OperatorSettings

#: Seconds before a job refused for its output (``OutputOwned``) looks at the owner again: the
#: other job may be deleted and its owner record removed, and the job then starts by itself.
OUTPUT_RECHECK_SECONDS: Final = 300.0
#: Seconds before an output that could not be read is tried again.
OUTPUT_RETRY_SECONDS: Final = 30.0


def plan(observed: Observed, settings: OperatorSettings) -> Plan:
    """What to do about one FineTuneJob, given what was observed (see :mod:`tuneloop_operator.planner`)."""
    ctx = Pass(View(observed), settings)
    job = ctx.view.live
    if job is None:
        keep_active_run_going(ctx)
        ctx.report.invalid_spec(ctx.view.problems)
    else:
        decide_valid(ctx, job)
    ctx.plan.status = ctx.report.settle()
    return ctx.plan


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


def decide_valid(ctx: Pass, job: FineTuneJob) -> None:
    """A job whose spec is valid: promotion decisions, triggers, then its runs."""
    restore_history(ctx, job)
    failed = find_condition(ctx.status.conditions, ConditionType.FAILED)
    if failed is not None and failed.reason == Reason.INVALID_SPEC:
        # The spec was fixed: the Failed condition tells about the latest run again.
        last = ctx.status.current_run
        if last is not None and last.result is not None and last.result != "Succeeded":
            ctx.report.cond(ConditionType.FAILED, "True", last.reason or "Failed", "the latest run failed")
        else:
            ctx.report.cond(ConditionType.FAILED, "False", Reason.NO_RUN, "the spec is valid")
    track_spec_change(ctx, job)
    adopt_orphans(ctx, job)
    promotion_decisions(ctx, job)
    current = ctx.status.current_run
    if current is None or current.result is not None:
        if job.spec.suspend:
            ctx.report.suspended_idle()
            return
        wanted: PendingTrigger | None = None
        if current is None:
            wanted = PendingTrigger(trigger="Created", detail="the job was created", time=ctx.now)
        elif wants_new_run(job, current):
            wanted = PendingTrigger(trigger="SpecChange", detail=f"spec generation {ctx.view.generation}", time=ctx.now)
        fired = retrain_triggers(ctx, job, active=False)
        if wanted is None and fired is not None:
            wanted = fired
        elif wanted is not None and fired is not None:
            wanted = wanted.model_copy(update={"detail": f"{wanted.detail}; also {fired.trigger}: {fired.detail}"})
        if wanted is not None:
            start_triggered(ctx, job, wanted, fired)
            return
        suspended = find_condition(ctx.status.conditions, ConditionType.SUSPENDED)
        if suspended is not None and suspended.status == "True":
            ctx.report.cond(ConditionType.SUSPENDED, "False", Reason.RESUMED, "spec.suspend is false")
        cleanup_finished(ctx, job)
        return
    if job.spec.retrain.concurrency_policy == "Replace" and wants_new_run(job, current):
        supersede(ctx, job, current)
        return
    retrain_triggers(ctx, job, active=True)
    active_run(ctx, ctx.view.job_of(current, job), current)


def active_run(ctx: Pass, job: FineTuneJob, current: CurrentRun) -> None:
    """Follow the active run: clean up finished ones, suspend, resume, judge its attempt."""
    cleanup_finished(ctx, job, keep=current.number)
    if job.spec.suspend:
        suspend(ctx, current)
        return
    if current.suspended_since is not None:
        resume(ctx, current)
    advance(ctx, job, current)


def keep_active_run_going(ctx: Pass) -> None:
    """The spec became invalid while a run is active: that run goes on under the spec it
    started with (its pods still read it), so it can still finish, be retried, time out or
    be suspended; ``spec.suspend`` is honoured as long as it reads as a boolean (Kueue sets
    it whatever else is wrong with the spec)."""
    current = ctx.status.current_run
    if current is None or current.result is not None:
        return
    stored = ctx.view.stored_job(current)
    if stored is None:
        return  # nothing to go by: the pods run on, and are looked at once the spec is fixed
    raw = ctx.view.obs.body.get("spec")
    suspended = raw.get("suspend") if isinstance(raw, Mapping) else None
    if isinstance(suspended, bool):
        stored = stored.model_copy(update={"spec": stored.spec.model_copy(update={"suspend": suspended})})
    active_run(ctx, stored, current)


def adopt_orphans(ctx: Pass, job: FineTuneJob) -> None:
    """Pods of a run newer than the status knows (the status was lost, or written before the
    operator died between creating pods and recording them): adopt that run if its pods are
    alive, else record it as ended, so that run numbers (and S3 prefixes) are never reused."""
    newest = max((p.run for p in ctx.view.pods), default=0)
    known = ctx.status.current_run.number if ctx.status.current_run is not None else 0
    if newest <= known:
        return
    pods = ctx.view.run_pods(newest)
    attempt = max(p.attempt for p in pods)
    alive = [p for p in pods if p.attempt == attempt and p.alive]
    trigger: RunTrigger = "Created" if newest == 1 else "SpecChange"
    run = CurrentRun(
        number=newest,
        trigger=trigger,
        pods=sorted(p.name for p in pods if p.attempt == attempt),
        start_time=ctx.now,
        attempts=attempt,
        generation=ctx.view.generation,
        spec_hash=spec_hash(job),
        history=[Attempt(number=attempt, cause="Started", start_time=ctx.now)],
        # Run 1 is always the job's creation (as plan_start words it); a later run's detail is unknown.
        trigger_detail="the job was created" if newest == 1 else "",
    )
    # Followed, or judged by how its pods ended (a run that succeeded is not trained again; one
    # whose trainer failed while nothing was recorded is retried, not replaced by a new run).
    if alive or any(p.attempt == attempt and not p.deleting for p in pods):
        ctx.status.current_run = run
        ctx.report.run_started(newest, f"run {newest}: found its pods")
        complete_adopted(ctx, job, newest, attempt)
        ctx.report.event(
            "Normal",
            Reason.RUN_STARTED,
            f"the status did not record run {newest}: found its pods (attempt {attempt}) and follows them; "
            f"guessed: trigger {trigger}, the current spec, start time now, earlier attempts "
            + ("unknown (earlier runs restored from the lineage index)" if ctx.restored else "and runs unknown"),
        )
        return
    run.history = [run.history[0].model_copy(update={"end_time": ctx.now, "reason": "Unknown"})]
    run.result, run.reason, run.completion_time = "Cancelled", "Unknown", ctx.now
    run.spec_hash = None  # unknown: the next run trains the current spec
    ctx.status.current_run = run
    ctx.report.event(
        "Warning",
        Reason.RUN_STARTED,
        f"run {newest} ended while its status was not recorded; the next run is {newest + 1}",
    )


def complete_adopted(ctx: Pass, job: FineTuneJob, run: int, attempt: int) -> None:
    """An operator that died while creating an attempt's objects left some ranks without a
    pod: create them, as long as no pod of the attempt has ended (a trainer waits for all its
    ranks before it trains), rather than take the attempt for lost."""
    pods = [p for p in ctx.view.run_pods(run) if p.attempt == attempt]
    if any(p.terminal or p.deleting for p in pods):
        return
    have = {p.name for p in pods}
    rendered = ctx.render_attempt(job, run, attempt)
    missing = [o for o in rendered if o["kind"] == "Pod" and o["metadata"]["name"] not in have]
    if not missing:
        return
    ctx.plan.create += [o for o in rendered if o["kind"] != "Pod" or o in missing]
    ctx.adopting |= {str(o["metadata"]["name"]) for o in missing}
    current = ctx.status.current_run
    if current is not None and current.number == run:
        current.pods = sorted(have | ctx.adopting)


def track_spec_change(ctx: Pass, job: FineTuneJob) -> None:
    current = ctx.status.current_run
    seen = ctx.status.observed_generation
    if current is None or current.result is not None or seen is None or seen == ctx.view.generation:
        return
    if current.spec_hash in spec_hashes(job.spec):
        return  # lifecycle fields only (suspend, deadlines...): no new run
    if job.spec.retrain.on_spec_change:
        ctx.report.event(
            "Normal",
            Reason.SPEC_CHANGED,
            f"generation {ctx.view.generation} will be trained by the next run, after run {current.number} ends",
        )
    else:
        ctx.report.event(
            "Normal",
            Reason.SPEC_CHANGED,
            f"generation {ctx.view.generation} observed; retrain.onSpecChange is false, so no new run starts",
        )


def claimable_run(ctx: Pass, job: FineTuneJob) -> int | None:
    """The number of the run to start, when the output prefix may be written by this job
    (the claim goes into the plan); ``None`` when it may not (said in the conditions) or
    was not read yet (``plan.needs``)."""
    output = ctx.view.obs.output
    if output is None:
        ctx.plan.needs.add("output")
        return None
    uri = job.spec.output.uri
    if output.error is not None:
        message = f"cannot read spec.output.uri {uri} to claim it: {output.error}; retrying"
        ctx.report.cond(ConditionType.RUNNING, "False", Reason.OUTPUT_UNAVAILABLE, short(message, 1024))
        if ctx.report.changed(ConditionType.RUNNING):
            ctx.report.event("Warning", Reason.OUTPUT_UNAVAILABLE, message)
        ctx.plan.requeue(OUTPUT_RETRY_SECONDS)
        return None
    me = ctx.view.identity
    lineage = job.spec.output.continue_lineage
    problem = ownership_problem(output.owner, me, continue_lineage=lineage, output_uri=uri)
    if problem is not None:
        ctx.report.cond(ConditionType.FAILED, "True", Reason.OUTPUT_OWNED, problem)
        ctx.report.cond(ConditionType.RUNNING, "False", Reason.OUTPUT_OWNED, "no run starts: see the Failed condition")
        if ctx.report.changed(ConditionType.FAILED):
            ctx.report.event("Warning", Reason.OUTPUT_OWNED, problem)
        ctx.plan.requeue(OUTPUT_RECHECK_SECONDS)
        return None
    last = ctx.status.current_run.number if ctx.status.current_run is not None else 0
    number = max(last, output.highest_run) + 1
    claimant = output.unstarted_claimant
    if (
        claimant is not None
        and claimant.same_job(me)
        and output.highest_run > last
        and not ctx.view.run_pods(output.highest_run)
    ):
        number = output.highest_run  # claimed by this job and never started: an operator died in between
    ctx.plan.claim = OutputClaim(identity=me, run=number, spec_hash=spec_hash(job), continue_lineage=lineage)
    ctx.plan.job = job
    if output.owner is not None and not output.owner.owner.same_job(me):
        ctx.report.event(
            "Normal",
            Reason.RUN_STARTED,
            f"spec.output.continueLineage: continuing the runs of {output.owner.owner.describe()} under {uri}; "
            f"the first run of this job is run {number}",
        )
    return number


def start_triggered(ctx: Pass, job: FineTuneJob, wanted: PendingTrigger, fired: PendingTrigger | None) -> None:
    """Start a run for ``wanted``: after the pods of earlier runs are gone, with the output
    claimed and, when new data is watched, the listing it starts with recorded."""

    def keep_waiting() -> None:
        # Not started after all: a trigger that fired stays pending for the next pass.
        if fired is not None and ctx.status.triggers is not None:
            ctx.status.triggers.pending = [fired, *ctx.status.triggers.pending][:MAX_PENDING_TRIGGERS]

    leftovers = [
        p
        for p in ctx.view.pods
        if p.alive and (ctx.status.current_run is None or p.run <= ctx.status.current_run.number)
    ]
    if leftovers:
        for pod in leftovers:
            ctx.delete_pod(pod)
        ctx.report.cond(
            ConditionType.RUNNING,
            "True",
            Reason.POD_PENDING,
            f"waiting for pod(s) {', '.join(p.name for p in leftovers)} of an earlier run to end",
        )
        ctx.plan.requeue(1.0)
        keep_waiting()
        return
    watch = job.spec.retrain.on_new_data
    if watch is not None and watch.enabled and ctx.view.obs.triggers.data is None:
        ctx.plan.needs.add("data")  # the run records the listing it starts with
    number = claimable_run(ctx, job)
    if number is None or ctx.plan.needs:
        keep_waiting()
        return
    start_run(ctx, job, number, wanted)
    ctx.status.triggers = triggers.starting(ctx.status.triggers, wanted.trigger, now=ctx.now)
    data = ctx.view.obs.triggers.data
    if watch is not None and watch.enabled and data is not None and data.fingerprint is not None:
        state = ctx.status.triggers.new_data if ctx.status.triggers is not None else None
        if state is not None:
            state.watermark, state.watermark_run, state.new_rows = data.fingerprint, number, 0
        ctx.plan.record_listing = number


def start_run(ctx: Pass, job: FineTuneJob, number: int, why: PendingTrigger) -> None:
    trigger: RunTrigger = why.trigger
    child = names(ctx.view.name, number, 1)
    pods = [child.pod(r) for r in range(job.spec.resources.nodes)]
    ctx.plan.create += ctx.render_attempt(job, number, 1)
    ctx.status.current_run = CurrentRun(
        number=number,
        trigger=trigger,
        pods=pods,
        start_time=ctx.now,
        attempts=1,
        generation=ctx.view.generation,
        spec_hash=spec_hash(job),
        history=[Attempt(number=1, cause="Started", start_time=ctx.now)],
        trigger_detail=short(why.detail, 512),
    )
    ctx.plan.started_run = number
    if job.spec.active_deadline_seconds is not None:
        ctx.plan.requeue(job.spec.active_deadline_seconds)
    what = f"{trigger}: {why.detail}"
    created = f"run {number} ({what}): created {len(pods)} pod(s)"
    ctx.report.run_started(number, created)
    if find_condition(ctx.status.conditions, ConditionType.SUSPENDED) is not None:
        ctx.report.cond(ConditionType.SUSPENDED, "False", Reason.RESUMED, "spec.suspend is false")
    ctx.report.event(
        "Normal", Reason.RUN_STARTED, short(f"run {number} ({what}) started: pods {', '.join(pods)}", 1024)
    )


def supersede(ctx: Pass, job: FineTuneJob, current: CurrentRun) -> None:
    """``concurrencyPolicy: Replace``: the active run stops (checkpoints kept) for the new spec."""
    close_attempt(ctx, current, Reason.SUPERSEDED, f"spec generation {ctx.view.generation} replaces it")
    ctx.report.event(
        "Normal",
        Reason.SUPERSEDED,
        f"run {current.number} stopped for spec generation {ctx.view.generation} (retrain.concurrencyPolicy: "
        "Replace); its checkpoints are kept",
    )
    finish(
        ctx,
        job,
        current,
        "Superseded",
        Reason.SUPERSEDED,
        message=f"replaced by spec generation {ctx.view.generation} (retrain.concurrencyPolicy: Replace)",
    )
    ctx.plan.requeue(0.0)


def cleanup_finished(ctx: Pass, job: FineTuneJob, keep: int | None = None) -> None:
    """``ttlSecondsAfterFinished``: delete the pods, ConfigMaps and Services of finished runs
    (never anything in S3)."""
    ttl = job.spec.ttl_seconds_after_finished
    if ttl is None:
        return
    finished = {r.number: r.completion_time for r in ctx.status.runs}
    current = ctx.status.current_run
    oldest_known = min(finished, default=0)
    doomed: list[ObjectRef] = []
    cleaned: set[int] = set()
    kinds = (("v1", "Pod", ctx.view.obs.pods), ("v1", "ConfigMap", ctx.view.obs.config_maps))
    for api_version, kind, objs in (*kinds, ("v1", "Service", ctx.view.obs.services)):
        for obj in objs:
            run = child_run(obj)
            meta = obj.get("metadata") or {}
            if run is None or run == keep or meta.get("deletionTimestamp"):
                continue
            done = finished.get(run)
            if done is not None:
                left = ttl - (ctx.now - done).total_seconds()
            elif current is not None and run < min(current.number, oldest_known or current.number):
                left = 0.0  # older than the bounded history: long finished
            else:
                continue  # not known to have finished
            if left > 0:
                ctx.plan.requeue(left)
                continue
            doomed.append(ObjectRef(api_version, kind, str(meta.get("name"))))
            cleaned.add(run)
    if doomed:
        ctx.plan.delete += doomed
        ctx.report.event(
            "Normal",
            Reason.CLEANED_UP,
            f"ttlSecondsAfterFinished ({ttl}s) passed: deleted the pods and ConfigMaps of run(s) "
            f"{', '.join(map(str, sorted(cleaned)))}; checkpoints and models in {job.spec.output.uri} are kept",
        )
