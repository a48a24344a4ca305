"""Retraining triggers: when a FineTuneJob starts a run by itself. Pure.

:func:`evaluate` takes the ``spec.retrain`` settings, the trigger state kept in the status, the
time, whether a run is active and what was observed in this pass (a listing of the dataset
prefix, the rows of its new objects, a drift query's value), and returns the new state, the run
to start (if any), the events to post, what to observe before deciding (``needs``) and when to
look again. The planner calls it; the handler does the I/O it asks for and calls again.

The triggers:

- **new data** (``onNewData``): every ``pollInterval`` the prefix is listed (no downloads). A
  listing that differs from the *watermark* (the listing the latest run started with) and has
  not changed for ``settlePeriod`` gets its new or changed objects counted, once; at least
  ``minNewSamples`` rows start a run.
- **drift** (``onDrift``): every ``pollInterval`` the PromQL query runs; a value past the
  threshold in every query for ``for`` starts a run (``pendingSince`` is in the status, so an
  operator restart neither resets nor repeats it). An error or a non-number resets the wait.
- **schedule**: the latest scheduled time not yet acted on starts a run if it was missed by at
  most ``startingDeadline``; older missed times are skipped, never run as a backlog.
- **manual**: a new value of the annotation ``tuneloop.dev/retrain``.

Automatic triggers (new data, drift, schedule) wait for ``cooldown`` after the last automatic
start; every trigger waits for the active run to end. Waiting triggers are coalesced: whatever
fired while waiting starts one run together (``status.triggers.pending``). A manual request does
not wait for the cooldown.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal
from zoneinfo import ZoneInfo

from cronsim import CronSim

from tuneloop.api.spec import Retrain
from tuneloop.api.status import (
    MAX_PENDING_TRIGGERS,
    DriftState,
    NewDataState,
    PendingTrigger,
    Reason,
    RunTrigger,
    ScheduleState,
    TriggerStatus,
)
from tuneloop.api.types import expand_cron, parse_duration

ANNOTATION_RETRAIN: Final = "tuneloop.dev/retrain"
"""A new value of this annotation starts one run (trigger ``Manual``)."""
AUTOMATIC: Final[frozenset[str]] = frozenset({"NewData", "Drift", "Schedule"})
"""Triggers the cooldown applies to."""
#: Polls are spread by up to this fraction of their interval (and at most MAX_JITTER_SECONDS),
#: so that a thousand jobs created together do not list their data in the same second.
JITTER_FRACTION: Final = 0.1
MAX_JITTER_SECONDS: Final = 60.0
#: Scheduled times walked at most when the operator comes back after a long absence.
MAX_CRON_STEPS: Final = 100_000
#: A poll that changes nothing but its own times (and the drift value, while it stays on the same
#: side of the threshold) is written to the status at most this often: a thousand jobs polling
#: every minute must not write their status every minute. The operator keeps the exact schedule
#: (``Observations.schedule``); after a restart the status' times are at most this old.
STATUS_REFRESH_SECONDS: Final = 600.0

Need = Literal["data", "rows", "drift", "watermark"]
Outcome = Literal["fired", "queued", "coalesced", "skipped", "error"]


@dataclass(frozen=True)
class DataObservation:
    """A listing of ``dataset.uri``: its fingerprint and size, or why it failed."""

    fingerprint: str | None = None
    objects: int = 0
    error: str | None = None


@dataclass(frozen=True)
class RowObservation:
    """Rows of the objects added or changed since the watermark listing."""

    rows: int = 0
    objects: int = 0
    exact: bool = True
    error: str | None = None


@dataclass(frozen=True)
class DriftObservation:
    """One value of the drift query, or why there is none."""

    value: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Observations:
    """What the handler observed for the triggers in this pass (``None``: not looked at)."""

    data: DataObservation | None = None
    rows: RowObservation | None = None
    drift: DriftObservation | None = None
    watermark: tuple[str, int] | None = None
    """``(fingerprint, run)`` of the latest run's recorded listing, read back after a status loss."""
    watermark_read: bool = False
    """The recorded listing was looked for (``watermark`` may still be ``None``: none recorded)."""
    schedule: Mapping[str, datetime] = field(default_factory=dict)
    """When ``data`` and ``drift`` look next, as the operator remembers it (the status has it
    only as of its last refresh, see :data:`STATUS_REFRESH_SECONDS`)."""


