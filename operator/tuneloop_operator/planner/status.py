"""Status: the conditions and events a pass writes, and the kstatus conditions derived from them.

:class:`Report` holds the job's status as this pass rewrites it and the events it posts. The
decisions (:mod:`.decide`, :mod:`.attempts`, :mod:`.loop`) tell it what happened; it words the
conditions, posts an event when a condition really changed, and at the end (:meth:`Report.settle`)
derives ``Ready``/``Reconciling``/``Stalled`` and the phase from the rest of the status.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final, TypeGuard

from tuneloop.api import ConditionType, FineTuneJob, Reason
from tuneloop.api.spec import METRIC_OUTPUTS
from tuneloop.api.status import Condition, ConditionStatus, CurrentRun, FineTuneJobStatus, RunResult, find_condition
from tuneloop.contract import Heartbeat
from tuneloop.validate import Problem
from tuneloop_operator.conditions import set_condition, with_phase
from tuneloop_operator.planner.observe import View, wants_new_run
from tuneloop_operator.planner.types import Event, short

MAX_EVENT_MESSAGE: Final = 1024


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


class Report:
    """The status this pass writes (a copy of the observed one, changed in place) and its events."""

    def __init__(self, view: View, events: list[Event]) -> None:
        self.view = view
        self.status = view.old.model_copy(deep=True)
        self.events = events

    def cond(self, type_: str, status: ConditionStatus, reason: str, message: str = "") -> None:
        """Set a condition (its ``lastTransitionTime`` moves only on a real flip)."""
        self.status.conditions = set_condition(
            self.status.conditions, type_, status, reason, message, generation=self.view.generation, at=self.view.now
        )

    def event(self, type_: str, reason: str, message: str) -> None:
        """Post an Event about the job."""
        self.events.append(Event(type_, reason, short(message, MAX_EVENT_MESSAGE)))

    def changed(self, type_: str) -> bool:
        """Whether this pass changed the condition's status, reason or message."""
        before = find_condition(self.view.old.conditions, type_)
        after = find_condition(self.status.conditions, type_)
        if after is None:
            return False
        return before is None or (before.status, before.reason, before.message) != (
            after.status,
            after.reason,
            after.message,
        )

    def data_valid(self) -> None:
        """The trainer got past validating its data."""
        data = find_condition(self.status.conditions, ConditionType.DATA_VALID)
        if data is None or data.status != "True":
            self.cond(ConditionType.DATA_VALID, "True", Reason.DATA_VALIDATED, "the data passed validation")

    def run_started(self, number: int, running: str) -> None:
        """Conditions of a run that began (``running`` says how)."""
        self.cond(ConditionType.RUNNING, "True", Reason.POD_CREATED, running)
        self.cond(ConditionType.COMPLETE, "False", Reason.RUN_STARTED, f"run {number} is in progress")
        self.cond(ConditionType.FAILED, "False", Reason.RUN_STARTED, f"run {number} is in progress")
        self.cond(ConditionType.DATA_VALID, "Unknown", Reason.RUN_STARTED, f"run {number} validates its data")

    def invalid_spec(self, problems: list[Problem]) -> None:
        """The spec is invalid: ``Failed`` says why, and no new run starts. An active run goes on
        under its own spec (see :func:`~tuneloop_operator.planner.decide.keep_active_run_going`)."""
        listed = "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        message = f"FineTuneJob {self.view.name} is invalid: {listed}{more}"
        self.cond(ConditionType.FAILED, "True", Reason.INVALID_SPEC, message)
        active = self.status.current_run is not None and self.status.current_run.result is None
        if not active:
            self.cond(ConditionType.RUNNING, "False", Reason.INVALID_SPEC, "no pod is created for an invalid spec")
        if self.changed(ConditionType.FAILED):
            self.event("Warning", Reason.INVALID_SPEC, message)

    def suspended_idle(self) -> None:
        """``spec.suspend`` while no run is active."""
        message = "spec.suspend is true: no run starts until it is false"
        self.cond(ConditionType.SUSPENDED, "True", Reason.SUSPENDED, message)
        if find_condition(self.status.conditions, ConditionType.RUNNING) is None:
            self.cond(ConditionType.RUNNING, "False", Reason.SUSPENDED, message)

    def training(self, current: CurrentRun, beat: Heartbeat | None) -> None:
        """Every rank of the attempt started: training or evaluating, as the run's own heartbeat says."""
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

    def run_ended(
        self,
        run: int,
        result: RunResult,
        reason: str,
        message: str,
        *,
        headline: str | None,
        model_uri: str | None,
        announce: bool = True,
    ) -> None:
        """Conditions and event of a run that ended (``announce=False``: the conditions only, for
        a run that ended before: its event was posted then)."""
        # The whole story goes once, into the condition that tells it (Complete or Failed);
        # the others say where it went.
        if result == "Succeeded":
            where = f"; model at {model_uri}" if model_uri else ""
            text = f"run {run} succeeded{f' ({headline})' if headline else ''}{where}"
            self.cond(ConditionType.RUNNING, "False", Reason.SUCCEEDED, f"run {run} ended")
            self.cond(ConditionType.COMPLETE, "True", Reason.SUCCEEDED, text)
            self.cond(ConditionType.FAILED, "False", Reason.SUCCEEDED, f"run {run} succeeded")
            if announce:
                self.event("Normal", Reason.SUCCEEDED, text)
        else:
            text = f"run {run} failed ({reason}): {message}"
            brief = f"run {run} failed ({reason}): see the Failed condition"
            self.cond(ConditionType.RUNNING, "False", reason, f"run {run} ended")
            self.cond(ConditionType.COMPLETE, "False", reason, brief)
            self.cond(ConditionType.FAILED, "True", reason, text)
            if announce:
                self.event("Warning", reason, text)

    # -- the end of the pass --

    def settle(self) -> FineTuneJobStatus:
        """The status to write: the kstatus conditions, the generation observed, the phase."""
        self.kstatus()
        generation = self.view.generation
        self.status.observed_generation = generation
        self.status.conditions = [
            c.model_copy(update={"observed_generation": generation}) for c in self.status.conditions
        ]
        return with_phase(self.status)

    def kstatus(self) -> None:
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
            if any(p.alive for p in self.view.pods):
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
        if self.view.live is not None and wants_new_run(self.view.live, last):
            return True
        return failed and self.status.triggers is not None and bool(self.status.triggers.pending)

    def follow_up_message(self, last: CurrentRun) -> str:
        if self.view.live is not None and wants_new_run(self.view.live, last):
            return f"run {last.number} ended; the next run trains spec generation {self.view.generation}"
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
