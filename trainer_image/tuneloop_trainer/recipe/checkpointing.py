"""Saving and resuming: the recipe's side of :mod:`tuneloop_trainer.checkpoints`.

A checkpoint is the training objects' own state (weights, optimizer, scheduler, fp16 loss
scaling, RNGs) plus the loop's :class:`~tuneloop_trainer.recipe.state.LoopState`. Saving stalls
the loop only for the local snapshot; the upload runs in the background and is reported once it
is complete. Resuming is a step of ``setup()`` of its own, once the model, optimizer and scheduler
exist.

A kill loses what was trained since the newest *durable* checkpoint (its upload finished), not
since the newest snapshot: the policy of :mod:`~tuneloop_trainer.recipe.cadence` keeps that to
one interval (``everySteps`` steps, about ``everyMinutes`` of training) while the upload stays in
the background. The loop is held at the bound while an upload is still in flight, and each
snapshot is taken early by the upload's expected duration, so that the hold is rarely needed.
"""

from __future__ import annotations

import logging
import time

import torch

from tuneloop.api.methods import traits
from tuneloop.contract import Layout, spec_hashes
from tuneloop_trainer.checkpoints import CheckpointManager, CheckpointState, capture_rng, restore_rng
from tuneloop_trainer.recipe.base import RecipeBase
from tuneloop_trainer.recipe.cadence import NOTICEABLE_SECONDS
from tuneloop_trainer.recipe.state import BEST_PREFIX

log = logging.getLogger(__name__)


class CheckpointSteps(RecipeBase):
    """Setting up the checkpoint manager, saving, resuming, and tidying up after training."""

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
        """Whether to snapshot now: on a stop request, or when :class:`.Cadence` says so. An upload
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
        one interval of training at risk (see :class:`.Cadence`); say so if the wait is noticeable.
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
