"""Trainer errors that end a run with a documented exit code (see tuneloop.contract.ExitCode).

Raise these for *permanent* problems, with a message that says what is wrong and what to
do. Anything else that escapes is a crash: retryable, resumed from the last checkpoint.
:func:`failure_of` turns whatever ended a run into its exit code and a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

from tuneloop.api.status import Reason
from tuneloop.contract import ExitCode
from tuneloop.text import clip

#: ``StorageError.code`` values that mean the storage configuration is wrong (credentials,
#: permissions, bucket, region): the same pod would fail the same way, so they are not retried.
#: Everything else from storage (connection, throttling, 5xx, a checksum mismatch) is transient.
PERMANENT_STORAGE_CODES: Final = frozenset(
    {
        "AccessDenied",
        "NoSuchBucket",
        "NoCredentials",
        "ProfileNotFound",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "IllegalLocationConstraintException",
        "301",
    }
)
#: Longest cause kept from an exception's message (a runaway message must not flood the log line,
#: the status file or the termination message).
MAX_CAUSE_CHARS: Final = 2000
#: Exit code of a crash: retryable (any code outside ExitCode's permanent ones would do).
EXIT_CRASH: Final = 1
#: The termination message's reason for a storage failure that is retried.
STORAGE_UNAVAILABLE: Final = "StorageUnavailable"


class TrainerError(Exception):
    """A permanent failure with its exit code and the reason the termination message gives
    (a :class:`tuneloop.api.status.Reason`): each subclass names its exit code in its class
    statement, and its reason where it is not the code's own (:attr:`ExitCode.reason`)."""

    exit_code: ClassVar[ExitCode] = ExitCode.INVALID_CONFIG
    reason: ClassVar[str] = Reason.INVALID_CONFIG

    def __init_subclass__(cls, *, exit_code: ExitCode | None = None, reason: str | None = None) -> None:
        super().__init_subclass__()
        if exit_code is not None:
            cls.exit_code = exit_code
        cls.reason = reason or cls.exit_code.reason or cls.reason

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidConfigError(TrainerError, exit_code=ExitCode.INVALID_CONFIG):
    """The job's configuration cannot be run."""


class InvalidDataError(TrainerError, exit_code=ExitCode.INVALID_DATA):
    """The data failed validation; the message names the rows and why."""


class UnsupportedModelError(TrainerError, exit_code=ExitCode.UNSUPPORTED_MODEL):
    """The model does not fit the task or method, or cannot be loaded."""


class GateFailedError(TrainerError, exit_code=ExitCode.GATE_FAILED):
    """The model was trained and saved but did not pass its gates."""


class OutputOwned(TrainerError, exit_code=ExitCode.INVALID_CONFIG, reason=Reason.OUTPUT_OWNED):
    """The output location (or the run number) belongs to another job (permanent)."""


@dataclass(frozen=True)
class Failure:
    """How a run ended badly: what the process exits with and says."""

    exit_code: int
    reason: str
    """A CamelCase reason for the termination message (``InvalidConfig``, ``TrainerFailed``...)."""
    message: str
    """The cause first: the one line a user and the operator see."""
    traceback: bool
    """Whether the full traceback belongs in the log (an unexpected crash) or the message says it all."""

    @property
    def permanent(self) -> bool:
        return self.exit_code in {int(code) for code in ExitCode if code.permanent}


def failure_of(exc: BaseException) -> Failure:
    """Map whatever ended a run to its exit code and message.

    :class:`TrainerError` s carry their own. A storage error is permanent (exit 10) when the
    configuration is wrong (:data:`PERMANENT_STORAGE_CODES`, an invalid URI or key) and
    retryable otherwise; its message already names the URI and what to do. Anything else is a
    crash: retryable, described by the exception's type and the last line of its message
    (``RuntimeError: size mismatch for classifier.weight ...``), which is where Python and most
    libraries put the specific cause.
    """
    from tuneloop.storage import InvalidUriError, StorageError, UnsafeKeyError  # noqa: PLC0415

    if isinstance(exc, TrainerError):
        return Failure(int(exc.exit_code), exc.reason, exc.message, traceback=False)
    if isinstance(exc, StorageError):
        message = _clip(" ".join(str(exc).split()))
        if isinstance(exc, InvalidUriError | UnsafeKeyError) or exc.code in PERMANENT_STORAGE_CODES:
            return Failure(int(ExitCode.INVALID_CONFIG), Reason.INVALID_CONFIG, message, traceback=False)
        return Failure(EXIT_CRASH, STORAGE_UNAVAILABLE, message, traceback=False)
    return Failure(EXIT_CRASH, Reason.TRAINER_FAILED, crash_cause(exc), traceback=True)


def crash_cause(exc: BaseException) -> str:
    """``Type: last line of the message`` (just ``Type`` when the message is empty), on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = type(exc).__name__
    return _clip(f"{name}: {' '.join(lines[-1].split())}" if lines else name)


def _clip(text: str) -> str:
    return clip(text, MAX_CAUSE_CHARS)
