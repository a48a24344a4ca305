"""The loop's state is what a checkpoint's meta.json and best:: tensors hold, under the names
earlier trainers wrote (so that their checkpoints resume)."""

from __future__ import annotations

import json

import pytest
import torch

from tuneloop_trainer.evaluation import EarlyStopper
from tuneloop_trainer.recipe.state import LoopState

pytestmark = pytest.mark.unit

#: meta.json as trainers before LoopState wrote it.
EARLIER_META = {
    "step": 6,
    "epoch": 1,
    "nextBatch": 4,
    "stopper": {
        "metric": "eval_loss",
        "mode": "min",
        "patience": 2,
        "minDelta": 0.0,
        "best": 1.5,
        "bestStep": 4,
        "badEvals": 1,
        "evals": 3,
    },
    "unfreezingStage": 2,
    "history": {"train": [{"step": 6, "epoch": 1.4, "loss": 1.7}], "eval": [{"step": 4, "eval_loss": 1.5}]},
    "bestStep": 4,
    "bestValidation": {"eval_loss": 1.5},
    "metrics": {"eval_loss": 1.6},
}


def fresh() -> LoopState:
    return LoopState(EarlyStopper("eval_loss", "min", patience=2))


def test_an_earlier_checkpoint_restores_and_saves_back_the_same_meta() -> None:
    state = fresh()
    best = torch.arange(3, dtype=torch.float32)
    state.restore(json.loads(json.dumps(EARLIER_META)), {"w": torch.zeros(3), "best::w": best})
    assert (state.step, state.epoch, state.next_batch, state.unfreezing_stage) == (6, 1, 4, 2)
    assert state.stopper.bad_evals == 1 and state.stopper.best_step == 4
    assert state.best_weights is not None and torch.equal(state.best_weights["w"], best)
    assert json.loads(json.dumps(state.meta())) == EARLIER_META
    assert list(state.best_tensors()) == ["best::w"]


def test_a_fresh_state_has_no_best_weights_and_starts_at_the_beginning() -> None:
    state = fresh()
    assert state.best_tensors() == {}
    meta = state.meta()
    assert (meta["step"], meta["epoch"], meta["nextBatch"], meta["bestStep"]) == (0, 0, 0, None)
    other = fresh()
    other.restore(meta, {})
    assert other.best_weights is None and other.meta() == meta
