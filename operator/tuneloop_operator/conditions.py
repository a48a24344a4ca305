"""Conditions in the ``metav1.Condition`` shape: set, flip, compare. Pure functions.

``lastTransitionTime`` changes only when a condition's status flips, not when its reason or
message changes: kubectl, Argo CD and Flux (kstatus) read it as "since when is this so".
The phase is derived from the conditions (``tuneloop.api.derive_phase``), never stored apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from tuneloop.api import Condition, ConditionType, derive_phase
from tuneloop.api.status import ConditionStatus, FineTuneJobStatus, Phase

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
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
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


def status_patch(old: FineTuneJobStatus | None, new: FineTuneJobStatus) -> dict[str, object] | None:
    """The merge patch for ``.status``, or None when nothing changed (patch only on change)."""
    new_wire = new.to_wire()
    old_wire = old.to_wire() if old is not None else {}
    if new_wire == old_wire:
        return None
    # Top-level keys that changed; nested objects are replaced whole, which merge patch allows.
    patch: dict[str, object] = {k: v for k, v in new_wire.items() if old_wire.get(k) != v}
    for key in old_wire:
        if key not in new_wire:
            patch[key] = None  # RFC 7386: null deletes
    return patch