@dataclass
class TriggerPlan:
    """What :func:`evaluate` decided."""

    state: TriggerStatus
    start: PendingTrigger | None = None
    """The run to start now (its trigger and detail), when no run is active."""
    events: list[tuple[str, str, str]] = field(default_factory=list)
    """``(type, reason, message)``."""
    counts: list[tuple[str, Outcome]] = field(default_factory=list)
    """``(trigger, outcome)`` for the triggers metric."""
    needs: set[Need] = field(default_factory=set)
    """Observe these, then evaluate again."""
    wake_at: datetime | None = None
    """When to look again even if nothing happens."""
    manual: str | None = None
    """The ``tuneloop.dev/retrain`` value handled (to record in ``status.annotations``)."""
    health: tuple[bool, str] | None = None
    """``(healthy, message)`` of the configured triggers; ``None`` when none is configured."""
    schedule: dict[str, datetime] = field(default_factory=dict)
    """When ``data`` and ``drift`` look next: for the operator to remember."""

    def wake(self, at: datetime | None) -> None:
        if at is not None and (self.wake_at is None or at < self.wake_at):
            self.wake_at = at


def jitter(key: str, seconds: float) -> float:
    """A stable spread in ``[0, 1)`` for ``key``: the same job polls at the same phase."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 * seconds


def _poll_after(now: datetime, interval: float, key: str) -> datetime:
    return now + timedelta(seconds=interval + jitter(key, min(MAX_JITTER_SECONDS, interval * JITTER_FRACTION)))


def _seconds(value: str) -> float:
    return float(parse_duration(value))


def _span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _at(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def evaluate(
    retrain: Retrain,
    state: TriggerStatus | None,
    *,
    now: datetime,
    key: str,
    active: bool,
    observed: Observations,
    retrain_annotation: str | None,
    handled_annotation: str | None,
    has_runs: bool,
) -> TriggerPlan:
    """Decide about the retraining triggers (see the module docstring).

    ``key`` identifies the job (polls are spread by it); ``has_runs``: a run exists (else no
    watermark can exist and nothing is compared); ``retrain_annotation`` is the annotation's
    value now and ``handled_annotation`` the last one acted on."""
    before = state or TriggerStatus()
    plan = TriggerPlan(state=before.model_copy(deep=True), schedule=dict(observed.schedule))
    fired: list[PendingTrigger] = []
    problems: list[str] = []

    if retrain_annotation is not None and retrain_annotation != handled_annotation:
        plan.manual = retrain_annotation
        if handled_annotation is not None or has_runs:
            fired.append(
                PendingTrigger(
                    trigger="Manual", detail=f"annotation {ANNOTATION_RETRAIN}={retrain_annotation[:64]}", time=now
                )
            )
        # A job created with the annotation: its first run is already the requested one.

    if retrain.on_new_data is not None and retrain.on_new_data.enabled:
        _new_data(retrain, plan, now=now, key=key, observed=observed, has_runs=has_runs, fired=fired, problems=problems)
    else:
        plan.state.new_data = None
    if retrain.on_drift is not None:
        _drift(retrain, plan, now=now, key=key, observed=observed, fired=fired, problems=problems)
    else:
        plan.state.drift = None
    if retrain.schedule is not None:
        _schedule(retrain, plan, now=now, fired=fired)
    else:
        plan.state.schedule = None
    configured = (retrain.on_new_data is not None and retrain.on_new_data.enabled) or retrain.on_drift is not None
    if configured:
        plan.health = (not problems, "; ".join(problems) if problems else "every trigger looked successfully")
    if plan.needs:
        return plan  # observe first: nothing is decided on half the facts
    _queue_and_start(retrain, plan, fired, now=now, active=active)
    _quiet(before, plan.state, now=now)
    return plan


def _due(stored: datetime | None, remembered: datetime | None) -> datetime | None:
    """When a trigger looks next: the later of the status' time and the operator's own."""
    times = [t for t in (stored, remembered) if t is not None]
    return max(times) if times else None


def _quiet(before: TriggerStatus, after: TriggerStatus, *, now: datetime) -> None:
    """Keep a poll that changed nothing but its times (and a drift value still on the same side
    of the threshold) out of the status until :data:`STATUS_REFRESH_SECONDS` have passed."""
    new, old = after.new_data, before.new_data
    if new is not None and old is not None and old.last_poll_time is not None:
        fresh = (now - old.last_poll_time).total_seconds() < STATUS_REFRESH_SECONDS
        volatile = {"last_poll_time": old.last_poll_time, "next_poll_time": old.next_poll_time}
        if fresh and new.model_copy(update=volatile) == old:
            after.new_data = old.model_copy()
    drift, was = after.drift, before.drift
    if drift is not None and was is not None and was.last_query_time is not None:
        fresh = (now - was.last_query_time).total_seconds() < STATUS_REFRESH_SECONDS
        same_side = (
            drift.pending_since == was.pending_since
            and (drift.value is None) == (was.value is None)
            and drift.message.startswith("query failed") == was.message.startswith("query failed")
        )
        if fresh and same_side:
            after.drift = was.model_copy()


# --- new data -------------------------------------------------------------------------------


def _new_data(
    retrain: Retrain,
    plan: TriggerPlan,
    *,
    now: datetime,
    key: str,
    observed: Observations,
    has_runs: bool,
    fired: list[PendingTrigger],
    problems: list[str],
) -> None:
    spec = retrain.on_new_data
    assert spec is not None
    state = plan.state.new_data or NewDataState()
    plan.state.new_data = state
    interval, settle = _seconds(spec.poll_interval), _seconds(spec.settle_period)
    if state.watermark is None and has_runs and not observed.watermark_read:
        plan.needs.add("watermark")  # the status lost it: the latest run's recorded listing has it
    elif state.watermark is None and observed.watermark is not None:
        state.watermark, state.watermark_run = observed.watermark
    if state.next_poll_time is None and observed.data is None:
        # First sight: spread the first poll over the interval.
        state.next_poll_time = now + timedelta(seconds=jitter(key, interval))
    next_poll = _due(state.next_poll_time, observed.schedule.get("data"))
    if (next_poll is None or now >= next_poll) and observed.data is None:
        plan.needs.add("data")
        return
    data = observed.data
    if data is not None:
        next_poll = _poll_after(now, interval, key)
        plan.schedule["data"] = next_poll
        state.last_poll_time = now
        state.next_poll_time = next_poll
        if data.error is not None:
            state.message = f"cannot list the dataset: {data.error}"[:1024]
            problems.append(f"onNewData: {state.message}")
            plan.counts.append(("NewData", "error"))
            plan.wake(next_poll)
            return
        state.objects = data.objects
        if data.fingerprint != state.fingerprint:
            state.fingerprint = data.fingerprint
            state.changed_time = now
            state.new_rows = None
    plan.wake(next_poll)
    if state.fingerprint is None:
        return
    if state.watermark is None:
        state.message = (
            f"{state.objects} objects listed; new rows are counted against the listing the next run starts with"
        )
        return
    if state.fingerprint == state.watermark:
        state.message = f"{state.objects} objects, no change since run {state.watermark_run or '?'}"
        state.new_rows = 0
        return
    settled_at = (state.changed_time or now) + timedelta(seconds=settle)
    if now < settled_at:
        state.message = f"the dataset changed; waiting until {_at(settled_at)} for uploads to settle (settlePeriod)"
        plan.wake(settled_at)
        return
    if state.new_rows is not None:
        return  # this listing was counted already; it triggered or was too small
    rows = observed.rows
    if rows is None:
        plan.needs.add("rows")
        return
    if rows.error is not None:
        state.message = f"cannot count the new rows: {rows.error}"[:1024]
        problems.append(f"onNewData: {state.message}")
        plan.counts.append(("NewData", "error"))
        return
    state.new_rows = rows.rows
    approx = "" if rows.exact else " (at least; counting stopped at its byte limit)"
    since = f"since run {state.watermark_run}" if state.watermark_run else "since the latest run"
    counted = f"{rows.rows:,} new rows{approx} in {rows.objects} new or changed object(s) {since}"
    if rows.rows >= spec.min_new_samples:
        state.message = counted
        fired.append(PendingTrigger(trigger="NewData", detail=counted, time=now))
        return
    state.message = f"{counted}, below minNewSamples {spec.min_new_samples}: no run"
    plan.counts.append(("NewData", "skipped"))
    plan.events.append(("Normal", Reason.TRIGGER_SKIPPED, f"onNewData: {state.message}"))


# --- drift ----------------------------------------------------------------------------------


def _drift(
    retrain: Retrain,
    plan: TriggerPlan,
    *,
    now: datetime,
    key: str,
    observed: Observations,
    fired: list[PendingTrigger],
    problems: list[str],
) -> None:
    spec = retrain.on_drift
    assert spec is not None
    prom = spec.prometheus
    state = plan.state.drift or DriftState()
    plan.state.drift = state
    interval, hold = _seconds(prom.poll_interval), _seconds(prom.for_)
    if state.next_query_time is None and observed.drift is None:
        state.next_query_time = now + timedelta(seconds=jitter(key + "/drift", min(interval, MAX_JITTER_SECONDS)))
    next_query = _due(state.next_query_time, observed.schedule.get("drift"))
    if now >= (next_query or now) and observed.drift is None:
        plan.needs.add("drift")
        return
    sample = observed.drift
    if sample is not None:
        next_query = _poll_after(now, interval, key + "/drift")
        plan.schedule["drift"] = next_query
        state.last_query_time = now
        state.next_query_time = next_query
        if sample.error is not None or sample.value is None or not math.isfinite(sample.value):
            # No number, no proof that the drift held: the wait starts again with the next value.
            state.value = None
            state.pending_since = None
            state.message = f"query failed: {sample.error or 'no value'}"[:1024]
            problems.append(f"onDrift: {state.message}")
            plan.counts.append(("Drift", "error"))
        else:
            value = sample.value
            state.value = value
            past = value > prom.threshold if prom.direction == "above" else value < prom.threshold
            if not past:
                state.pending_since = None
                state.message = f"{value:.4g} is not {prom.direction} {prom.threshold:g}"
            else:
                state.pending_since = state.pending_since or now
                held = (now - state.pending_since).total_seconds()
                if held >= hold:
                    detail = (
                        f"drift {value:.4g} {prom.direction} {prom.threshold:g} for {_span(held)} "
                        f"(since {_at(state.pending_since)})"
                    )
                    state.message = detail
                    state.pending_since = None
                    fired.append(PendingTrigger(trigger="Drift", detail=detail, time=now))
                else:
                    until = state.pending_since + timedelta(seconds=hold)
                    state.message = (
                        f"{value:.4g} {prom.direction} {prom.threshold:g} since {_at(state.pending_since)}; "
                        f"a run starts at {_at(until)} if every value until then is too"
                    )
                    plan.wake(until)
    plan.wake(next_query)


# --- schedule -------------------------------------------------------------------------------


def _cron_after(expression: str, zone: ZoneInfo, after: datetime) -> datetime:
    """The first scheduled time strictly after ``after`` (UTC in, UTC out)."""
    local = after.astimezone(zone).replace(second=0, microsecond=0)
    for moment in CronSim(expand_cron(expression), local):
        if moment.astimezone(after.tzinfo) > after:
            return moment.astimezone(after.tzinfo)
    raise ValueError(f"schedule {expression!r} never fires")  # pragma: no cover - CronSim validated it


def next_schedule(retrain: Retrain, after: datetime) -> datetime:
    """The first scheduled time of ``retrain.schedule`` after ``after``."""
    assert retrain.schedule is not None
    return _cron_after(retrain.schedule, ZoneInfo(retrain.time_zone or "UTC"), after)


def _schedule(retrain: Retrain, plan: TriggerPlan, *, now: datetime, fired: list[PendingTrigger]) -> None:
    state = plan.state.schedule or ScheduleState()
    plan.state.schedule = state
    if state.next_schedule_time is None:
        state.next_schedule_time = next_schedule(retrain, now)  # no start for times before it was seen
        plan.wake(state.next_schedule_time)
        return
    if now < state.next_schedule_time:
        plan.wake(state.next_schedule_time)
        return
    latest = state.next_schedule_time
    for _ in range(MAX_CRON_STEPS):
        following = next_schedule(retrain, latest)
        if following > now:
            break
        latest = following
    missed_by = (now - latest).total_seconds()
    deadline = _seconds(retrain.starting_deadline)
    zone = retrain.time_zone or "UTC"
    if missed_by <= deadline:
        fired.append(PendingTrigger(trigger="Schedule", detail=f"scheduled for {_at(latest)} ({zone})", time=now))
    else:
        plan.counts.append(("Schedule", "skipped"))
        plan.events.append(
            (
                "Warning",
                Reason.TRIGGER_SKIPPED,
                f"schedule: the start at {_at(latest)} ({zone}) was missed by {_span(missed_by)}, more than "
                f"startingDeadline {retrain.starting_deadline}: skipped (the operator was down?)",
            )
        )
    state.last_schedule_time = latest
    state.next_schedule_time = next_schedule(retrain, latest)
    plan.wake(state.next_schedule_time)


# --- waiting and starting ------------------------------------------------------------------


def _queue_and_start(
    retrain: Retrain, plan: TriggerPlan, fired: list[PendingTrigger], *, now: datetime, active: bool
) -> None:
    state = plan.state
    known = {p.trigger for p in state.pending}
    for trigger in fired:
        if trigger.trigger in known:
            plan.counts.append((trigger.trigger, "coalesced"))
            continue
        state.pending = [*state.pending, trigger][-MAX_PENDING_TRIGGERS:]
        known.add(trigger.trigger)
    cooldown_until = (
        state.last_automatic_start + timedelta(seconds=_seconds(retrain.cooldown))
        if state.last_automatic_start is not None
        else None
    )
    manual = [p for p in state.pending if p.trigger == "Manual"]
    automatic = [p for p in state.pending if p.trigger in AUTOMATIC]
    cooling = cooldown_until is not None and now < cooldown_until
    if not active and (manual or (automatic and not cooling)):
        first = (manual or automatic)[0]
        others = [p for p in state.pending if p is not first]
        detail = first.detail + "".join(f"; also {p.trigger}: {p.detail}" for p in others)
        plan.start = PendingTrigger(trigger=first.trigger, detail=detail[:512], time=first.time)
        plan.counts.append((first.trigger, "fired"))
        plan.counts += [(p.trigger, "coalesced") for p in others]
        state.pending = []
        plan.events.append(("Normal", Reason.TRIGGERED, f"{first.trigger}: {detail}"[:1024]))
        return
    for trigger in fired:
        if trigger not in state.pending:
            continue  # coalesced into one already waiting
        if active:
            why = "a run is active; one follow-up run starts after it"
        elif trigger.trigger in AUTOMATIC and cooling:
            assert cooldown_until is not None
            why = f"cooldown {retrain.cooldown} after the last automatic run: it starts at {_at(cooldown_until)}"
        else:  # pragma: no cover - every other case started above
            why = "waiting"
        plan.counts.append((trigger.trigger, "queued"))
        plan.events.append(("Normal", Reason.TRIGGER_SUPPRESSED, f"{trigger.trigger} ({trigger.detail}): {why}"[:1024]))
    if automatic and cooling and not active:
        plan.wake(cooldown_until)


def starting(state: TriggerStatus | None, trigger: RunTrigger, *, now: datetime) -> TriggerStatus | None:
    """The trigger state once a run starts: an automatic start opens the cooldown, and the
    listing observed now becomes the watermark (the caller records it with the run)."""
    if state is None:
        return None
    state = state.model_copy(deep=True)
    if trigger in AUTOMATIC:
        state.last_automatic_start = now
    return state
