"""The FineTuneJob API (``tuneloop.dev/v1alpha1``): the one source of truth.

The CRD in ``crds/`` is generated from these models, the operator validates with them,
the trainer reads its configuration through them, and ``tuneloop validate`` checks
manifest files with them.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import ConfigDict, Field

from tuneloop.api.methods import DEFAULT_LEARNING_RATES
from tuneloop.api.spec import (
    DEFAULT_METRICS,
    METRIC_OUTPUTS,
    TASK_METRICS,
    FineTuneJobSpec,
    metric_direction,
)
from tuneloop.api.status import (
    Condition,
    ConditionType,
    FineTuneJobStatus,
    Phase,
    Reason,
    derive_phase,
    find_condition,
)
from tuneloop.api.types import ApiModel, parse_duration

GROUP: Final = "tuneloop.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAMES: Final = ("ftj",)
CATEGORIES: Final = ("tuneloop",)
#: Job names become label values and parts of pod and Service names, which are limited
#: to 63 characters; the operator appends short suffixes within that limit.
MAX_NAME_LENGTH: Final = 63


class ObjectMeta(ApiModel):
    """The part of Kubernetes object metadata a manifest author writes. Other metadata
    (uid, resourceVersion, managedFields…) is accepted and left alone."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    """Name of the job: lowercase letters, digits and '-', at most 63 characters."""
    namespace: Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")] | None = (
        None
    )
    """Namespace of the job."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations. Requests to the operator, each value acted on once: ``tuneloop.dev/retrain``
    (a new value starts a run), ``tuneloop.dev/approve=<run>`` and ``tuneloop.dev/reject=<run>``
    (decide a run awaiting approval)."""


class FineTuneJob(ApiModel):
    """A fine-tuning job that retrains, evaluates and promotes continuously."""

    api_version: Literal["tuneloop.dev/v1alpha1"] = Field(alias="apiVersion")
    """``tuneloop.dev/v1alpha1``."""
    kind: Literal["FineTuneJob"]
    """``FineTuneJob``."""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: FineTuneJobSpec
    """What to fine-tune and how."""
    status: FineTuneJobStatus | None = None
    """Observed state, written by the operator."""

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> FineTuneJob:
        """Parse and validate a manifest (a dict as loaded from YAML or the API)."""
        return cls.model_validate(manifest)


__all__ = [
    "API_VERSION",
    "CATEGORIES",
    "DEFAULT_LEARNING_RATES",
    "DEFAULT_METRICS",
    "GROUP",
    "KIND",
    "MAX_NAME_LENGTH",
    "METRIC_OUTPUTS",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "TASK_METRICS",
    "VERSION",
    "ApiModel",
    "Condition",
    "ConditionType",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ObjectMeta",
    "Phase",
    "Reason",
    "derive_phase",
    "find_condition",
    "metric_direction",
    "parse_duration",
]
