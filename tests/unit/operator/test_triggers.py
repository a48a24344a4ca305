"""The retraining triggers' decisions (tuneloop_operator.triggers), with a clock passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tuneloop.api.spec import Retrain
from tuneloop.api.status import NewDataState, Reason, TriggerStatus
from tuneloop_operator.triggers import (
    DataObservation,
    DriftObservation,
    Observations,
    RowObservation,
    TriggerPlan,
    evaluate,
    jitter,
    next_schedule,
    starting,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def retrain(**fields: Any) -> Retrain:
    return Retrain.model_validate(fields)


def run(
    spec: Retrain,
    state: TriggerStatus | None,
    now: datetime,
    *,
    active: bool = False,
    observed: Observations | None = None,
    annotation: str | None = None,
    handled: str | None = None,
    has_runs: bool = True,
) -> TriggerPlan:
    return evaluate(
        spec,
        state,
        now=now,
        key="ml/bot",
        active=active,
        observed=observed or Observations(),
        retrain_annotation=annotation,
        handled_annotation=handled,
        has_runs=has_runs,
    )


def polled(
    spec: Retrain, state: TriggerStatus | None, now: datetime, fingerprint: str, rows: int | None = None, **kw: Any
) -> TriggerPlan:
    """Evaluate, answering whatever it asks as the handler would."""
    plan = run(spec, state, now, **kw)
    observed = kw.pop("observed", None) or Observations()
    for _ in range(3):
        if not plan.needs:
            return plan
        if "watermark" in plan.needs:
            observed = Observations(**{**observed.__dict__, "watermark_read": True})
        if "data" in plan.needs or "rows" in plan.needs:
            observed = Observations(
                **{**observed.__dict__, "data": DataObservation(fingerprint=fingerprint, objects=3)}
            )
        if "rows" in plan.needs:
            assert rows is not None, "the trigger asked for a count"
            observed = Observations(**{**observed.__dict__, "rows": RowObservation(rows=rows, objects=1)})
        plan = run(spec, state, now, observed=observed, **kw)
    raise AssertionError(f"still needs {plan.needs}")


def watched(**fields: Any) -> Retrain:
    return retrain(onNewData={"minNewSamples": 500, "pollInterval": "5m", "settlePeriod": "2m", **fields})


def with_watermark(fingerprint: str = "old", run_number: int = 1) -> TriggerStatus:
    return TriggerStatus(
        new_data=NewDataState(
            fingerprint=fingerprint, watermark=fingerprint, watermark_run=run_number, next_poll_time=T0
        )
    )


# --- new data -----------------------------------------------------------------------------------


def test_the_first_poll_is_spread_over_the_interval() -> None:
    plan = run(watched(), None, T0, has_runs=False)
    assert not plan.needs
    first = plan.state.new_data.next_poll_time  # type: ignore[union-attr]
    assert first is not None and T0 <= first < T0 + timedelta(minutes=5)
    assert jitter("ml/a", 300) != jitter("ml/b", 300)  # jobs poll at different moments
    assert plan.wake_at == first


def test_new_rows_above_the_minimum_start_one_run_after_the_listing_settles() -> None:
    spec = watched()
    state = with_watermark()
    plan = polled(spec, state, T0, "new")
    assert plan.start is None and "waiting until" in plan.state.new_data.message  # type: ignore[union-attr]
    assert plan.wake_at == T0 + timedelta(minutes=2)
    later = T0 + timedelta(minutes=2)
    plan = polled(spec, plan.state, later, "new", rows=1240)
    assert plan.start is not None and plan.start.trigger == "NewData"
    assert plan.start.detail == "1,240 new rows in 1 new or changed object(s) since run 1"
    assert ("NewData", "fired") in plan.counts
    assert [e[1] for e in plan.events] == [Reason.TRIGGERED]
    # The same listing is never counted or fired again.
    again = polled(spec, plan.state, later + timedelta(minutes=5), "new")
    assert again.start is None and not again.counts


def test_a_burst_of_uploads_is_one_count_after_it_settles() -> None:
    spec = watched()
    state = with_watermark()
    now = T0
    for i in range(10):  # an upload every 30 s: the listing keeps changing
        plan = polled(spec, state, now, f"burst-{i}")
        assert plan.start is None
        state = plan.state.model_copy(
            update={"new_data": plan.state.new_data.model_copy(update={"next_poll_time": now})}
        )  # type: ignore[union-attr]
        now += timedelta(seconds=30)
    plan = polled(spec, state, now + timedelta(minutes=2), "burst-9", rows=900)
    assert plan.start is not None and plan.start.trigger == "NewData"


def test_too_few_new_rows_are_said_once_and_start_nothing() -> None:
    spec = watched()
    plan = polled(spec, with_watermark(), T0, "new")
    plan = polled(spec, plan.state, T0 + timedelta(minutes=3), "new", rows=312)
    assert plan.start is None
    assert [e[1] for e in plan.events] == [Reason.TRIGGER_SKIPPED]
    assert "312 new rows" in plan.events[0][2] and "below minNewSamples 500" in plan.events[0][2]
    assert ("NewData", "skipped") in plan.counts
    quiet = polled(spec, plan.state, T0 + timedelta(minutes=9), "new")
    assert quiet.events == [] and quiet.start is None
    # More uploads: counted again against the same watermark (cumulative).
    more = polled(spec, quiet.state, T0 + timedelta(minutes=15), "newer")
    more = polled(spec, more.state, T0 + timedelta(minutes=18), "newer", rows=640)
    assert more.start is not None and more.start.trigger == "NewData"


def test_no_change_since_the_watermark_counts_nothing() -> None:
    plan = polled(watched(), with_watermark("same"), T0, "same")
    assert plan.start is None and "no change since run 1" in plan.state.new_data.message  # type: ignore[union-attr]


def test_a_lost_watermark_is_read_back_from_the_latest_runs_listing() -> None:
    spec = watched()
    plan = run(spec, TriggerStatus(new_data=NewDataState(next_poll_time=T0)), T0)
    assert "watermark" in plan.needs
    observed = Observations(watermark=("recorded", 7), watermark_read=True, data=DataObservation("recorded", 3))
    plan = run(spec, TriggerStatus(new_data=NewDataState(next_poll_time=T0)), T0, observed=observed)
    state = plan.state.new_data
    assert state is not None and (state.watermark, state.watermark_run) == ("recorded", 7)
    assert plan.start is None


def test_a_failed_listing_is_unhealthy_and_starts_nothing() -> None:
    plan = run(watched(), with_watermark(), T0, observed=Observations(data=DataObservation(error="access denied")))
    assert plan.start is None and plan.health == (False, "onNewData: cannot list the dataset: access denied")
    assert ("NewData", "error") in plan.counts


# --- drift ----------------------------------------------------------------------------------------


def drift_spec(**fields: Any) -> Retrain:
    prom = {"url": "http://prom:9090", "query": "score", "threshold": 0.2, "for": "10m", "pollInterval": "1m"}
    return retrain(onDrift={"prometheus": {**prom, **fields}})


def query(
    spec: Retrain, state: TriggerStatus | None, now: datetime, value: float | None, error: str | None = None
) -> TriggerPlan:
    """The query ran at ``now`` (as the handler runs it when the trigger asks)."""
    return run(spec, state, now, observed=Observations(drift=DriftObservation(value=value, error=error)))


def test_drift_past_the_threshold_for_the_whole_window_starts_one_run() -> None:
    spec = drift_spec()
    state = TriggerStatus()
    start = None
    for minute in range(0, 12):
        plan = query(spec, state, T0 + timedelta(minutes=minute), 0.31)
        state = plan.state.model_copy(deep=True)
        assert state.drift is not None
        state.drift.next_query_time = None  # every minute, as the poll interval asks
        if plan.start is not None:
            start = (minute, plan.start)
            break
    assert start is not None and start[0] == 10
    assert start[1].trigger == "Drift" and "drift 0.31 above 0.2 for 10m" in start[1].detail
    assert state.drift.pending_since is None  # not fired again at the next value


def test_flapping_drift_never_starts_a_run() -> None:
    spec = drift_spec()
    state = TriggerStatus()
    for minute in range(0, 30):
        plan = query(spec, state, T0 + timedelta(minutes=minute), 0.31 if minute % 4 else 0.1)
        assert plan.start is None
        state = plan.state.model_copy(deep=True)
        state.drift.next_query_time = None  # type: ignore[union-attr]


def test_the_pending_window_survives_a_restart_and_an_error_resets_it() -> None:
    spec = drift_spec()
    plan = query(spec, TriggerStatus(), T0, 0.5)
    state = plan.state
    assert state.drift is not None and state.drift.pending_since == T0
    # The operator restarts: the status still has pendingSince, so 10 minutes later it fires.
    state.drift.next_query_time = None
    assert query(spec, state, T0 + timedelta(minutes=10), 0.5).start is not None
    # An error in between proves nothing: the wait starts again.
    state.drift.next_query_time = None
    broken = query(spec, state, T0 + timedelta(minutes=5), None, "empty result: no series matched")
    assert broken.start is None and broken.state.drift.pending_since is None  # type: ignore[union-attr]
    assert broken.health == (False, "onDrift: query failed: empty result: no series matched")


def test_below_direction() -> None:
    spec = drift_spec(direction="below", threshold=0.9, **{"for": "1m"})
    plan = query(spec, TriggerStatus(), T0, 0.95)
    assert plan.state.drift.pending_since is None  # type: ignore[union-attr]
    plan = query(
        spec,
        plan.state.model_copy(update={"drift": plan.state.drift.model_copy(update={"next_query_time": None})}),
        T0,
        0.8,
    )  # type: ignore[union-attr]
    assert plan.state.drift.pending_since == T0  # type: ignore[union-attr]


# --- schedule -------------------------------------------------------------------------------------


def test_schedule_in_a_time_zone() -> None:
    spec = retrain(schedule="0 3 * * *", timeZone="Europe/Berlin")
    assert next_schedule(spec, datetime(2026, 1, 10, 12, tzinfo=UTC)) == datetime(2026, 1, 11, 2, tzinfo=UTC)
    assert next_schedule(spec, datetime(2026, 7, 10, 12, tzinfo=UTC)) == datetime(2026, 7, 11, 1, tzinfo=UTC)


def test_a_schedule_fires_at_its_time_and_not_for_times_before_it_was_seen() -> None:
    spec = retrain(schedule="0 3 * * *")
    plan = run(spec, None, T0)  # 12:00: 03:00 today is in the past and does not fire
    assert plan.start is None and plan.state.schedule.next_schedule_time == datetime(2026, 3, 2, 3, tzinfo=UTC)  # type: ignore[union-attr]
    fired = run(spec, plan.state, datetime(2026, 3, 2, 3, 0, 20, tzinfo=UTC))
    assert fired.start is not None and fired.start.trigger == "Schedule"
    assert fired.state.schedule.next_schedule_time == datetime(2026, 3, 3, 3, tzinfo=UTC)  # type: ignore[union-attr]


def test_missed_schedules_run_at_most_the_latest_within_the_deadline() -> None:
    spec = retrain(schedule="0 * * * *", startingDeadline="30m")
    state = run(spec, None, T0).state  # next: 13:00
    back = datetime(2026, 3, 1, 18, 10, tzinfo=UTC)  # down from 12:30 to 18:10: five hours missed
    plan = run(spec, state, back)
    assert plan.start is not None and "scheduled for 2026-03-01T18:00:00Z" in plan.start.detail
    late = run(spec, state, datetime(2026, 3, 1, 18, 45, tzinfo=UTC))
    assert late.start is None and [e[1] for e in late.events] == [Reason.TRIGGER_SKIPPED]
    assert "missed by 45m" in late.events[0][2]


# --- waiting, cooldown, coalescing, manual ---------------------------------------------------------


def test_automatic_triggers_wait_for_the_cooldown_and_then_start_one_run_together() -> None:
    spec = retrain(schedule="0 * * * *", cooldown="6h", onDrift=drift_spec().on_drift.model_dump(by_alias=True))  # type: ignore[union-attr]
    state = TriggerStatus(last_automatic_start=T0 - timedelta(hours=1))
    state = run(spec, state, T0).state
    state.drift = None
    plan = run(spec, state, T0 + timedelta(hours=1))  # the schedule fires, but the cooldown holds
    plan = run(spec, state, T0 + timedelta(hours=1), observed=Observations(drift=DriftObservation(value=0.0)))
    assert plan.start is None and [p.trigger for p in plan.state.pending] == ["Schedule"]
    (event,) = [e for e in plan.events if e[1] == Reason.TRIGGER_SUPPRESSED]
    assert "cooldown 6h" in event[2] and "starts at 2026-03-01T17:00:00Z" in event[2]
    assert plan.wake_at is not None and plan.wake_at <= T0 + timedelta(hours=5)
    plan = run(spec, plan.state, T0 + timedelta(hours=5), observed=Observations(drift=DriftObservation(value=0.0)))
    assert plan.start is not None and plan.start.trigger == "Schedule" and plan.state.pending == []


def test_triggers_during_a_run_are_coalesced_into_one_follow_up() -> None:
    spec = retrain(schedule="*/10 * * * *")
    state = run(spec, None, T0).state
    pending = run(spec, state, T0 + timedelta(minutes=10), active=True)
    assert pending.start is None and [p.trigger for p in pending.state.pending] == ["Schedule"]
    manual = run(spec, pending.state, T0 + timedelta(minutes=11), active=True, annotation="please", handled="before")
    assert [p.trigger for p in manual.state.pending] == ["Schedule", "Manual"] and manual.manual == "please"
    again = run(spec, manual.state, T0 + timedelta(minutes=20), active=True)  # the schedule fires again
    assert [p.trigger for p in again.state.pending] == ["Schedule", "Manual"]
    assert ("Schedule", "coalesced") in again.counts
    done = run(spec, again.state, T0 + timedelta(minutes=21), active=False)
    assert done.start is not None and done.start.trigger == "Manual" and "also Schedule" in done.start.detail
    assert done.state.pending == []


def test_a_manual_request_does_not_wait_for_the_cooldown() -> None:
    spec = retrain(cooldown="6h")
    state = TriggerStatus(last_automatic_start=T0)
    plan = run(spec, state, T0 + timedelta(minutes=1), annotation="2026-03-01", handled="2026-02-01")
    assert plan.start is not None and plan.start.trigger == "Manual"
    assert plan.start.detail == "annotation tuneloop.dev/retrain=2026-03-01"
    assert run(spec, plan.state, T0 + timedelta(minutes=2), annotation="2026-03-01", handled="2026-03-01").start is None


def test_a_job_created_with_the_annotation_does_not_run_twice() -> None:
    plan = run(retrain(), None, T0, annotation="x", handled=None, has_runs=False)
    assert plan.start is None and plan.manual == "x"


def test_an_automatic_start_opens_the_cooldown() -> None:
    state = starting(TriggerStatus(), "Drift", now=T0)
    assert state is not None and state.last_automatic_start == T0
    manual = starting(TriggerStatus(), "Manual", now=T0)
    assert manual is not None and manual.last_automatic_start is None


# --- quiet polls: the status is not rewritten for every poll ---------------------------------------


def test_a_poll_that_changes_nothing_is_not_written_until_the_refresh() -> None:
    spec = watched()
    state = with_watermark("same")
    first = polled(spec, state, T0, "same")
    written = first.state.new_data
    assert written is not None and written.last_poll_time == T0
    schedule = first.schedule
    assert schedule["data"] > T0 + timedelta(minutes=5) - timedelta(seconds=1)
    later = T0 + timedelta(minutes=5, seconds=30)
    second = run(
        spec,
        first.state,
        later,
        observed=Observations(schedule=schedule, data=DataObservation(fingerprint="same", objects=3)),
    )
    assert second.state.new_data == written, "nothing changed but the poll times: the status stays as it is"
    assert second.schedule["data"] > later, "the operator remembers the real schedule"
    # Between polls, the remembered schedule decides (the status' next time is in the past).
    between = run(spec, second.state, later + timedelta(minutes=1), observed=Observations(schedule=second.schedule))
    assert not between.needs
    # After STATUS_REFRESH_SECONDS the times are written again.
    much_later = T0 + timedelta(minutes=11)
    third = run(
        spec,
        second.state,
        much_later,
        observed=Observations(schedule=second.schedule, data=DataObservation(fingerprint="same", objects=3)),
    )
    assert third.state.new_data is not None and third.state.new_data.last_poll_time == much_later


def test_a_drift_value_on_the_same_side_is_not_written_until_the_refresh() -> None:
    spec = drift_spec()
    first = query(spec, TriggerStatus(), T0, 0.11)
    again = run(spec, first.state, T0 + timedelta(minutes=1), observed=Observations(drift=DriftObservation(value=0.12)))
    assert again.state.drift == first.state.drift
    crossed = run(
        spec, first.state, T0 + timedelta(minutes=2), observed=Observations(drift=DriftObservation(value=0.9))
    )
    assert crossed.state.drift is not None and crossed.state.drift.pending_since == T0 + timedelta(minutes=2)
