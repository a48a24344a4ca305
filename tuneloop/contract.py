"""The contract between the operator and the trainer: exit codes and the output layout.

The operator never imports the trainer and the trainer never imports the operator; both
import this module, so the two sides cannot drift apart.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import ConfigDict, Field

from tuneloop.api.status import CheckpointRef, Progress, Reason, TrainingProgress
from tuneloop.api.types import ApiModel

if TYPE_CHECKING:
    from tuneloop.api.spec import FineTuneJobSpec


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

    @property
    def reason(self) -> str | None:
        """The status reason (:class:`tuneloop.api.status.Reason`) of a permanent exit, as the
        trainer reports it and the operator records it; ``None`` for success."""
        return _PERMANENT_REASONS.get(self)


_PERMANENT_REASONS: Final[dict[ExitCode, str]] = {
    ExitCode.INVALID_CONFIG: Reason.INVALID_CONFIG,
    ExitCode.INVALID_DATA: Reason.INVALID_DATA,
    ExitCode.UNSUPPORTED_MODEL: Reason.UNSUPPORTED_MODEL,
    ExitCode.GATE_FAILED: Reason.GATE_FAILED,
}
PERMANENT_EXIT_CODES: Final = frozenset(_PERMANENT_REASONS)


def is_retryable(exit_code: int) -> bool:
    """Whether a trainer exit with this code may be retried (signals included: 128+N)."""
    return exit_code != ExitCode.SUCCESS and exit_code not in {int(c) for c in PERMANENT_EXIT_CODES}


#: Where the trainer writes its final summary; Kubernetes copies it into the pod status.
TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
#: Kubernetes truncates termination messages at 4096 bytes.
TERMINATION_MESSAGE_MAX_BYTES: Final = 4096


#: Spec fields that steer the lifecycle of runs, not what a run trains: changing them never
#: starts a new run, and a checkpoint written before the change still resumes.
LIFECYCLE_FIELDS: Final = frozenset(
    {"suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "retrain"}
)
#: Fields of ``spec.resources`` that say where the pods run, not what they train: a queue such as
#: Kueue sets them on admission (a ResourceFlavor's node labels and taints), and a job suspended
#: and admitted again elsewhere resumes the same run from its checkpoint on the new nodes.
PLACEMENT_FIELDS: Final = frozenset({"nodeSelector", "tolerations"})
#: Nested spec fields (wire names) that do not change what a run trains either.
_NOT_TRAINED: Final = (
    ("output", "continueLineage"),
    ("promotion", "pin"),
    ("promotion", "requireApproval"),
)


def spec_hash(spec: FineTuneJobSpec) -> str:
    """Hash of what a run trains: the spec without :data:`LIFECYCLE_FIELDS`, placement
    (:data:`PLACEMENT_FIELDS`) and a few nested fields that steer runs (16 hex digits).

    The operator stores it with each run (a changed hash means a new run); the trainer writes it
    into each checkpoint and resumes only checkpoints with its own hash. Values equal to their
    defaults are left out, so that a field added to the API later (with a default that keeps
    today's behaviour) does not change the hash of every existing job."""
    wire = _trained(spec)
    resources = wire.get("resources")
    if isinstance(resources, dict):
        rest = {k: v for k, v in resources.items() if k not in PLACEMENT_FIELDS}
        if rest:
            wire["resources"] = rest
        else:
            del wire["resources"]  # only placement: hashes as no ``resources`` at all
    return _digest(wire)


def spec_hashes(spec: FineTuneJobSpec) -> frozenset[str]:
    """Every hash a run of this spec may have been recorded under: :func:`spec_hash`, and the
    hash of 0.1 operators, which counted placement as trained. The operator compares recorded
    hashes with these, so that an upgrade does not retrain every job that sets a nodeSelector."""
    return frozenset({spec_hash(spec), _digest(_trained(spec))})


def _trained(spec: FineTuneJobSpec) -> dict[str, Any]:
    full = spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)
    wire = {k: v for k, v in full.items() if k not in LIFECYCLE_FIELDS}
    for parent, child in _NOT_TRAINED:
        section = wire.get(parent)
        if isinstance(section, dict):
            wire[parent] = {k: v for k, v in section.items() if k != child}
    return wire


def _digest(wire: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]


_CHECKPOINT_FOLDER: Final = re.compile(r"^step-(\d{8,})$")


