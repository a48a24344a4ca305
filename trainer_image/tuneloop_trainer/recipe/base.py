"""The recipe's attributes, declared in one place.

:class:`RecipeBase` sets what is known from the spec alone in ``__init__`` and declares, with
their types, the attributes that a setup step creates (:mod:`.setup`: the accelerator, the model,
the data, the features, the optimizer...). The recipe's parts (:mod:`.evaluate`,
:mod:`.promoted`, :mod:`.batches`, :mod:`.checkpointing`, :mod:`.setup`, :mod:`.outputs`) are
classes built on it, each on the parts it calls, and
:class:`~tuneloop_trainer.recipe.fine_tune.FineTuneRecipe` ties them together.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from tuneloop.api.spec import Hyperparameters, metric_direction
from tuneloop.contract import PromotedPointer
from tuneloop_trainer.baselines import BeforeTraining
from tuneloop_trainer.checkpoints import CheckpointManager
from tuneloop_trainer.data import PreparedData
from tuneloop_trainer.data.profile import DataDrift, DataProfile
from tuneloop_trainer.data.replay import EpochRows
from tuneloop_trainer.evaluation import EarlyStopper
from tuneloop_trainer.features import Feature
from tuneloop_trainer.models import LoadedModel, ResolvedModel
from tuneloop_trainer.optim import GradualUnfreezer
from tuneloop_trainer.privacy import DifferentialPrivacy
from tuneloop_trainer.recipe.cadence import Cadence
from tuneloop_trainer.recipe.context import RunContext
from tuneloop_trainer.recipe.state import LoopState
from tuneloop_trainer.sources import Sources


class RecipeBase:
    """Fine-tune one run of a FineTuneJob: the state every part of the recipe shares."""

    # --- created by the setup steps (tuneloop_trainer.recipe.setup) --------------------------
    accelerator: Accelerator
    device: torch.device
    resolved: ResolvedModel
    model_config: Any
    """The base model's config, read once (load_model reuses it)."""
    tokenizer: Any
    data: PreparedData
    loaded: LoadedModel
    train_features: list[Feature]
    """The user's training rows, then every epoch's replay draw (``dataset.replay``)."""
    validation_features: list[Feature]
    test_features: list[Feature]
    ood_features: list[Feature]
    forgetting_features: list[Feature]
    before_training: BeforeTraining
    packing: bool
    epoch_rows: EpochRows
    steps_per_epoch: int
    total_steps: int
    param_groups_summary: list[str]
    model: Any
    """The model as ``accelerator.prepare`` wrapped it (DDP in a distributed run)."""
    optimizer: Any
    scheduler: Any
    unfreezer: GradualUnfreezer | None
    class_weights: torch.Tensor | None

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.spec = ctx.job.spec
        self.hp: Hyperparameters = self.spec.hyperparameters
        """The effective hyperparameters: setup may lower ``maxSeqLength`` to what the model takes."""
        self.sinks = ctx.sinks
        self.sources = Sources(self.spec.storage, ctx.cache_dir or ctx.work_dir / "cache")
        es = self.spec.early_stopping
        self.selection_metric: str = es.metric if es else "eval_loss"
        """What validation selects the best weights (and stops early) on."""
        self.selection_mode = (es.mode if es and es.mode else None) or metric_direction(self.selection_metric)
        self.state = LoopState(
            EarlyStopper(
                metric=self.selection_metric,
                mode=self.selection_mode,
                patience=es.patience if es else 10**9,
                min_delta=es.min_delta if es else 0.0,
            )
        )
        self.stopped_early = False
        # Set by the SIGTERM handler, which is installed before setup(): a stop requested while
        # the data is validated or the model loads must not be forgotten.
        self.stop_requested = False
        self.base_forgetting_perplexity: float | None = None
        self.notes: list[str] = []
        self.promoted_pointer: PromotedPointer | None = None
        self.data_profile: DataProfile | None = None
        self.promoted_profile: DataProfile | None = None
        self.data_drift: DataDrift | None = None
        self.privacy: DifferentialPrivacy | None = None
        """DP-SGD (``spec.privacy``): Poisson batches, per-example clipping, noise, the ε spent."""
        # Checkpointing (tuneloop_trainer.recipe.checkpointing); the manager exists once setup made it.
        self.checkpoints: CheckpointManager | None = None
        self.cadence = Cadence.of(self.spec.output.checkpoint)
        """When to snapshot and when to hold the loop at the bound (the loop sets where it starts)."""
        self.snapshot_time = 0.0
        """When the snapshot of ``pending_checkpoint`` was taken (monotonic): its training is safe
        from then on once its upload is complete."""
        self.last_selection_value: float | None = None
        """The latest finite selection value: the metric recorded in the next checkpoint's manifest."""
        self.pending_checkpoint: tuple[int, str] | None = None
        """(step, URI) of the checkpoint uploading in the background, reported once it is complete."""
