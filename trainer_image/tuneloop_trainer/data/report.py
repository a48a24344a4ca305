"""The data validation report: what was read, what was dropped and why, and what was trained on.

Users lose trust in a pipeline that silently drops rows, and a failed run that only says
"invalid data" costs them a debugging session. So every dropped row is counted under one
reason, with a few ``file:line`` references to look at (never row text: a dropped row may
be the one holding personal data). The report goes to the log (:meth:`summary_lines`),
the model card, and ``runs/<n>/report/validation-report.json`` (:meth:`to_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

#: Why a row is dropped, in the order the cleaning steps run (``too_large``: over
#: ``dataset.cleaning.maxRowBytes``, found while reading).
DROP_REASONS: Final = (
    "too_large",
    "undecodable",
    "empty",
    "unknown_label",
    "too_short",
    "pii",
    "duplicate_exact",
    "duplicate_normalized",
    "too_long",
    "leak",
)
#: References kept per reason: enough to find the pattern, few enough to read.
MAX_EXAMPLES: Final = 5
#: Sources in report order; ``dataset`` is ``dataset.uri`` before it is split.
SOURCE_ORDER: Final = ("dataset", "validation", "test", "replay", "out_of_domain", "forgetting")


@dataclass
class Drops:
    """Rows dropped for one reason: how many, and the first few references."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, ref: str, detail: str | None = None) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{ref} ({detail})" if detail else ref)


@dataclass
class FileStats:
    """One file as read."""

    file: str
    format: str
    rows: int
    header: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "format": self.format, "rows": self.rows, "header": self.header}


@dataclass
class SourceReport:
    """One data source (``dataset.uri``, a validation or test URI, replay, out-of-domain, forgetting)."""

    name: str
    uri: str
    files: list[FileStats] = field(default_factory=list)
    dropped: dict[str, Drops] = field(default_factory=dict)
    kept: int = 0
    """Rows left after cleaning (before splitting, for ``dataset``)."""

    def drop(self, reason: str, ref: str, detail: str | None = None) -> None:
        self.dropped.setdefault(reason, Drops()).add(ref, detail)

    @property
    def rows_read(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def rows_dropped(self) -> int:
        return sum(d.count for d in self.dropped.values())

    def drop_summary(self, *, examples: bool = True) -> str:
        """``"120 empty (e.g. a.jsonl:3, …), 30 duplicate_exact (…)"``, in cleaning order."""
        parts = []
        for reason in _ordered(self.dropped):
            drops = self.dropped[reason]
            text = f"{drops.count:,} {reason}"
            if examples and drops.examples:
                text += f" (e.g. {', '.join(drops.examples[:3])})"
            parts.append(text)
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "files": [f.to_dict() for f in self.files],
            "rowsRead": self.rows_read,
            "rowsDropped": self.rows_dropped,
            "rowsKept": self.kept,
            "dropped": {
                r: {"count": self.dropped[r].count, "examples": list(self.dropped[r].examples)}
                for r in _ordered(self.dropped)
            },
        }


@dataclass
class PiiReport:
    """Personal data found, by kind, and what was done about it."""

    action: str
    rows: int = 0
    """Rows with at least one find."""
    matches: dict[str, int] = field(default_factory=lambda: {"email": 0, "phone": 0, "card": 0, "ip": 0})
    examples: list[str] = field(default_factory=list)

    def add(self, ref: str, kinds: dict[str, int]) -> None:
        self.rows += 1
        for kind, n in kinds.items():
            self.matches[kind] = self.matches.get(kind, 0) + n
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(ref)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "rows": self.rows,
            "matches": dict(self.matches),
            "examples": list(self.examples),
        }


