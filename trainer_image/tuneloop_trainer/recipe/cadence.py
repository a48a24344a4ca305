"""When the training loop snapshots a checkpoint and when it must wait for the upload in flight:
:class:`Cadence`, the policy behind ``spec.output.checkpoint.everySteps`` / ``everyMinutes``.

A kill loses what was trained since the newest *durable* checkpoint (its upload finished), not
since the newest snapshot. The policy keeps that to one interval while uploads stay in the
background; :mod:`tuneloop_trainer.recipe.checkpointing` carries it out. Pure: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tuneloop.api.spec.training import CheckpointPolicy

NOTICEABLE_SECONDS: Final = 1.0
"""An upload shorter than this does not move a snapshot earlier (the hold then waits it out, under a
second), and a hold shorter than this is not reported."""


@dataclass
class Cadence:
    """When to snapshot, and when the loop must wait for the upload in flight, so that a kill never
    loses more than one interval of training.

    ``durable_step`` (D) is the step of the newest checkpoint whose upload finished (at the start,
    the resumed step or 0), ``durable_time`` the monotonic time its snapshot was taken (at the
    start, when training started). The guarantee: the loop never starts a step past
    ``D + every_steps`` (nor one expected to end more than ``every_seconds`` after ``durable_time``)
    while an upload is in flight; it waits for the upload first (:meth:`hold`). So that it rarely
    waits, a snapshot is taken early by the upload's expected duration (:meth:`lead_steps`); with
    uploads that finish within a step (or a second), snapshots stay on the multiples of
    ``every_steps``.
    """

    every_steps: int | None
    every_seconds: float | None
    durable_step: int = 0
    durable_time: float = 0.0

    def lead_steps(self, upload_seconds: float | None, step_seconds: float) -> int:
        """How many steps early to snapshot: the last upload's duration in (recent mean) steps,
        never more than ``every_steps - 1`` (a snapshot is never taken before ``D + 1``)."""
        if not self.every_steps or not upload_seconds or upload_seconds < NOTICEABLE_SECONDS or step_seconds <= 0:
            return 0
        return min(self.every_steps - 1, int(upload_seconds // step_seconds))

    def due(self, step: int, now: float, *, step_seconds: float, upload_seconds: float | None) -> bool:
        """Whether to snapshot once ``step`` is done, with no upload in flight."""
        if self.every_steps:
            lead = self.lead_steps(upload_seconds, step_seconds)
            if lead:
                target = self.durable_step + self.every_steps - lead
            else:  # on the multiples (4, 8...), also after a resume from a SIGTERM's step
                target = (self.durable_step // self.every_steps + 1) * self.every_steps
            if step >= target:
                return True
        if self.every_seconds:
            lead_s = upload_seconds if upload_seconds and upload_seconds >= NOTICEABLE_SECONDS else 0.0
            # Decided at step ends: snapshot before the step that would leave too little time to upload.
            return now + step_seconds - self.durable_time >= self.every_seconds - lead_s
        return False

    def hold(self, step: int, now: float, *, step_seconds: float) -> str | None:
        """Why the loop must wait for the upload in flight before it starts the step after ``step``
        (what it bounds), or ``None`` if it may go on."""
        if self.every_steps and step >= self.durable_step + self.every_steps:
            return f"bounds the work a kill can lose to everySteps: {self.every_steps} steps"
        if self.every_seconds and now + step_seconds - self.durable_time > self.every_seconds:
            return f"bounds the training a kill can lose to everyMinutes: {self.every_seconds / 60:g} min"
        return None

    def durable(self, step: int, taken_at: float) -> None:
        """The checkpoint of ``step``, snapshotted at ``taken_at``, is complete in storage."""
        self.durable_step, self.durable_time = step, taken_at

    @classmethod
    def of(cls, policy: CheckpointPolicy) -> Cadence:
        """The cadence ``spec.output.checkpoint`` asks for; the loop sets its start with :meth:`durable`."""
        return cls(
            every_steps=policy.every_steps,
            every_seconds=60 * policy.every_minutes if policy.every_minutes else None,
        )
