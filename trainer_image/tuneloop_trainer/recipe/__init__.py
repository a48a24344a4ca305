"""The fine-tuning recipe (:class:`FineTuneRecipe`) and its parts.

Read :mod:`.fine_tune` first: ``setup()``, ``train()`` and ``finish()`` top to bottom. The
steps it calls live in the modules next to it, each building on :class:`.base.RecipeBase`
(the attributes they share):

* :mod:`.context` — what a run is given (:class:`RunContext`) and ends with (:class:`RunResult`);
* :mod:`.state` — the loop's state, exactly what a checkpoint saves and restores;
* :mod:`.setup` — data, tokenizer, model, features, optimizer;
* :mod:`.batches` — training batches and the loss;
* :mod:`.cadence` — when to snapshot and when to wait for an upload (at most one interval lost);
* :mod:`.checkpointing` — saving and resuming;
* :mod:`.evaluate` — evaluation, forgetting, fairness;
* :mod:`.promoted` — the promoted model, evaluated on the same splits;
* :mod:`.outputs` — the model, its card and the report.
"""

from tuneloop_trainer.recipe.context import RunContext, RunResult
from tuneloop_trainer.recipe.fine_tune import FineTuneRecipe, Interrupted

__all__ = ["FineTuneRecipe", "Interrupted", "RunContext", "RunResult"]
