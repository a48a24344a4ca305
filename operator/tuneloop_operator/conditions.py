"""Conditions in the ``metav1.Condition`` shape: set, flip, compare. Pure functions.

``lastTransitionTime`` changes only when a condition's status flips, not when its reason or
message changes: kubectl, Argo CD and Flux (kstatus) read it as "since when is this so".
The phase is derived from the conditions (``tuneloop.api.derive_phase``), never stored apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from tuneloop.api import Condition, ConditionType, derive_phase
from tuneloop.api.status import ConditionStatus, FineTuneJobStatus, Phase
from tuneloop.text import clip

#: Kubernetes caps condition messages at 32 KiB; keep them readable in `kubectl describe`.
MAX_MESSAGE = 1024


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    at: datetime | None = None,
) -> list[Condition]:
    """A new list with the condition of ``type_`` set; other conditions are kept in order."""
    if type_ not in ConditionType.ALL:
        raise ValueError(f"unknown condition type {type_!r}")
    message = clip(message, MAX_MESSAGE)
    out: list[Condition] = []
    found = False
    for cond in conditions:
        if cond.type != type_:
            out.append(cond)
            continue
        found = True
        flipped = cond.status != status
        out.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=(at or now()) if flipped else cond.last_transition_time,
                observed_generation=generation,
            )
        )
    if not found:
        out.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=at or now(),
                observed_generation=generation,
            )
        )
    return out


def with_phase(status: FineTuneJobStatus) -> FineTuneJobStatus:
    """The status with ``phase`` derived from its conditions."""
    phase: Phase = derive_phase(status.conditions)
    return status.model_copy(update={"phase": phase})


def status_patch(old: FineTuneJobStatus | Mapping[str, Any] | None, new: FineTuneJobStatus) -> dict[str, object] | None:
    """The merge patch for ``.status``, or None when nothing changed (patch only on change).

    ``old`` is best the status as stored (the raw mapping): what the new one does not have,
    unreadable leftovers included, is then removed."""
    new_wire = new.to_wire()
    if isinstance(old, FineTuneJobStatus):
        old_wire: dict[str, Any] = old.to_wire()
    else:
        old_wire = dict(old) if isinstance(old, Mapping) else {}
    if new_wire == old_wire:
        return None
    return merge_diff(old_wire, new_wire)


def merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: changed keys, nested
    objects diffed recursively (a merge patch *merges* a nested object: a key left out would be
    kept on the server), removed keys as ``null``, lists replaced whole."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if before == value:
            continue
        if isinstance(before, dict) and isinstance(value, dict):
            patch[key] = merge_diff(before, value)
        else:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None  # RFC 7386: null deletes
    return patch
