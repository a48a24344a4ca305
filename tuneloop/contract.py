"""The contract between the operator and the trainer: exit codes and the output layout.

The operator never imports the trainer and the trainer never imports the operator; both
import this module, so the two sides cannot drift apart.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Final

from pydantic import ConfigDict, Field

from tuneloop.api.status import CheckpointRef, Progress
from tuneloop.api.types import ApiModel


class ExitCode(enum.IntEnum):
    """How the trainer process ends. Permanent failures must not be retried: the same
    config, data or model would fail the same way. Every other non-zero exit (a crash,
    an out-of-memory kill, a signal) is retryable and resumes from the last complete
    checkpoint."""

    SUCCESS = 0
    """Trained, evaluated, wrote the model and passed its gates."""
    INVALID_CONFIG = 10
    """The job's configuration is invalid (permanent)."""
    INVALID_DATA = 11
    """The data failed validation: no usable rows, unknown labels, PII with ``pii: fail``,
    imbalance with ``strategy: fail`` (permanent)."""
    UNSUPPORTED_MODEL = 12
    """The model does not fit the task or method, or cannot be found (permanent)."""
    GATE_FAILED = 13
    """Trained and wrote the model, but a promotion gate (or the forgetting or fairness
    limit) did not pass; the model must not be promoted (permanent)."""

    @property
    def permanent(self) -> bool:
        """Whether the operator must not retry this exit."""
        return self in PERMANENT_EXIT_CODES


PERMANENT_EXIT_CODES: Final = frozenset(
    {ExitCode.INVALID_CONFIG, ExitCode.INVALID_DATA, ExitCode.UNSUPPORTED_MODEL, ExitCode.GATE_FAILED}
)


def is_retryable(exit_code: int) -> bool:
    """Whether a trainer exit with this code may be retried (signals included: 128+N)."""
    return exit_code != ExitCode.SUCCESS and exit_code not in {int(c) for c in PERMANENT_EXIT_CODES}


#: Where the trainer writes its final summary; Kubernetes copies it into the pod status.
TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
#: Kubernetes truncates termination messages at 4096 bytes.
TERMINATION_MESSAGE_MAX_BYTES: Final = 4096


class Layout:
    """Object names under ``spec.output.uri`` (relative keys, '/'-separated)."""

    PROMOTED: Final = "promoted.json"

    @staticmethod
    def run(run: int) -> str:
        if run < 1:
            raise ValueError(f"run numbers start at 1, got {run}")
        return f"runs/{run}"

    @classmethod
    def status(cls, run: int) -> str:
        return f"{cls.run(run)}/status.json"

    @classmethod
    def checkpoints(cls, run: int) -> str:
        return f"{cls.run(run)}/checkpoints"

    @classmethod
    def checkpoint(cls, run: int, step: int) -> str:
        if step < 0:
            raise ValueError(f"steps are non-negative, got {step}")
        return f"{cls.checkpoints(run)}/step-{step:08d}"

    @classmethod
    def model(cls, run: int) -> str:
        return f"{cls.run(run)}/model"

    @classmethod
    def model_card(cls, run: int) -> str:
        return f"{cls.run(run)}/model-card.md"

    @classmethod
    def model_card_json(cls, run: int) -> str:
        return f"{cls.run(run)}/model-card.json"

    @classmethod
    def report(cls, run: int) -> str:
        return f"{cls.run(run)}/report"


class Heartbeat(ApiModel):
    """What the trainer writes to ``runs/<n>/status.json`` (:meth:`Layout.status`) while it runs.

    camelCase on the wire, with Kubeflow Trainer's progress field names. Numbers that are not
    finite (a diverged loss) are written as ``null``. Unknown fields are ignored, not refused, so
    an operator can read the heartbeat of a newer trainer during an upgrade.
    """

    model_config = ConfigDict(extra="ignore")

    run: Annotated[int, Field(ge=1)]
    """Run number."""
    phase: Annotated[str, Field(max_length=64)] = ""
    """The trainer's current phase (``validating``, ``training``, ``evaluating``, ``uploading``...)."""
    step: Annotated[int, Field(ge=0)] = 0
    """Optimizer steps done."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps planned."""
    epoch: Annotated[float, Field(ge=0)] = 0.0
    """Fractional epoch."""
    progress_percentage: Annotated[int, Field(ge=0, le=100)] | None = None
    """Percent of planned steps done."""
    estimated_remaining_seconds: Annotated[int, Field(ge=0)] | None = None
    """Estimated seconds to the end of training."""
    loss: float | None = None
    """Latest training loss (``null`` when not finite)."""
    tokens_per_second: Annotated[float, Field(ge=0)] | None = None
    """Training throughput in non-padding tokens per second."""
    metrics: dict[str, float | None] = Field(default_factory=dict)
    """Latest evaluation metrics by name (``validation``, then ``test`` once it ran); ``null`` when
    not finite."""
    splits: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    """Latest evaluation metrics of every split (``validation``, ``test``, ``out-of-domain``...)."""
    last_checkpoint: CheckpointRef | None = None
    """Latest complete checkpoint."""
    last_updated_time: datetime
    """When the heartbeat was written (UTC)."""
    message: Annotated[str, Field(max_length=4096)] = ""
    """The trainer's latest message."""

    def progress(self) -> Progress:
        """The heartbeat as the job status' ``progress`` (metrics that are ``null`` left out)."""
        return Progress(
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.epoch,
            progress_percentage=self.progress_percentage,
            estimated_remaining_seconds=self.estimated_remaining_seconds,
            loss=self.loss,
            tokens_per_second=self.tokens_per_second,
            metrics={k: v for k, v in self.metrics.items() if v is not None},
            last_updated_time=self.last_updated_time,
        )
