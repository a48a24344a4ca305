"""Saving and resuming: the recipe's side of :mod:`tuneloop_trainer.checkpoints`.

A checkpoint is the training objects' own state (weights, optimizer, scheduler, fp16 loss
scaling, RNGs) plus the loop's :class:`~tuneloop_trainer.recipe.state.LoopState`. Saving stalls
the loop only for the local snapshot; the upload runs in the background and is reported once it
is complete. Resuming is a step of ``setup()`` of its own, once the model, optimizer and scheduler
exist.

A kill loses what was trained since the newest *durable* checkpoint (its upload finished), not
since the newest snapshot: :class:`Cadence` keeps that to one interval (``everySteps`` steps,
about ``everyMinutes`` of training) while the upload stays in the background. It holds the loop
at the bound while an upload is still in flight, and takes each snapshot early by the upload's
expected duration, so that the hold is rarely needed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

import torch

from tuneloop.api.methods import traits
from tuneloop.contract import Layout, spec_hashes
from tuneloop_trainer.checkpoints import CheckpointManager, CheckpointState, capture_rng, restore_rng
from tuneloop_trainer.recipe.base import RecipeBase
from tuneloop_trainer.recipe.state import BEST_PREFIX

log = logging.getLogger(__name__)

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


class CheckpointSteps(RecipeBase):
    """Setting up the checkpoint manager, saving, resuming, and tidying up after training."""

    cadence: Cadence
    """When to snapshot and when to hold the loop (made by ``_setup_checkpoints``)."""
    snapshot_time: float = 0.0
    """When the snapshot of ``pending_checkpoint`` was taken (monotonic): its training is safe
    from that point once its upload is complete."""

    def _setup_checkpoints(self) -> None:
        storage = self.sources.storage(self.ctx.output_uri)
        self.checkpoints = CheckpointManager(
            storage,
            self.ctx.run_uri(Layout.checkpoints(self.ctx.run)),
            self.ctx.work_dir / "checkpoints",
            keep=self.spec.output.checkpoint.keep,
            best_metric_mode=self.selection_mode,
            identity=self.ctx.checkpoint_identity(),
            spec_hashes=spec_hashes(self.spec),
        )
        self.checkpoints.before_commit = self.ctx.writer_check  # the S3 writer lease (tuneloop.lease)
        self.last_checkpoint_time = time.monotonic()
        policy = self.spec.output.checkpoint
        self.cadence = Cadence(
            every_steps=policy.every_steps,
            every_seconds=60 * policy.every_minutes if policy.every_minutes else None,
            durable_time=self.last_checkpoint_time,
        )

    def _manager(self) -> CheckpointManager:
        if self.checkpoints is None:
            raise RuntimeError("the checkpoint manager is created by setup()")
        return self.checkpoints

    def _kept_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The weights that checkpoints and the best state keep: all of them for full fine-tuning
        (unfreezing changes which are trainable), only the trained ones for PEFT methods."""
        model = self.accelerator.unwrap_model(self.model)
        full = not traits(self.spec.method.type).peft
        return {n: p for n, p in model.named_parameters() if full or p.requires_grad}

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {n: p.detach() for n, p in self._kept_parameters().items()}
        # The best weights so far travel too: a resumed run must still end on the best state.
        tensors.update(self.state.best_tensors())
        return tensors

    def save_checkpoint(self, *, blocking: bool = False) -> None:
        """Snapshot locally (the only stall), upload in the background."""
        manager = self._manager()
        self._report_completed_checkpoint()  # save() waits for the previous upload first
        saved = CheckpointState(
            tensors=self._checkpoint_tensors(),
            objects={
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": capture_rng(),
                # fp16 loss scaling state (bf16 and fp32 have none)
                **({"scaler": self.accelerator.scaler.state_dict()} if self.accelerator.scaler is not None else {}),
            },
            meta=self.state.meta(),
        )
        step = self.state.step
        taken_at = time.monotonic()
        if self.accelerator.is_main_process:
            manager.save(step, saved, metric=self.last_selection_value, blocking=blocking)
            self.pending_checkpoint = (step, manager.step_uri(step))
            self.snapshot_time = taken_at
            if blocking:
                self._report_completed_checkpoint()
        else:
            # Only the main process uploads: the others count their snapshot as durable at once
            # (the main process holds them at the bound through the next collective anyway).
            self.cadence.durable(step, taken_at)
        self.last_checkpoint_time = time.monotonic()

    def _report_completed_checkpoint(self) -> None:
        if self.pending_checkpoint is None:
            return
        cm = self._manager()
        cm.wait()
        step, uri = self.pending_checkpoint
        self.pending_checkpoint = None
        self.cadence.durable(step, self.snapshot_time)
        self.sinks.checkpoint(step, uri, cm.last_save_seconds or 0.0, cm.last_upload_seconds, cm.last_bytes or 0)

    def _checkpoint_due(self, step_seconds: float) -> bool:
        """Whether to snapshot now: on a stop request, or when :class:`Cadence` says so. An upload
        that finished meanwhile is reported (and counted durable) first."""
        if self.stop_requested:
            return True
        if self.pending_checkpoint is not None:
            if not self._manager().upload_done():
                return False  # one upload at a time; the hold bounds the work at risk meanwhile
            self._report_completed_checkpoint()
        cm = self.checkpoints
        return self.cadence.due(
            self.state.step,
            time.monotonic(),
            step_seconds=step_seconds,
            upload_seconds=cm.last_flight_seconds if cm is not None else None,
        )

    def _checkpoint_and_hold(self, step_seconds: float) -> None:
        """At a step's end: snapshot if due, then hold the loop at the bound. A hold that waited
        made a newer checkpoint durable, which may make this step a snapshot point: look again."""
        for _ in range(2):
            if self._checkpoint_due(step_seconds):
                self.save_checkpoint(blocking=self.stop_requested)
            if not self._hold_at_the_bound(step_seconds):
                return

    def _hold_at_the_bound(self, step_seconds: float) -> bool:
        """Before the next step: wait for the upload in flight if the next step would put more than
        one interval of training at risk (see :class:`Cadence`); say so if the wait is noticeable.
        Whether it waited."""
        if self.pending_checkpoint is None:
            return False
        why = self.cadence.hold(self.state.step, time.monotonic(), step_seconds=step_seconds)
        if why is None:
            return False
        if not self._manager().upload_done(timeout=NOTICEABLE_SECONDS):
            self.sinks.message(
                f"   waiting for the checkpoint at step {self.pending_checkpoint[0]} to finish uploading ({why})"
            )
        self._report_completed_checkpoint()
        return True

    def _ensure_stop_checkpoint(self) -> None:
        """A stop was requested: make sure the step the loop stopped at is saved and complete."""
        pending = self.pending_checkpoint
        snapshotted = pending[0] if pending is not None else self.cadence.durable_step
        if snapshotted != self.state.step:
            self.save_checkpoint(blocking=True)
        # A stop that arrived while a save waited for the previous upload started it in the
        # background: finish it before saying it is saved.
        self._report_completed_checkpoint()

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint of this run, if there is one: its weights,
        the optimizer's, scheduler's, loss scaler's and RNGs' state, and the loop's state."""
        loaded = self._manager().load()
        if loaded is None:
            self._explain_foreign_checkpoints()
            return
        info, saved = loaded
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, tensor in saved.tensors.items():
                if name.startswith(BEST_PREFIX):
                    continue
                params[name].copy_(tensor.to(params[name].device))
        self.optimizer.load_state_dict(saved.objects["optimizer"])
        self.scheduler.load_state_dict(saved.objects["scheduler"])
        restore_rng(saved.objects["rng"])
        if self.accelerator.scaler is not None and "scaler" in saved.objects:
            self.accelerator.scaler.load_state_dict(saved.objects["scaler"])
        self.state.restore(saved.meta, saved.tensors)
        if self.unfreezer is not None:
            if self.state.unfreezing_stage is not None:
                self.unfreezer.apply_stage(self.state.unfreezing_stage)
            self.state.unfreezing_stage = self.unfreezer.stage
        self.sinks.message(f"   resumed from the checkpoint at step {info.step} ({info.uri})")

    def _explain_foreign_checkpoints(self) -> None:
        """Say why checkpoints found under this run's prefix are not resumed."""
        manager = self._manager()
        foreign = manager.foreign()
        if not foreign:
            return
        mine = self.ctx.checkpoint_identity()
        theirs = foreign[-1].manifest.get("identity")
        if not isinstance(theirs, dict):
            why = "they do not record which job and spec wrote them (an older trainer)"
        else:
            differ = [k for k in ("namespace", "name", "uid", "run", "specHash") if theirs.get(k) != mine.get(k)]
            names = {
                "specHash": "the spec (hyperparameters, data, model...)",
                "uid": "the job's uid (a re-created job)",
            }
            why = "they were written with another " + ", ".join(names.get(k, k) for k in differ)
        steps = ", ".join(str(info.step) for info in foreign[-5:])
        self.sinks.message(
            f"   not resuming the checkpoint(s) at step {steps} under {manager.checkpoints_uri}: {why}; "
            "training starts fresh (they are deleted after this run's first checkpoint)"
        )

    def _remove_incomplete_checkpoints(self) -> None:
        """Training is over: what killed attempts left half-uploaded can never be resumed."""
        from tuneloop.storage import StorageError  # noqa: PLC0415

        if self.ctx.writer_check is not None:  # what looks incomplete may be the new writer's upload
            self.ctx.writer_check()
        try:
            removed = self._manager().remove_incomplete()
        except (StorageError, OSError) as exc:
            # Leftovers cost storage, not correctness: say so and carry on.
            log.warning("removing incomplete checkpoints failed: %s", exc)
            return
        if removed:
            steps = ", ".join(str(s) for s in removed)
            self.sinks.message(f"   removed incomplete checkpoint(s) at step {steps} left by an interrupted attempt")
        try:
            aborted = self._manager().abort_incomplete_uploads()
        except StorageError as exc:  # e.g. no s3:ListBucketMultipartUploads: the bucket's lifecycle rule is left
            log.warning("aborting unfinished checkpoint uploads failed (the bucket's lifecycle rule will): %s", exc)
            return
        if aborted:
            self.sinks.message(f"   aborted {aborted} unfinished checkpoint upload(s) left by an interrupted attempt")
