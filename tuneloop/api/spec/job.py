"""``FineTuneJobSpec``, the whole desired state, and the views derived from it (the metrics it
computes, its learning rate, its effective columns). Its cross-field rules are the table in
:mod:`tuneloop.api.spec.rules`."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from tuneloop.api.methods import METHOD_TRAITS
from tuneloop.api.spec.data import Dataset, ModelSource
from tuneloop.api.spec.evaluation import (
    DEFAULT_METRICS,
    METRIC_OUTPUTS,
    TASK_METRICS,
    Evaluation,
    Promotion,
)
from tuneloop.api.spec.method import Method
from tuneloop.api.spec.retrain import Retrain
from tuneloop.api.spec.rules import spec_issues
from tuneloop.api.spec.training import EarlyStopping, Hyperparameters, Output, Privacy, Resources, Storage
from tuneloop.api.types import ApiModel, raise_issues

TaskType = Literal["sequence-classification", "causal-lm", "seq2seq"]


class FineTuneJobSpec(ApiModel):
    """The desired state: what to fine-tune, on what, how, and what counts as good."""

    task: TaskType
    """``sequence-classification`` (encoder models), ``causal-lm`` (decoders: generation,
    chat) or ``seq2seq`` (encoder-decoders: summarization, translation). Immutable."""
    model: ModelSource
    """The base model."""
    dataset: Dataset
    """The training data."""
    method: Method = Field(default_factory=Method)
    """How weights are adapted (default: LoRA)."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    """Optimisation settings."""
    early_stopping: EarlyStopping | None = None
    """Early stopping; omit to train all epochs (the best checkpoint is still kept)."""
    evaluation: Evaluation = Field(default_factory=Evaluation)
    """Evaluation."""
    promotion: Promotion = Field(default_factory=Promotion)
    """Promotion gates."""
    privacy: Privacy | None = None
    """Differential privacy (DP-SGD); omit to train without it."""
    output: Output
    """Where results go."""
    storage: Storage = Field(default_factory=Storage)
    """S3 connection settings."""
    resources: Resources = Field(default_factory=Resources)
    """Pod resources and placement."""
    retrain: Retrain = Field(default_factory=Retrain)
    """Automatic retraining."""
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Retries of a run after retryable failures (preemptions do not count)."""
    active_deadline_seconds: Annotated[int, Field(gt=0)] | None = None
    """Fail a run that has been active longer than this (suspended time excluded)."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete a finished run's pods and ConfigMaps after this long; checkpoints and models stay."""
    suspend: bool = False
    """Suspend: pods are deleted, checkpoints kept; unsuspending resumes from the last checkpoint."""

    # --- derived views (not fields) -------------------------------------------------

    def metric_families(self) -> tuple[str, ...]:
        """The metric families evaluated for this spec."""
        if self.evaluation.metrics is not None:
            return tuple(m for m in dict.fromkeys(self.evaluation.metrics) if m in TASK_METRICS[self.task])
        return DEFAULT_METRICS[self.task]

    def computed_metrics(self) -> frozenset[str]:
        """Every metric name this spec produces: what gates and early stopping may name."""
        base = {"eval_loss"}
        for family in self.metric_families():
            base.update(METRIC_OUTPUTS[family])
        names = set(base)
        if self.evaluation.out_of_domain is not None:
            names.update(f"ood_{m}" for m in base)
        if self.evaluation.forgetting is not None:
            names.add("forgetting_increase")
        if self.evaluation.fairness is not None:
            names.add("fairness_gap")
        return frozenset(names)

    def baseline_metrics(self) -> frozenset[str]:
        """The metric names the baselines report (each as ``baseline_<name>_<metric>``)."""
        names = {"eval_loss"}
        for family in self.metric_families():
            names.update(METRIC_OUTPUTS[family])
        return frozenset(names)

    def learning_rate(self) -> float:
        """The peak learning rate: the given one, or the method's default."""
        return self.hyperparameters.learning_rate or METHOD_TRAITS[self.method.type].learning_rate

    def packing(self) -> bool:
        """Whether sequences are packed (causal-lm only, on by default there, off with privacy)."""
        if self.task != "causal-lm" or self.privacy is not None:
            return False
        return self.hyperparameters.packing is not False

    def save_format(self) -> Literal["adapter", "merged", "full"]:
        """What ``runs/<n>/model/`` holds."""
        if not METHOD_TRAITS[self.method.type].peft:
            return "full"
        return self.output.save or "adapter"

    def columns(self) -> dict[str, str]:
        """The effective column mapping for the task (role → column name)."""
        given = {k: v for k, v in self.dataset.columns.model_dump().items() if v is not None}
        if self.task == "sequence-classification":
            return {"text": given.get("text", "text"), "label": given.get("label", "label")}
        if self.task == "seq2seq":
            return {"source": given.get("source", "source"), "target": given.get("target", "target")}
        if "messages" in given:
            return {"messages": given["messages"]}
        if "prompt" in given or "completion" in given:
            return {
                "prompt": given.get("prompt", "prompt"),
                "completion": given.get("completion", "completion"),
            }
        return {"text": given.get("text", "text")}

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Self:
        raise_issues("FineTuneJobSpec", spec_issues(self), self)
        return self
