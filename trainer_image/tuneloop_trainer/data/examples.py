"""What data preparation hands on: cleaned examples, the prepared splits, and the error
that carries the validation report.

Shared by the preparation steps (:mod:`.prepare` and the modules it calls) and by the
trainer code that consumes their output; nothing here reads data or decides anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneloop_trainer.data.replay import ReplayMix
from tuneloop_trainer.data.report import ValidationReport
from tuneloop_trainer.errors import InvalidDataError


@dataclass
class Example:
    """One cleaned example, its values by role (``text``, ``label``, ``prompt``, ``completion``,
    ``messages``, ``source``, ``target``); ``label`` is the class id for classification."""

    fields: dict[str, Any]
    uid: str
    """Content hash (hex) of the role values (the label by name, so it survives new classes)."""
    group: str | None = None
    """Value of ``evaluation.fairness.groupColumn``, when configured."""
    replay: bool = False
    """A general-domain replay row mixed into training."""
    slices: dict[str, str] = field(default_factory=dict)
    """Values of the ``evaluation.slices`` columns the row has (column → value as text)."""


@dataclass
class PreparedData:
    """The data of one run, ready for tokenization."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    out_of_domain: list[Example]
    forgetting: list[Example]
    label_names: list[str] | None
    """Classification: class id → name. Integer labels keep their values (``["0", "1", …]``)."""
    class_weights: list[float] | None
    """Loss weight per class id, when ``balance.strategy: class-weights`` had to act."""
    report: ValidationReport
    fingerprint: str
    """sha256 over the sorted distinct uids of train, validation and test (replay rows aside):
    the identity of the user's data, unchanged by row order, oversampling or the seed."""
    replay: ReplayMix | None = None
    """``dataset.replay``: the pool each epoch draws its replay rows from (``train`` holds the
    user's rows only; :class:`~tuneloop_trainer.data.replay.EpochRows` adds each epoch's draw)."""


class DataValidationError(InvalidDataError):
    """Invalid data, with the validation report as far as it got (worth writing out too)."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Kept:
    """A cleaned example with where it came from, and its content key (label aside, folded
    as ``dedupe`` folds), computed once for the leak and label-conflict checks."""

    ref: str
    example: Example
    source: str
    content: str


def qualified(source: str, ref: str) -> str:
    """A row reference as messages show it: the source's name before it, unless it is the training data."""
    return ref if source == "dataset" else f"{source} {ref}"
