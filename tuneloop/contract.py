"""The contract between the operator and the trainer: exit codes and the output layout.

The operator never imports the trainer and the trainer never imports the operator; both
import this module, so the two sides cannot drift apart.
"""

from __future__ import annotations

import enum
from typing import Final


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
