"""The FineTuneJob spec: what a user declares.

Field docstrings are the API documentation: they become the CRD's descriptions
(``kubectl explain finetunejob.spec.method``) and ``docs/api.md``. One module per part of the
spec: :mod:`~tuneloop.api.spec.data` (model and dataset), :mod:`~tuneloop.api.spec.method`,
:mod:`~tuneloop.api.spec.training` (hyperparameters, privacy, output, storage, resources),
:mod:`~tuneloop.api.spec.evaluation` (metrics, evaluation, promotion),
:mod:`~tuneloop.api.spec.retrain`, and :mod:`~tuneloop.api.spec.job` (``FineTuneJobSpec``). Rules
that involve more than one field are the table in :mod:`~tuneloop.api.spec.rules`, each reported
at the path of the field to change; the same rules are CEL ``x-kubernetes-validations`` in the
CRD (see :mod:`tuneloop.cel`), so the API server refuses what the models refuse.
"""

from tuneloop.api.spec.data import Augmentation, DataCleaning, ModelSource
from tuneloop.api.spec.evaluation import (
    DEFAULT_METRICS,
    GENERATION_METRICS,
    METRIC_OUTPUTS,
    TASK_METRICS,
    Gate,
    Promotion,
    metric_direction,
)
from tuneloop.api.spec.job import FineTuneJobSpec
from tuneloop.api.spec.method import BottleneckConfig, LoraConfig, LycorisConfig, Method, Unfreezing, VeraConfig
from tuneloop.api.spec.retrain import Retrain
from tuneloop.api.spec.training import Hyperparameters, Resources, Storage

__all__ = [
    "DEFAULT_METRICS",
    "GENERATION_METRICS",
    "METRIC_OUTPUTS",
    "TASK_METRICS",
    "Augmentation",
    "BottleneckConfig",
    "DataCleaning",
    "FineTuneJobSpec",
    "Gate",
    "Hyperparameters",
    "LoraConfig",
    "LycorisConfig",
    "Method",
    "ModelSource",
    "Promotion",
    "Resources",
    "Retrain",
    "Storage",
    "Unfreezing",
    "VeraConfig",
    "metric_direction",
]
