"""The training loop's state: one object, exactly what a checkpoint saves and a resume restores.

A checkpoint holds two kinds of state. The training objects keep their own (model weights, the
optimizer, the scheduler, fp16 loss scaling, the RNGs: ``checkpoints.CheckpointState.tensors``
and ``.objects``). Everything else the loop knows — where it is, how early stopping stands,
which unfreezing stage it reached, the curves so far and the best weights — is
:class:`LoopState`: its :meth:`~LoopState.meta` is the checkpoint's ``meta.json`` and its
:meth:`~LoopState.best_tensors` travel beside the weights as ``best::<name>``. The names on disk
are those of earlier trainers, so their checkpoints resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import torch

from tuneloop_trainer.evaluation import EarlyStopper
from tuneloop_trainer.report import TrainingHistory

#: Prefix of the best weights among a checkpoint's tensors.
BEST_PREFIX: Final = "best::"


@dataclass
class LoopState:
    """Where the loop is and what it has learnt so far."""

    stopper: EarlyStopper
    """Early stopping: the best selection value, its step, evaluations without improvement."""
    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """The epoch the loop is in (at a checkpoint: the epoch it continues with)."""
    next_batch: int = 0
    """The first batch of ``epoch`` (this process's share) not trained on yet."""
    unfreezing_stage: int | None = None
    """Gradual unfreezing's stage (``None``: no gradual unfreezing)."""
    history: TrainingHistory = field(default_factory=TrainingHistory)
    """Training and validation curves (the report's plots)."""
    best_step: int | None = None
    """Step of the best weights (``None``: none selected yet)."""
    best_validation: dict[str, float] = field(default_factory=dict)
    """Validation metrics of the best weights."""
    last_validation: dict[str, float] = field(default_factory=dict)
    """Metrics of the latest validation (a checkpoint's ``metrics``)."""
    best_weights: dict[str, torch.Tensor] | None = None
    """The best weights so far, on the CPU: a resumed run must still end on the best state."""

    def meta(self) -> dict[str, Any]:
        """The checkpoint's ``meta.json``."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "nextBatch": self.next_batch,
            "stopper": self.stopper.state_dict(),
            "unfreezingStage": self.unfreezing_stage,
            "history": self.history.to_dict(),
            "bestStep": self.best_step,
            "bestValidation": self.best_validation,
            "metrics": self.last_validation,
        }

    def best_tensors(self) -> dict[str, torch.Tensor]:
        """The best weights under their checkpoint names (none before the first selection)."""
        return {f"{BEST_PREFIX}{n}": t for n, t in (self.best_weights or {}).items()}

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Take the state a checkpoint saved (``meta.json`` and its tensors, of which the
        ``best::`` ones are read here). The stopper refuses a state for another metric."""
        self.step = int(meta["step"])
        self.epoch, self.next_batch = int(meta["epoch"]), int(meta["nextBatch"])
        self.stopper.load_state_dict(meta["stopper"])
        stage = meta.get("unfreezingStage")
        self.unfreezing_stage = int(stage) if stage is not None else None
        self.history = TrainingHistory.from_dict(meta["history"])
        if meta.get("bestStep") is not None:
            self.best_step = int(meta["bestStep"])
        if meta.get("bestValidation"):
            self.best_validation = dict(meta["bestValidation"])
        if meta.get("metrics"):
            self.last_validation = dict(meta["metrics"])
        best = {n.removeprefix(BEST_PREFIX): t for n, t in tensors.items() if n.startswith(BEST_PREFIX)}
        self.best_weights = best or None
