"""When the loop snapshots and when it waits for an upload: a kill loses at most one interval.

:class:`Cadence` is driven here by a simulated loop (steps of a fixed duration, uploads of a fixed
duration, one in flight at a time, the order of the recipe: poll the upload, snapshot when due,
hold at the bound), so the guarantee is checked over whole runs in microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tuneloop_trainer.recipe.cadence import Cadence

pytestmark = pytest.mark.unit


@dataclass
class Run:
    snapshots: list[int] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    """Seconds the loop waited at the bound, one per hold."""
    steps_at_risk: int = 0
    """The most finished steps a kill could have lost (steps since the durable checkpoint)."""
    seconds_at_risk: float = 0.0
    """The most training time a kill could have lost, measured at each step's end."""


def simulate(
    cadence: Cadence, *, steps: int, step_s: float, upload_s: float, start: int = 0, first_upload_s: float | None = None
) -> Run:
    """The recipe's order at each step's end: report a finished upload, snapshot if due, hold."""
    run = Run()
    now = 0.0
    cadence.durable(start, now)
    pending: tuple[int, float, float] | None = None  # step, snapshot time, upload done at
    flight: float | None = None  # the last upload's duration, as CheckpointManager times it

    def complete() -> None:
        nonlocal pending, flight
        assert pending is not None
        step, taken, done = pending
        flight = done - taken
        cadence.durable(step, taken)
        pending = None

    for step in range(start + 1, start + steps + 1):
        now += step_s
        run.steps_at_risk = max(run.steps_at_risk, step - cadence.durable_step)
        run.seconds_at_risk = max(run.seconds_at_risk, now - cadence.durable_time)
        if pending is not None and pending[2] <= now:
            complete()
        for _ in range(2):  # a hold that waited may make this step a snapshot point: look again
            if pending is None and cadence.due(step, now, step_seconds=step_s, upload_seconds=flight):
                duration = first_upload_s if first_upload_s is not None and not run.snapshots else upload_s
                pending = (step, now, now + duration)
                run.snapshots.append(step)
            if pending is None or cadence.hold(step, now, step_seconds=step_s) is None:
                break
            run.waits.append(max(0.0, pending[2] - now))
            now = max(now, pending[2])
            complete()
        # The next step never starts past one interval from what is durable.
        if cadence.every_steps:
            assert step + 1 - cadence.durable_step <= cadence.every_steps, (step, cadence)
    return run


@pytest.mark.parametrize(("step_s", "upload_s"), [(1.0, 0.3), (0.05, 0.04), (0.05, 0.9)])
def test_uploads_within_a_step_or_a_second_keep_snapshots_on_the_multiples(step_s: float, upload_s: float) -> None:
    run = simulate(Cadence(every_steps=4, every_seconds=None), steps=20, step_s=step_s, upload_s=upload_s)
    assert run.snapshots == [4, 8, 12, 16, 20]
    assert run.steps_at_risk == 4
    # The price of the bound: the loop waits out each such upload (under a step, or a second).
    assert run.waits == pytest.approx([upload_s] * 5)


def test_a_resumed_run_keeps_the_multiples() -> None:
    """Resumed from a SIGTERM's checkpoint at step 6: the next ones at 8, 12 as before."""
    run = simulate(Cadence(every_steps=4, every_seconds=None), steps=10, step_s=1.0, upload_s=0.1, start=6)
    assert run.snapshots == [8, 12, 16]


@pytest.mark.parametrize(("upload_s", "lead"), [(1.5, 1), (2.0, 2)])
def test_slow_uploads_move_snapshots_early_so_the_loop_rarely_waits(upload_s: float, lead: int) -> None:
    every = 4
    run = simulate(Cadence(every_steps=every, every_seconds=None), steps=40, step_s=1.0, upload_s=upload_s)
    assert Cadence(every_steps=every, every_seconds=None).lead_steps(upload_s, 1.0) == lead
    assert run.snapshots[0] == every  # nothing timed yet: on the multiple, and the loop waits it out
    assert run.waits[0] == pytest.approx(upload_s)
    # Without the bound, a kill with an upload in flight could lose up to every + upload steps.
    assert run.steps_at_risk == every
    # Early by the upload's duration: one snapshot per every - lead steps, the loop waits less
    # than a step at each bound.
    assert {b - a for a, b in zip(run.snapshots[1:], run.snapshots[2:], strict=False)} == {every - lead}
    assert all(w < 1.0 for w in run.waits[1:]), run.waits


@pytest.mark.parametrize("upload_s", [2.5, 3.0, 30.0])
def test_uploads_longer_than_half_the_interval_cost_waits_not_the_bound(upload_s: float) -> None:
    """One upload at a time: snapshots at least an upload apart, each durable within an interval
    of the last, is impossible once an upload takes more than half the interval. The loop waits."""
    every = 4
    run = simulate(Cadence(every_steps=every, every_seconds=None), steps=60, step_s=1.0, upload_s=upload_s)
    assert run.steps_at_risk == every
    assert min(b - a for a, b in zip(run.snapshots, run.snapshots[1:], strict=False)) >= 1
    waited = sum(run.waits)
    # Each upload is waited out but for the steps run while it uploads (never more than every - 1).
    assert waited >= len(run.snapshots[1:]) * max(0.0, upload_s - (every - 1)) - 1e-9
    assert waited <= len(run.snapshots) * upload_s


def test_the_lead_is_capped_and_ignores_unknown_or_short_uploads() -> None:
    cadence = Cadence(every_steps=10, every_seconds=None)
    assert cadence.lead_steps(None, 1.0) == 0
    assert cadence.lead_steps(0.99, 0.01) == 0  # under a second: waited out instead
    assert cadence.lead_steps(5.0, 0.0) == 0  # no step timed yet
    assert cadence.lead_steps(5.0, 2.0) == 2
    assert cadence.lead_steps(500.0, 2.0) == 9


def test_the_hold_names_what_it_bounds() -> None:
    cadence = Cadence(every_steps=4, every_seconds=900.0, durable_step=8, durable_time=100.0)
    assert cadence.hold(11, 200.0, step_seconds=1.0) is None
    assert cadence.hold(12, 200.0, step_seconds=1.0) == "bounds the work a kill can lose to everySteps: 4 steps"
    assert cadence.hold(11, 999.5, step_seconds=1.0) == "bounds the training a kill can lose to everyMinutes: 15 min"


def test_every_minutes_snapshots_before_the_time_is_up() -> None:
    """A minute's interval with 1 s steps: a kill never loses more than a minute of training."""
    run = simulate(Cadence(every_steps=None, every_seconds=60.0), steps=300, step_s=1.0, upload_s=0.5)
    assert run.snapshots[:2] == [59, 118]  # the last step end before the minute is up
    assert run.seconds_at_risk <= 60.0
    assert all(w < 1.0 for w in run.waits), run.waits


def test_every_minutes_with_slow_uploads_snapshots_early_by_the_upload() -> None:
    run = simulate(Cadence(every_steps=None, every_seconds=60.0), steps=300, step_s=1.0, upload_s=10.0)
    assert run.seconds_at_risk <= 60.0
    # The first upload is not timed beforehand: the loop waits for most of it at the minute.
    assert run.snapshots[0] == 59
    assert run.waits == [pytest.approx(9.0)]
    # Then each snapshot is taken 10 s early: no more waits.
    gaps = {b - a for a, b in zip(run.snapshots[1:], run.snapshots[2:], strict=False)}
    assert gaps == {49}, run.snapshots
