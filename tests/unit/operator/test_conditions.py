"""Condition bookkeeping as kubectl and kstatus expect it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tuneloop.api import ConditionType, Reason
from tuneloop.api.status import FineTuneJobStatus
from tuneloop_operator.conditions import MAX_MESSAGE, set_condition, status_patch, with_phase

from .planner_helpers import merge_patch

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)


def test_transition_time_changes_only_when_status_flips() -> None:
    conds = set_condition([], ConditionType.RUNNING, "True", Reason.POD_CREATED, at=T0, generation=1)
    conds = set_condition(conds, ConditionType.RUNNING, "True", Reason.TRAINING, "step 10", at=T1, generation=1)
    (running,) = conds
    assert running.reason == Reason.TRAINING and running.message == "step 10"
    assert running.last_transition_time == T0  # same status: time kept
    conds = set_condition(conds, ConditionType.RUNNING, "False", Reason.SUCCEEDED, at=T1, generation=2)
    assert conds[0].last_transition_time == T1 and conds[0].observed_generation == 2


def test_other_conditions_are_kept_in_order() -> None:
    conds = set_condition([], ConditionType.DATA_VALID, "Unknown", Reason.CREATED, at=T0)
    conds = set_condition(conds, ConditionType.RUNNING, "True", Reason.POD_CREATED, at=T0)
    conds = set_condition(conds, ConditionType.DATA_VALID, "True", Reason.DATA_VALIDATED, at=T1)
    assert [c.type for c in conds] == [ConditionType.DATA_VALID, ConditionType.RUNNING]


def test_unknown_type_and_long_messages() -> None:
    with pytest.raises(ValueError, match="unknown condition type"):
        set_condition([], "Bogus", "True", "X")
    (cond,) = set_condition([], ConditionType.FAILED, "True", Reason.INVALID_SPEC, "x" * 5000)
    assert len(cond.message) == MAX_MESSAGE


def test_phase_is_derived_and_status_patched_only_on_change() -> None:
    conds = set_condition([], ConditionType.RUNNING, "True", Reason.EVALUATING, at=T0)
    status = with_phase(FineTuneJobStatus(conditions=conds, observed_generation=1))
    assert status.phase == "Evaluating"
    assert status_patch(status, status) is None
    patch = status_patch(status, status.model_copy(update={"observed_generation": None}))
    assert patch == {"observedGeneration": None}  # only what changed; null deletes
    first = status_patch(None, status)
    assert first is not None and first["observedGeneration"] == 1


def test_the_status_patch_removes_nested_fields_that_are_gone() -> None:
    """A merge patch merges nested objects: a field cleared inside currentRun (retryAfter after a
    retry, newRows of a changed listing) must be sent as null, or the server keeps it."""
    from datetime import UTC, datetime

    from tuneloop.api.status import CurrentRun, FineTuneJobStatus

    at = datetime(2026, 3, 1, tzinfo=UTC)
    old = FineTuneJobStatus(current_run=CurrentRun(number=1, trigger="Created", retry_after=at, failures=1))
    new = FineTuneJobStatus(current_run=CurrentRun(number=1, trigger="Created", failures=1))
    patch = status_patch(old, new)
    assert patch == {"currentRun": {"retryAfter": None}}
    assert merge_patch(old.to_wire(), patch) == new.to_wire()
