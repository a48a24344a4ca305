"""Classification labels: the classes, warnings about their distribution, and the balance policy.

The classes are decided from the training data (``dataset.uri``); every other source is
checked against them. ``dataset.balance`` then either accepts the training split, fails
it, weights the loss, or oversamples the rare classes.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from tuneloop.api.spec.data import ClassBalance
from tuneloop_trainer.data.decode import Row, quoted
from tuneloop_trainer.data.examples import DataValidationError, Kept
from tuneloop_trainer.data.report import LabelReport, SourceReport, ValidationReport
from tuneloop_trainer.errors import InvalidDataError

#: Integer labels are class ids; beyond this the model head would be absurd.
MAX_LABEL_ID: Final = 100_000

_INT_LABEL = re.compile(r"[+-]?[0-9]+")


@dataclass
class Labels:
    """The classes, decided from the training data (``dataset.uri``).

    All-integer labels are ids and keep their values, so a model's outputs mean the same
    across retrains even when a class is missing from one data drop; anything else is a
    name, mapped to ids in sorted order.
    """

    integer: bool
    names: list[str]
    seen: set[str] = field(default_factory=set)

    @classmethod
    def from_names(cls, raw: Iterable[str]) -> Labels:
        raw = list(raw)
        integer = bool(raw) and all(_INT_LABEL.fullmatch(n) for n in raw)
        if integer:
            ids = {int(n) for n in raw if int(n) >= 0}
            top = max(ids, default=-1)
            if top >= MAX_LABEL_ID:
                raise InvalidDataError(
                    f"integer labels are class ids, and the largest is {top:,}: the model would get {top + 1:,} "
                    "outputs; number the classes 0, 1, 2, … or use label names"
                )
            return cls(True, [str(i) for i in range(top + 1)], {str(i) for i in ids})
        names = sorted(set(raw))
        return cls(False, names, set(names))

    def canonical(self, name: str) -> str | None:
        if not self.integer:
            return name
        if not _INT_LABEL.fullmatch(name) or int(name) < 0:
            return None
        return str(int(name))

    def id_of(self, name: str) -> int:
        return int(name) if self.integer else self.names.index(name)


def label_problem(label: str, what: str) -> str:
    """A drop detail about a label, quoting it only when it reads as a name."""
    shown = quoted(label)
    return f"label {shown} {what}" if shown else f"a label {what} (not shown: it is not a plain name)"


def conflicting_labels(kept: list[Kept], src: SourceReport) -> str | None:
    """A warning when the same text appears with different labels (all are kept)."""
    labels_of: dict[str, set[Any]] = defaultdict(set)
    first_ref: dict[str, str] = {}
    for k in kept:
        labels_of[k.content].add(k.example.fields["label"])
        first_ref.setdefault(k.content, k.ref)
    conflicts = [first_ref[key] for key, labels in labels_of.items() if len(labels) > 1]
    if not conflicts:
        return None
    return (
        f"{len(conflicts)} texts in {src.uri} appear with different labels (e.g. {', '.join(conflicts[:5])}); "
        "all are kept, so the model sees contradicting examples"
    )


def label_warnings(labels: Labels, rows: Iterable[Row], train: list[Kept]) -> list[str]:
    """Warnings about classes: single examples, classes held out only, integer ids without rows.

    ``rows`` are the decoded rows of the training data and of separate validation/test sets.
    """
    warnings: list[str] = []
    totals: Counter[str] = Counter()
    for r in rows:
        name = labels.canonical(r.label) if r.label is not None else None
        if name is not None:
            totals[name] += 1
    in_train = {labels.names[k.example.fields["label"]] for k in train}
    singles = sorted(n for n in labels.seen if totals[n] == 1)
    if singles:
        warnings.append(
            f"label{'s' if len(singles) > 1 else ''} {_names(singles)} "
            f"{'have' if len(singles) > 1 else 'has'} a single example in total: "
            "nothing to learn from or to test on"
        )
    held_only = sorted(n for n in labels.seen if n not in in_train)
    if held_only:
        warnings.append(
            f"label{'s' if len(held_only) > 1 else ''} {_names(held_only)} "
            f"{'are' if len(held_only) > 1 else 'is'} in validation/test only: the model cannot learn "
            f"{'them' if len(held_only) > 1 else 'it'}"
        )
    gaps = [n for n in labels.names if n not in labels.seen]
    if labels.integer and gaps:
        warnings.append(
            f"label ids {_names(gaps)} have no rows at all; the model still gets an output for each id up to "
            f"{labels.names[-1]}"
        )
    return warnings


def balance_classes(
    labels: Labels,
    train: list[Kept],
    val: list[Kept],
    test: list[Kept],
    *,
    balance: ClassBalance | None,
    seed: int,
    report: ValidationReport,
) -> tuple[list[Kept], list[float] | None]:
    """Record the class distribution in ``report.labels`` and apply ``dataset.balance``.

    Returns the training rows (with oversampled copies) and the class weights, if any.
    """
    counts = Counter(k.example.fields["label"] for k in train)
    names = labels.names

    def by_name(rows: list[Kept]) -> dict[str, int]:
        c = Counter(k.example.fields["label"] for k in rows)
        return {names[i]: c.get(i, 0) for i in range(len(names)) if names[i] in labels.seen}

    present = {i: n for i, n in counts.items() if n > 0}
    ratio = max(present.values()) / min(present.values()) if present else None
    lab = LabelReport(
        names=list(names),
        train=by_name(train),
        imbalance_ratio=ratio,
        strategy=balance.strategy if balance is not None else None,
        max_imbalance_ratio=balance.max_imbalance_ratio if balance is not None else None,
        validation=by_name(val),
        test=by_name(test),
    )
    report.labels = lab
    if len(present) < 2:
        only = ", ".join(f"{names[i]}: {n:,}" for i, n in present.items())
        raise DataValidationError(
            f"only one label in the training split ({only}); a classifier needs at least two classes: "
            "check dataset.columns.label and the data",
            report,
        )
    assert ratio is not None
    if balance is None or ratio <= balance.max_imbalance_ratio:
        return train, None
    dist = ", ".join(f"{k}: {v:,}" for k, v in lab.train.items())
    if balance.strategy == "fail":
        raise DataValidationError(
            f"class imbalance {ratio:.1f} exceeds dataset.balance.maxImbalanceRatio "
            f"{balance.max_imbalance_ratio:g} (training rows per label: {dist}); collect more rows of the rare "
            "classes, raise maxImbalanceRatio, or set balance.strategy to class-weights or oversample",
            report,
        )
    if balance.strategy == "class-weights":
        total = sum(present.values())
        weights = [total / (len(present) * present[i]) if i in present else 1.0 for i in range(len(names))]
        lab.action, lab.class_weights = "class-weights", weights
        return train, weights
    # oversample: copies of rare-class rows (seeded) until each class is within the ratio.
    target = math.ceil(max(present.values()) / balance.max_imbalance_ratio)
    rng = random.Random(f"{seed}:oversample")  # noqa: S311 - sampling, not security
    by_class: dict[int, list[Kept]] = defaultdict(list)
    for k in train:
        by_class[k.example.fields["label"]].append(k)
    extra: list[Kept] = []
    for i in sorted(present):
        need = target - present[i]
        if need > 0:
            picks = rng.choices(by_class[i], k=need)
            extra.extend(replace(k, example=replace(k.example, fields=dict(k.example.fields))) for k in picks)
            lab.oversampled[names[i]] = need
    lab.action = "oversample"
    return train + extra, None


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")
