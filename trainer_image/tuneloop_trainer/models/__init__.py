"""The model a run trains: found, checked against the task, loaded and wrapped with the
configured adaptation method; and models a run saved, loaded back for evaluation.

- :mod:`~tuneloop_trainer.models.families`: which model family fits which task (the model class)
- :mod:`~tuneloop_trainer.models.files`: where a model's files are; its config, tokenizer, weight files
- :mod:`~tuneloop_trainer.models.limits`: the longest input a model and method take
- :mod:`~tuneloop_trainer.models.precision`: mixed precision and the 4-bit base model
- :mod:`~tuneloop_trainer.models.loading`: the base model for the task, ready to train
- :mod:`~tuneloop_trainer.models.adaptation`: wrapping it with a parameter-efficient method (peft)
- :mod:`~tuneloop_trainer.models.trained`: a saved adapter or full model, loaded for evaluation

A model that cannot be used as it is (a classification head for another number of labels,
a truncated weights file, a config that does not parse) is a permanent
:class:`UnsupportedModelError` naming the file and what to do: retrying cannot help.
"""

from __future__ import annotations

from tuneloop_trainer.models.families import check_fits_task, model_family
from tuneloop_trainer.models.files import ResolvedModel, load_config, load_tokenizer, resolve_model
from tuneloop_trainer.models.limits import fit_max_seq_length, max_input_tokens
from tuneloop_trainer.models.loading import LoadedModel, load_model
from tuneloop_trainer.models.precision import mixed_precision
from tuneloop_trainer.models.trained import TrainedModel, load_trained_model

__all__ = [
    "LoadedModel",
    "ResolvedModel",
    "TrainedModel",
    "check_fits_task",
    "fit_max_seq_length",
    "load_config",
    "load_model",
    "load_tokenizer",
    "load_trained_model",
    "max_input_tokens",
    "mixed_precision",
    "model_family",
    "resolve_model",
]