@dataclass
class LabelReport:
    """Classification labels: names, the training distribution and what balancing did."""

    names: list[str]
    train: dict[str, int]
    """Training rows per label name before balancing (replay rows excluded)."""
    imbalance_ratio: float | None
    """Most frequent over least frequent class among those with training rows."""
    strategy: str | None = None
    """``balance.strategy``, or None when there is no balance block (report only)."""
    max_imbalance_ratio: float | None = None
    action: str = "none"
    """``none`` (within the limit or no policy), ``class-weights`` or ``oversample``."""
    class_weights: list[float] | None = None
    oversampled: dict[str, int] = field(default_factory=dict)
    """Copies added per label name by ``oversample``."""
    validation: dict[str, int] = field(default_factory=dict)
    test: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "train": dict(self.train),
            "validation": dict(self.validation),
            "test": dict(self.test),
            "imbalanceRatio": None if self.imbalance_ratio is None else round(self.imbalance_ratio, 4),
            "balance": {
                "strategy": self.strategy,
                "maxImbalanceRatio": self.max_imbalance_ratio,
                "action": self.action,
                "classWeights": None if self.class_weights is None else [round(w, 6) for w in self.class_weights],
                "oversampled": dict(self.oversampled),
            },
        }


@dataclass
class ReplayReport:
    """General-domain rows mixed into training."""

    uri: str
    ratio: float
    rows_added: int = 0
    """Replay rows added to each epoch (drawn afresh per epoch, seeded by seed and epoch)."""
    with_replacement: bool = False
    pool_rows: int = 0
    """Usable rows in the replay data, after cleaning and leak removal."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "ratio": self.ratio,
            "rowsAdded": self.rows_added,
            "perEpoch": True,
            "poolRows": self.pool_rows,
            "withReplacement": self.with_replacement,
        }


@dataclass
class ValidationReport:
    """Everything the data pipeline did, for logs, the model card and the run report."""

    task: str
    sources: dict[str, SourceReport] = field(default_factory=dict)
    split_method: dict[str, str] = field(default_factory=dict)
    """How each held-out split was made: ``hash`` (from ``dataset.uri``) or ``uri`` (its own data)."""
    split_seed: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    """Rows per split: train (replay rows, oversampled copies and augmented rows included), validation, test,
    out_of_domain, forgetting."""
    labels: LabelReport | None = None
    pii: PiiReport = field(default_factory=lambda: PiiReport("off"))
    replay: ReplayReport | None = None
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    """Fairness groups: rows per group value in each evaluated split."""
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""
    data_drift: dict[str, Any] | None = None
    """How far the training data moved since the promoted run (:mod:`tuneloop_trainer.data.profile`):
    ``score``, per-distribution ``distances``, or the ``reason`` there is none; ``None`` when
    nothing was promoted."""
    data_drift_line: str = ""
    """The same in one sentence, for the log."""
    label_issues: dict[str, Any] | None = None
    """Suspected label errors in the training split (``dataset.labelIssues``;
    :meth:`tuneloop_trainer.baselines.LabelIssues.to_dict`): how many, the first rows (split
    index, PII-masked excerpt, given and suggested label), and the cost; ``None`` when off."""
    label_issues_line: str = ""
    """The same in one sentence, for the log."""
    lengths: dict[str, Any] | None = None
    """Token lengths per split and what ``maxSeqLength`` truncates
    (:meth:`tuneloop_trainer.lengths.LengthReport.to_dict`); measured once the features are
    built, so ``None`` until then."""
    augmentation: dict[str, Any] | None = None
    """What ``dataset.augmentation`` added to the training split
    (:meth:`tuneloop_trainer.augment.AugmentationResult.to_dict`); ``None`` when it is off."""
    augmentation_line: str = ""
    """The same in one sentence, for the log."""

    def source(self, name: str, uri: str) -> SourceReport:
        report = SourceReport(name, uri)
        self.sources[name] = report
        return report

    def dropped_totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for src in self.sources.values():
            for reason, drops in src.dropped.items():
                totals[reason] = totals.get(reason, 0) + drops.count
        return {r: totals[r] for r in _ordered(totals)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (camelCase keys, like the rest of the API)."""
        ordered = sorted(self.sources, key=lambda n: SOURCE_ORDER.index(n) if n in SOURCE_ORDER else 99)
        return {
            "task": self.task,
            "rowsRead": sum(s.rows_read for s in self.sources.values()),
            "dropped": self.dropped_totals(),
            "sources": {n: self.sources[n].to_dict() for n in ordered},
            "split": {"seed": self.split_seed, "method": dict(self.split_method), "sizes": dict(self.sizes)},
            "labels": None if self.labels is None else self.labels.to_dict(),
            "pii": self.pii.to_dict(),
            "replay": None if self.replay is None else self.replay.to_dict(),
            "groups": {k: dict(v) for k, v in self.groups.items()},
            "warnings": list(self.warnings),
            "fingerprint": self.fingerprint,
            "dataDrift": None if self.data_drift is None else dict(self.data_drift),
            "labelIssues": None if self.label_issues is None else dict(self.label_issues),
            "lengths": None if self.lengths is None else dict(self.lengths),
            "augmentation": None if self.augmentation is None else dict(self.augmentation),
        }

    def summary_lines(self) -> list[str]:
        """A few human lines for the run log and the model card."""
        lines: list[str] = []
        for name in SOURCE_ORDER:
            src = self.sources.get(name)
            if src is None:
                continue
            n_files = len(src.files)
            line = f"{name}: {src.rows_read:,} rows read from {n_files} file{'s' if n_files != 1 else ''}"
            headerless = [f.file for f in src.files if not f.header]
            if headerless:
                line += f" ({len(headerless)} without a header row)"
            if src.dropped:
                line += f"; {src.rows_dropped:,} dropped: {src.drop_summary(examples=False)}"
            lines.append(line)
        if self.sizes:
            order = ("train", "validation", "test", "out_of_domain", "forgetting")
            sizes = ", ".join(f"{k} {self.sizes[k]:,}" for k in order if k in self.sizes)
            held = ", ".join(f"{k} by {v}" for k, v in self.split_method.items())
            lines.append(f"splits: {sizes}" + (f" ({held}, seed {self.split_seed})" if held else ""))
        if self.labels is not None:
            lab = self.labels
            total = sum(lab.train.values()) or 1
            dist = ", ".join(f"{k}: {v:,} ({100 * v / total:.1f} %)" for k, v in lab.train.items())
            ratio = "n/a" if lab.imbalance_ratio is None else f"{lab.imbalance_ratio:.2f}"
            line = f"labels (train): {dist}; imbalance {ratio}"
            if lab.action == "class-weights" and lab.class_weights is not None:
                line += f"; class weights {', '.join(f'{w:.3g}' for w in lab.class_weights)}"
            elif lab.action == "oversample":
                line += f"; oversampled {', '.join(f'{k} +{v:,}' for k, v in lab.oversampled.items())}"
            lines.append(line)
        pii = self.pii
        if pii.action != "off":
            found = ", ".join(f"{v:,} {k}" for k, v in pii.matches.items() if v)
            rows = f"{pii.rows:,} row{'s' if pii.rows != 1 else ''}"
            lines.append(f"PII ({pii.action}): {rows} with personal data" + (f" ({found})" if found else ""))
        if self.replay is not None:
            extra = " (drawn with replacement)" if self.replay.with_replacement else ""
            lines.append(
                f"replay mix: {self.replay.rows_added:,} general-domain rows added to each epoch, drawn afresh per "
                f"epoch from {self.replay.pool_rows:,}{extra}"
            )
        for split, counts in self.groups.items():
            lines.append(f"groups ({split}): " + ", ".join(f"{k}: {v:,}" for k, v in counts.items()))
        if self.data_drift_line:
            lines.append(self.data_drift_line)
        if self.label_issues_line:
            lines.append(self.label_issues_line)
        if self.augmentation_line:
            lines.append(self.augmentation_line)
        lines.extend(f"warning: {w}" for w in self.warnings)
        return lines


def _ordered(reasons: dict[str, Any]) -> list[str]:
    return sorted(reasons, key=lambda r: DROP_REASONS.index(r) if r in DROP_REASONS else len(DROP_REASONS))