class Layout:
    """Object names under ``spec.output.uri`` (relative keys, '/'-separated)."""

    PROMOTED: Final = "promoted.json"
    OWNER: Final = "owner.json"
    """Which job owns the output prefix (:mod:`tuneloop.ownership`)."""
    RUNS: Final = "runs"

    @staticmethod
    def run(run: int) -> str:
        if run < 1:
            raise ValueError(f"run numbers start at 1, got {run}")
        return f"runs/{run}"

    @classmethod
    def status(cls, run: int) -> str:
        return f"{cls.run(run)}/status.json"

    @classmethod
    def run_claim(cls, run: int) -> str:
        """Which job claimed the run number (written once, before anything else of the run)."""
        return f"{cls.run(run)}/run.json"

    @classmethod
    def run_writer(cls, run: int) -> str:
        """Which process writes the run right now, on S3 (the writer lease, :mod:`tuneloop.lease`)."""
        return f"{cls.run(run)}/writer.json"

    @classmethod
    def checkpoints(cls, run: int) -> str:
        return f"{cls.run(run)}/checkpoints"

    @classmethod
    def checkpoint(cls, run: int, step: int) -> str:
        return f"{cls.checkpoints(run)}/{cls.checkpoint_folder(step)}"

    @staticmethod
    def checkpoint_folder(step: int) -> str:
        """A checkpoint's folder under :meth:`checkpoints`: ``step-00000042`` (names sort by step)."""
        if step < 0:
            raise ValueError(f"steps are non-negative, got {step}")
        return f"step-{step:08d}"

    @staticmethod
    def checkpoint_step(folder: str) -> int | None:
        """The step of a folder named by :meth:`checkpoint_folder`; ``None`` for any other name."""
        match = _CHECKPOINT_FOLDER.match(folder)
        return int(match.group(1)) if match else None

    CHECKPOINT_MANIFEST: Final = "manifest.json"
    """Written last into a checkpoint's folder (its files, sizes and SHA-256): a folder without it
    holds no complete checkpoint."""

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

    @classmethod
    def data_profile(cls, run: int) -> str:
        """The run's training-data profile (label, length and token distributions), written by
        the trainer; the next run measures its data drift against the promoted run's."""
        return f"{cls.report(run)}/data-profile.json"

    @classmethod
    def data_listing(cls, run: int) -> str:
        """The listing of ``dataset.uri`` the run started with (keys, sizes, ETags), written by the
        operator: new-data triggers count only what changed since (the data watermark)."""
        return f"{cls.run(run)}/data-listing.json"

    INDEX: Final = "runs/index.json"
    """The lineage, append-only: one record per finished run (status keeps only the latest)."""


class Heartbeat(TrainingProgress):
    """What the trainer writes to ``runs/<n>/status.json`` (:meth:`Layout.status`) while it runs.

    camelCase on the wire, with Kubeflow Trainer's progress field names (the fields of
    :class:`~tuneloop.api.status.TrainingProgress`, which the job status' progress has too). Numbers
    that are not finite (a diverged loss) are written as ``null``. Unknown fields are ignored, not
    refused, so an operator can read the heartbeat of a newer trainer during an upgrade.
    """

    model_config = ConfigDict(extra="ignore")

    run: Annotated[int, Field(ge=1)]
    """Run number."""
    job_uid: Annotated[str, Field(max_length=128)] | None = None
    """uid of the FineTuneJob whose pod wrote it (``null`` for ``tuneloop run``). The operator
    reads only heartbeats with its own job's uid and run: a heartbeat left by another job (an
    earlier job of the same name, say) is never shown as this job's progress."""
    phase: Annotated[str, Field(max_length=64)] = ""
    """The trainer's current phase (``validating``, ``training``, ``evaluating``, ``uploading``...)."""
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
        """The heartbeat as the job status' ``progress`` (metrics that are ``null`` left out), its
        numbers rounded to what ``kubectl get`` should show."""
        shared = self.model_dump(include=set(TrainingProgress.model_fields))
        return Progress.model_validate(
            {
                **shared,
                "epoch": round(self.epoch, 3),
                "loss": _significant(self.loss, 4),
                "tokens_per_second": None if self.tokens_per_second is None else round(self.tokens_per_second, 1),
                "metrics": {
                    k: v for k, v in ((k, _significant(v, 6)) for k, v in self.metrics.items()) if v is not None
                },
                "last_updated_time": self.last_updated_time,
            }
        )


def _significant(value: float | None, digits: int) -> float | None:
    """``value`` rounded to ``digits`` significant digits (``kubectl get`` shows what is stored:
    a loss of 0.6931471805599453 is 0.6931 there)."""
    return None if value is None else float(f"{value:.{digits}g}")


#: The data files the trainer reads under a dataset prefix, and the operator's new-data trigger
#: lists and counts (case-insensitive suffixes).
DATA_SUFFIXES: Final = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


PROMOTED_FORMAT: Final = "tuneloop-promoted/1"


class PromotedPointer(ApiModel):
    """``promoted.json`` under ``spec.output.uri`` (:attr:`Layout.PROMOTED`): the model serving
    stacks should load, written by the operator (atomically, one object) when it promotes a run.

    The format is versioned (``format``); fields are only ever added. The trainer of the next run
    reads it to evaluate the promoted model beside its candidate on the same test split.
    """

    model_config = ConfigDict(extra="ignore")

    format: Literal["tuneloop-promoted/1"] = PROMOTED_FORMAT
    """Format and version of this object."""
    run: Annotated[int, Field(ge=1)]
    """The promoted run."""
    model_uri: Annotated[str, Field(max_length=2048)]
    """Its model (a directory: ``save_pretrained`` output, an adapter or full weights)."""
    base_model_uri: Annotated[str, Field(max_length=2048)] | None = None
    """The base model an adapter applies to (``spec.model.uri`` of the run)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Its test metrics when it was promoted."""
    previous_metrics: dict[str, float] = Field(default_factory=dict)
    """The model it replaced, evaluated on the same test split by the same run."""
    previous_run: Annotated[int, Field(ge=1)] | None = None
    """The run it replaced."""
    data_fingerprint: Annotated[str, Field(max_length=128)] | None = None
    """Hash of the data it trained on."""
    trigger: Annotated[str, Field(max_length=64)] | None = None
    """What started its run."""
    promoted_by: Annotated[str, Field(max_length=256)] = ""
    """``gates``, ``annotation tuneloop.dev/approve=<run>``, ``spec.promotion.pin=<run>``."""
    time: datetime
    """When it was promoted (UTC)."""
    job: dict[str, str | None] = Field(default_factory=dict)
    """The job that promoted it: namespace, name, uid."""
