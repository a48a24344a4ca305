"""Trainer errors that end a run with a documented exit code (see tuneloop.contract.ExitCode).

Raise these for *permanent* problems, with a message that says what is wrong and what to
do. Anything else that escapes is a crash: retryable, resumed from the last checkpoint.
"""

from __future__ import annotations

from tuneloop.contract import ExitCode


class TrainerError(Exception):
    """A permanent failure with its exit code."""

    exit_code: ExitCode = ExitCode.INVALID_CONFIG
    reason: str = "InvalidConfig"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidConfigError(TrainerError):
    """The job's configuration cannot be run."""

    exit_code = ExitCode.INVALID_CONFIG
    reason = "InvalidConfig"


class InvalidDataError(TrainerError):
    """The data failed validation; the message names the rows and why."""

    exit_code = ExitCode.INVALID_DATA
    reason = "InvalidData"


class UnsupportedModelError(TrainerError):
    """The model does not fit the task or method, or cannot be loaded."""

    exit_code = ExitCode.UNSUPPORTED_MODEL
    reason = "UnsupportedModel"


class GateFailedError(TrainerError):
    """The model was trained and saved but did not pass its gates."""

    exit_code = ExitCode.GATE_FAILED
    reason = "GateFailed"
