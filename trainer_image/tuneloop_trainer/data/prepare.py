"""From data URIs to cleaned, labelled, split examples, before any GPU time is spent.

Most failed fine-tuning runs fail on data, and the cheapest place to find out is here:
a wrong column name, labels that do not match, personal data, a split too small to
measure anything. So this step reads every configured source (training data, separate
validation/test sets, replay, out-of-domain and forgetting sets), cleans each the same
way, and either returns :class:`PreparedData` with a :class:`ValidationReport` or raises
:class:`InvalidDataError` naming the rows and what to change. Invalid data is a permanent
failure: retrying the same data cannot help.

Splits are decided by a hash of each row's content and ``split.seed``, not by position or
a shuffle, so appending rows never moves an old row into another split: a model retrained
on grown data is never tested on rows it was trained on before.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from tuneloop.api.spec import FineTuneJobSpec
from tuneloop_trainer.data.loading import Column, display_names, has_bad_text, load_file, show_name
from tuneloop_trainer.data.pii import PLACEHOLDERS, mask_pii
from tuneloop_trainer.data.replay import ReplayMix, replay_rows_wanted
from tuneloop_trainer.data.report import (
    FileStats,
    LabelReport,
    PiiReport,
    ReplayReport,
    SourceReport,
    ValidationReport,
)
from tuneloop_trainer.errors import InvalidDataError

CLASSIFICATION: Final = "sequence-classification"
#: Roles whose values are plain text (``messages`` is a list, ``label`` a class).
TEXT_ROLES: Final = ("text", "prompt", "completion", "source", "target")
CHAT_ROLES: Final = frozenset({"system", "user", "assistant"})
#: Integer labels are class ids; beyond this the model head would be absurd.
MAX_LABEL_ID: Final = 100_000
#: Held-out splits smaller than this give metrics too noisy to gate on.
SMALL_SPLIT: Final = 20
#: A share of rows dropped for one reason above which the column mapping is suspect.
SUSPICIOUS_DROP_SHARE: Final = 0.1
#: How many row references an error message lists.
MAX_REFS_IN_ERROR: Final = 10
#: The spec field each data source comes from, for messages.
SOURCE_SETTINGS: Final = {
    "dataset": "spec.dataset.uri",
    "validation": "spec.dataset.split.validationUri",
    "test": "spec.dataset.split.testUri",
    "replay": "spec.dataset.replay.uri",
    "out_of_domain": "spec.evaluation.outOfDomain.uri",
    "forgetting": "spec.evaluation.forgetting.uri",
}

_INT_LABEL = re.compile(r"[+-]?[0-9]+")
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_WHITESPACE = re.compile(r"\s+")

GroupMode = Literal["required", "optional", "none"]
#: Role prefix of ``evaluation.slices`` columns while reading (never a task role).
_SLICE: Final = "slice:"


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
class _Row:
    """A decoded row before labels, PII and duplicates are settled."""

    ref: str
    fields: dict[str, Any]
    label: str | None = None
    """The label's name as written (classification)."""
    group: str | None = None
    slices: dict[str, str] = field(default_factory=dict)


@dataclass
class _Kept:
    """A cleaned example with where it came from, and its content key (label aside, folded
    as ``dedupe`` folds), computed once for the leak and label-conflict checks."""

    ref: str
    example: Example
    source: str
    content: str


@dataclass
class _Labels:
    """The classes, decided from the training data (``dataset.uri``).

    All-integer labels are ids and keep their values, so a model's outputs mean the same
    across retrains even when a class is missing from one data drop; anything else is a
    name, mapped to ids in sorted order.
    """

    integer: bool
    names: list[str]
    seen: set[str] = field(default_factory=set)

    @classmethod
    def from_names(cls, raw: Iterable[str]) -> _Labels:
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


def prepare_data(
    spec: FineTuneJobSpec,
    fetch: Callable[[str], list[Path]],
    *,
    count_tokens: Callable[[Example], int] | None = None,
) -> PreparedData:
    """Read, validate, clean and split the data of ``spec``.

    ``fetch`` turns a data URI into local files (a prefix: every data file under it);
    ``count_tokens`` measures an example for ``cleaning.maxTokens`` (None: no length check).
    Raises :class:`InvalidDataError` (a :class:`DataValidationError` once a report exists).
    """
    return _Pipeline(spec, fetch, count_tokens).run()


class _Pipeline:
    """One preparation: the spec's settings, the report being filled, and the steps in order."""

    def __init__(
        self,
        spec: FineTuneJobSpec,
        fetch: Callable[[str], list[Path]],
        count_tokens: Callable[[Example], int] | None,
    ) -> None:
        self.spec = spec
        self.fetch = fetch
        self.count_tokens = count_tokens
        self.task = spec.task
        self.roles = spec.columns()
        self.cleaning = spec.dataset.cleaning
        self.pii_action = spec.dataset.screening.pii
        fairness = spec.evaluation.fairness
        self.group_column = fairness.group_column if fairness is not None else None
        self.report = ValidationReport(task=spec.task, split_seed=spec.dataset.split.seed)
        self.report.pii = PiiReport(self.pii_action)
        self.pii_refs: list[str] = []
        self.pii_kinds: Counter[str] = Counter()
        self._length_rule = count_tokens is not None and self.cleaning.max_tokens is not None

    # --- the steps ----------------------------------------------------------------------

    def run(self) -> PreparedData:
        ds = self.spec.dataset
        split = ds.split
        evaluation = self.spec.evaluation
        replay_uri = ds.replay.uri if ds.replay is not None and ds.replay.ratio > 0 else None

        # 1. Read every source first: a wrong column name anywhere fails before any work.
        main_rows = self._read("dataset", ds.uri, "required")
        val_rows = self._read("validation", split.validation_uri, "required") if split.validation_uri else None
        test_rows = self._read("test", split.test_uri, "required") if split.test_uri else None
        ood_rows = (
            self._read("out_of_domain", evaluation.out_of_domain.uri, "optional") if evaluation.out_of_domain else None
        )
        forget_rows = self._read("forgetting", evaluation.forgetting.uri, "none") if evaluation.forgetting else None
        replay_rows = self._read("replay", replay_uri, "none") if replay_uri else None

        # 2. Classes come from the training data; other sets are checked against them.
        labels = _Labels.from_names(r.label for r in main_rows if r.label is not None) if self._classify else None

        # 3. Clean each source the same way (PII findings of every source counted before failing).
        main = self._clean("dataset", main_rows, labels, training=True)
        val_uri = self._clean("validation", val_rows, labels) if val_rows is not None else None
        test_uri = self._clean("test", test_rows, labels) if test_rows is not None else None
        ood = self._clean("out_of_domain", ood_rows, labels) if ood_rows is not None else []
        forgetting = self._clean("forgetting", forget_rows, labels) if forget_rows is not None else []
        replay_pool = self._clean("replay", replay_rows, labels) if replay_rows is not None else []
        self._fail_on_pii()

        # 4. Split, and keep held-out content out of training.
        train, val, test = self._split(main, val_uri, test_uri)
        train = self._drop_leaks(train, val + test, "dataset")
        replay_pool = self._drop_leaks(replay_pool, val + test, "replay")
        self._require_rows(
            train=train,
            val=val,
            test=test,
            main=main,
            ood=ood,
            forgetting=forgetting,
            replay_pool=replay_pool,
            replay_uri=replay_uri,
        )

        # 5. Classes: distribution, balance policy.
        class_weights: list[float] | None = None
        if labels is not None:
            self._label_warnings(labels, main_rows, val_rows, test_rows, train)
            train, class_weights = self._balance(labels, train, val, test)

        # 6. Replay rows join training only, drawn per epoch (data.replay); counted in sizes.
        replay = self._replay(replay_pool, len(train), replay_uri)

        train_examples = [k.example for k in train]
        val_examples = [k.example for k in val]
        test_examples = [k.example for k in test]
        report = self.report
        report.sizes = {
            "train": len(train_examples) + (replay.rows_per_epoch if replay is not None else 0),
            "validation": len(val_examples),
            "test": len(test_examples),
        }
        if evaluation.out_of_domain is not None:
            report.sizes["out_of_domain"] = len(ood)
        if evaluation.forgetting is not None:
            report.sizes["forgetting"] = len(forgetting)
        self._group_report(val_examples, test_examples)
        # The user's data only: replay draws depend on the seed, and oversampled copies add nothing new.
        uids = sorted({e.uid for e in (*train_examples, *val_examples, *test_examples) if not e.replay})
        report.fingerprint = hashlib.sha256("\n".join(uids).encode()).hexdigest()
        return PreparedData(
            train=train_examples,
            validation=val_examples,
            test=test_examples,
            out_of_domain=[k.example for k in ood],
            forgetting=[k.example for k in forgetting],
            label_names=list(labels.names) if labels is not None else None,
            class_weights=class_weights,
            report=report,
            fingerprint=report.fingerprint,
            replay=replay,
        )

    @property
    def _classify(self) -> bool:
        return self.task == CLASSIFICATION

    def _fail(self, message: str) -> DataValidationError:
        return DataValidationError(message, self.report)

    # --- reading and decoding -----------------------------------------------------------

    def _read(self, name: str, uri: str | None, group: GroupMode) -> list[_Row]:
        assert uri is not None
        src = self.report.source(name, uri)
        setting = SOURCE_SETTINGS.get(name, name)
        try:
            paths = sorted(self.fetch(uri))
        except InvalidDataError as exc:  # name the field to change; fetch only knows the URI
            raise InvalidDataError(f"{setting}: {exc.message}") from None
        if not paths:
            raise InvalidDataError(f"{setting}: no data files at {uri}")
        columns = [Column(role, col, f"dataset.columns.{role}") for role, col in self.roles.items()]
        if self.group_column is not None and group != "none":
            columns.append(
                Column("group", self.group_column, "evaluation.fairness.groupColumn", required=group == "required")
            )
        if group != "none":  # slice columns travel where the group column does, always optional
            columns += [
                Column(f"{_SLICE}{name}", name, "evaluation.slices", required=False)
                for name in self.spec.evaluation.slices
            ]
        headerless_ok = self._classify and len(columns) == len(self.roles)
        rows: list[_Row] = []
        for path, shown in zip(paths, display_names(paths), strict=True):
            loaded = load_file(
                path,
                shown,
                self.spec.dataset.format,
                columns,
                allow_headerless=headerless_ok,
                max_row_bytes=self.cleaning.max_row_bytes,
            )
            src.files.append(FileStats(shown, loaded.format, len(loaded.rows), loaded.header))
            for raw in loaded.rows:
                if raw.problem is not None:
                    src.drop(raw.reason, raw.ref, raw.problem)
                    continue
                row = self._decode(raw.ref, raw.values, src)
                if row is not None:
                    rows.append(row)
        return rows

    def _decode(self, ref: str, values: dict[str, Any], src: SourceReport) -> _Row | None:
        """Role values as text (messages parsed); drops undecodable, empty and label-less rows."""
        fields: dict[str, Any] = {}
        chat_problem: str | None = None
        for role in self.roles:
            value = values.get(role)
            if role == "label":
                continue
            if role == "messages":
                messages, problem = _parse_messages(value)
                if messages is None:
                    src.drop("undecodable", ref, problem)
                    return None
                fields[role] = messages
                chat_problem = problem
                continue
            text = _as_text(value)
            if text is None:
                src.drop("undecodable", ref, f"{role} is a {type(value).__name__}, not text")
                return None
            if has_bad_text(text):
                src.drop("undecodable", ref, "invalid UTF-8")
                return None
            fields[role] = text
        if self.cleaning.drop_empty and _is_empty(fields):
            src.drop("empty", ref)
            return None
        if chat_problem is not None:
            src.drop("undecodable", ref, chat_problem)
            return None
        label: str | None = None
        if self._classify:
            label, problem = _label_name(values.get("label"))
            if label is None:
                src.drop("unknown_label", ref, problem)
                return None
        group = values.get("group")
        group_name = None if group is None or (isinstance(group, str) and not group.strip()) else str(group).strip()
        slices = {
            key.removeprefix(_SLICE): str(value).strip()
            for key, value in values.items()
            if key.startswith(_SLICE) and value is not None and str(value).strip()
        }
        return _Row(ref, fields, label, group_name, slices)

    # --- cleaning -----------------------------------------------------------------------

    def _clean(self, name: str, rows: list[_Row], labels: _Labels | None, *, training: bool = False) -> list[_Kept]:
        """Labels to ids, minChars, PII, duplicates, maxTokens, in that order (cheap checks first;
        tokens are counted only for rows that survive everything else)."""
        src = self.report.sources[name]
        dedupe = self.cleaning.dedupe
        min_chars = self.cleaning.min_chars
        seen_exact: dict[str, str] = {}
        seen_normalized: dict[str, str] = {}
        kept: list[_Kept] = []
        for row in rows:
            fields = row.fields
            label_name: str | None = None
            if labels is not None and row.label is not None:
                label_name = labels.canonical(row.label)
                if label_name is None:
                    src.drop("unknown_label", row.ref, _label_problem(row.label, "is not a class id (ids start at 0)"))
                    continue
                if label_name not in labels.seen:
                    src.drop("unknown_label", row.ref, _label_problem(label_name, "is not among the training labels"))
                    continue
            if min_chars is not None:
                length = len(_input_text(fields).strip())
                if length < min_chars:
                    src.drop("too_short", row.ref, f"{length} chars")
                    continue
            if self.pii_action != "off":
                masked, kinds = _mask_fields(fields)
                if kinds:
                    self.report.pii.add(_qualified(name, row.ref), dict(kinds))
                    if self.pii_action == "drop":
                        src.drop("pii", row.ref, ", ".join(sorted(kinds)))
                        continue
                    if self.pii_action == "fail":
                        self.pii_refs.append(_qualified(name, row.ref))
                        self.pii_kinds.update(kinds)
                        continue
                    fields = masked
            keyed = dict(fields)
            if label_name is not None:
                keyed["label"] = label_name
            exact = _canonical(keyed)
            folded = _normalized_fields(fields) if dedupe == "normalized" else fields
            content = _canonical(folded)
            if dedupe != "off":
                first = seen_exact.get(exact)
                if first is not None:
                    src.drop("duplicate_exact", row.ref, f"same as {first}")
                    continue
                if dedupe == "normalized":
                    normalized = content if label_name is None else _canonical({**folded, "label": label_name})
                    first = seen_normalized.get(normalized)
                    if first is not None:
                        src.drop("duplicate_normalized", row.ref, f"same as {first}")
                        continue
                    seen_normalized[normalized] = row.ref
                seen_exact[exact] = row.ref
            out_fields = dict(fields)
            if labels is not None and label_name is not None:
                out_fields["label"] = labels.id_of(label_name)
            example = Example(out_fields, hashlib.sha256(exact.encode()).hexdigest(), row.group, slices=row.slices)
            if self._length_rule:
                assert self.count_tokens is not None and self.cleaning.max_tokens is not None
                n_tokens = self.count_tokens(example)
                if n_tokens > self.cleaning.max_tokens:
                    src.drop("too_long", row.ref, f"{n_tokens} tokens")
                    continue
            kept.append(_Kept(row.ref, example, name, content))
        src.kept = len(kept)
        if training and self._classify:
            self._conflicting_labels(kept, src)
        self._suspicious_drops(src)
        return kept

    def _fail_on_pii(self) -> None:
        if not self.pii_refs:
            return
        n = len(self.pii_refs)
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.pii_kinds.items()))
        refs = ", ".join(self.pii_refs[:MAX_REFS_IN_ERROR]) + (
            f", … ({n - MAX_REFS_IN_ERROR} more)" if n > MAX_REFS_IN_ERROR else ""
        )
        placeholders = ", ".join(PLACEHOLDERS.values())
        raise self._fail(
            f"personal data found in {n} row{'s' if n != 1 else ''} ({kinds}) and dataset.screening.pii is fail: "
            f"{refs}; set dataset.screening.pii to mask (replace finds with {placeholders}) or drop "
            "(remove those rows), or remove the data at its source"
        )

    # --- splitting ----------------------------------------------------------------------

    def _split(
        self, main: list[_Kept], val_uri: list[_Kept] | None, test_uri: list[_Kept] | None
    ) -> tuple[list[_Kept], list[_Kept], list[_Kept]]:
        split = self.spec.dataset.split
        v_share = split.validation if val_uri is None else 0.0
        t_share = split.test if test_uri is None else 0.0
        self.report.split_method = {
            "validation": "uri" if val_uri is not None else "hash",
            "test": "uri" if test_uri is not None else "hash",
        }
        train: list[_Kept] = []
        val: list[_Kept] = list(val_uri or [])
        test: list[_Kept] = list(test_uri or [])
        for kept in main:
            bucket = split_bucket(split.seed, kept.example.uid)
            if bucket < t_share:
                test.append(kept)
            elif bucket < t_share + v_share:
                val.append(kept)
            else:
                train.append(kept)
        return train, val, test

    def _drop_leaks(self, rows: list[_Kept], held_out: list[_Kept], source: str) -> list[_Kept]:
        """Drop rows whose content (label aside) is also held out: a separate validation/test
        set that overlaps training measures memory, not generalisation."""
        if not rows or not held_out:
            return rows
        held: dict[str, str] = {}
        for k in held_out:
            held.setdefault(k.content, _qualified(k.source, k.ref))
        src = self.report.sources[source]
        kept: list[_Kept] = []
        for k in rows:
            twin = held.get(k.content)
            if twin is not None:
                src.drop("leak", k.ref, f"same as {twin}")
            else:
                kept.append(k)
        src.kept -= len(rows) - len(kept)
        return kept

    def _require_rows(
        self,
        *,
        train: list[_Kept],
        val: list[_Kept],
        test: list[_Kept],
        main: list[_Kept],
        ood: list[_Kept],
        forgetting: list[_Kept],
        replay_pool: list[_Kept],
        replay_uri: str | None,
    ) -> None:
        """Every set the spec asks for must have rows; each message says what to change."""
        sources = self.report.sources
        src = sources["dataset"]
        uri = self.spec.dataset.uri
        if not train:
            if src.rows_read == 0:
                files = ", ".join(f.file for f in src.files)
                raise self._fail(f"no rows in {uri} (files: {files})")
            if not main:
                raise self._fail(f"no training rows left after cleaning {uri}: {src.drop_summary()}")
            raise self._fail(
                f"no training rows: of {len(main):,} rows left after cleaning {uri}, none landed in the training "
                f"split ({src.drop_summary() or 'nothing dropped'}); add rows or lower split.validation/split.test"
            )
        split = self.spec.dataset.split
        for which, rows, share, uri_set in (
            ("validation", val, split.validation, split.validation_uri),
            ("test", test, split.test, split.test_uri),
        ):
            if rows:
                if len(rows) < SMALL_SPLIT:
                    self.report.warnings.append(
                        f"{which} split has only {len(rows)} rows: its metrics are too noisy to rely on"
                    )
                continue
            if uri_set is not None:
                dropped = sources[which].drop_summary() or "no rows"
                raise self._fail(f"{which} split is empty: no usable rows in {uri_set} ({dropped})")
            if share > 0:
                raise self._fail(
                    f"{which} split is empty: split.{which} {share:g} of {len(main):,} rows took none; add rows, "
                    f"raise split.{which}, give split.{which}Uri, or set split.{which} to 0"
                )
        checks = (
            ("out_of_domain", ood, self.spec.evaluation.out_of_domain is not None, "evaluation.outOfDomain"),
            ("forgetting", forgetting, self.spec.evaluation.forgetting is not None, "evaluation.forgetting"),
            ("replay", replay_pool, replay_uri is not None, "dataset.replay"),
        )
        for which, rows, wanted, setting in checks:
            if wanted and not rows:
                s = sources[which]
                raise self._fail(
                    f"{which.replace('_', '-')} data {s.uri} has no usable rows "
                    f"({s.drop_summary() or 'no rows'}); fix the data or remove {setting}"
                )

    # --- labels and balance -------------------------------------------------------------

    def _conflicting_labels(self, kept: list[_Kept], src: SourceReport) -> None:
        labels_of: dict[str, set[Any]] = defaultdict(set)
        first_ref: dict[str, str] = {}
        for k in kept:
            labels_of[k.content].add(k.example.fields["label"])
            first_ref.setdefault(k.content, k.ref)
        conflicts = [first_ref[key] for key, labels in labels_of.items() if len(labels) > 1]
        if conflicts:
            self.report.warnings.append(
                f"{len(conflicts)} texts in {src.uri} appear with different labels (e.g. {', '.join(conflicts[:5])}); "
                "all are kept, so the model sees contradicting examples"
            )

    def _label_warnings(
        self,
        labels: _Labels,
        main_rows: list[_Row],
        val_rows: list[_Row] | None,
        test_rows: list[_Row] | None,
        train: list[_Kept],
    ) -> None:
        totals: Counter[str] = Counter()
        for rows in (main_rows, val_rows or [], test_rows or []):
            for r in rows:
                name = labels.canonical(r.label) if r.label is not None else None
                if name is not None:
                    totals[name] += 1
        in_train = {labels.names[k.example.fields["label"]] for k in train}
        singles = sorted(n for n in labels.seen if totals[n] == 1)
        if singles:
            self.report.warnings.append(
                f"label{'s' if len(singles) > 1 else ''} {_names(singles)} "
                f"{'have' if len(singles) > 1 else 'has'} a single example in total: "
                "nothing to learn from or to test on"
            )
        held_only = sorted(n for n in labels.seen if n not in in_train)
        if held_only:
            self.report.warnings.append(
                f"label{'s' if len(held_only) > 1 else ''} {_names(held_only)} "
                f"{'are' if len(held_only) > 1 else 'is'} in validation/test only: the model cannot learn "
                f"{'them' if len(held_only) > 1 else 'it'}"
            )
        gaps = [n for n in labels.names if n not in labels.seen]
        if labels.integer and gaps:
            self.report.warnings.append(
                f"label ids {_names(gaps)} have no rows at all; the model still gets an output for each id up to "
                f"{labels.names[-1]}"
            )

    def _balance(
        self, labels: _Labels, train: list[_Kept], val: list[_Kept], test: list[_Kept]
    ) -> tuple[list[_Kept], list[float] | None]:
        counts = Counter(k.example.fields["label"] for k in train)
        names = labels.names

        def by_name(rows: list[_Kept]) -> dict[str, int]:
            c = Counter(k.example.fields["label"] for k in rows)
            return {names[i]: c.get(i, 0) for i in range(len(names)) if names[i] in labels.seen}

        present = {i: n for i, n in counts.items() if n > 0}
        ratio = max(present.values()) / min(present.values()) if present else None
        balance = self.spec.dataset.balance
        lab = LabelReport(
            names=list(names),
            train=by_name(train),
            imbalance_ratio=ratio,
            strategy=balance.strategy if balance is not None else None,
            max_imbalance_ratio=balance.max_imbalance_ratio if balance is not None else None,
            validation=by_name(val),
            test=by_name(test),
        )
        self.report.labels = lab
        if len(present) < 2:
            only = ", ".join(f"{names[i]}: {n:,}" for i, n in present.items())
            raise self._fail(
                f"only one label in the training split ({only}); a classifier needs at least two classes: "
                "check dataset.columns.label and the data"
            )
        assert ratio is not None
        if balance is None or ratio <= balance.max_imbalance_ratio:
            return train, None
        dist = ", ".join(f"{k}: {v:,}" for k, v in lab.train.items())
        if balance.strategy == "fail":
            raise self._fail(
                f"class imbalance {ratio:.1f} exceeds dataset.balance.maxImbalanceRatio "
                f"{balance.max_imbalance_ratio:g} (training rows per label: {dist}); collect more rows of the rare "
                "classes, raise maxImbalanceRatio, or set balance.strategy to class-weights or oversample"
            )
        if balance.strategy == "class-weights":
            total = sum(present.values())
            weights = [total / (len(present) * present[i]) if i in present else 1.0 for i in range(len(names))]
            lab.action, lab.class_weights = "class-weights", weights
            return train, weights
        # oversample: copies of rare-class rows (seeded) until each class is within the ratio.
        target = math.ceil(max(present.values()) / balance.max_imbalance_ratio)
        rng = random.Random(f"{self.spec.hyperparameters.seed}:oversample")  # noqa: S311 - sampling, not security
        by_class: dict[int, list[_Kept]] = defaultdict(list)
        for k in train:
            by_class[k.example.fields["label"]].append(k)
        extra: list[_Kept] = []
        for i in sorted(present):
            need = target - present[i]
            if need > 0:
                picks = rng.choices(by_class[i], k=need)
                extra.extend(replace(k, example=replace(k.example, fields=dict(k.example.fields))) for k in picks)
                lab.oversampled[names[i]] = need
        lab.action = "oversample"
        return train + extra, None

    # --- replay and groups --------------------------------------------------------------

    def _replay(self, pool: list[_Kept], n_train: int, uri: str | None) -> ReplayMix | None:
        """The replay pool; each epoch draws its own rows from it (:mod:`.replay`)."""
        replay = self.spec.dataset.replay
        if uri is None or replay is None:
            return None
        wanted = replay_rows_wanted(replay.ratio, n_train)
        info = ReplayReport(uri, replay.ratio)
        self.report.replay = info
        mix = ReplayMix(
            [replace(k.example, fields=dict(k.example.fields), replay=True) for k in pool],
            wanted,
            self.spec.hyperparameters.seed,
        )
        if mix.with_replacement:
            info.with_replacement = True
            self.report.warnings.append(
                f"replay data has {len(pool):,} usable rows but {wanted:,} were wanted per epoch "
                f"(ratio {replay.ratio:g}); rows are repeated"
            )
        info.rows_added = wanted
        info.pool_rows = len(pool)
        return mix

    def _group_report(self, val: list[Example], test: list[Example]) -> None:
        if self.group_column is None:
            return
        for split, rows in (("validation", val), ("test", test)):
            if not rows:
                continue
            counts = Counter(e.group if e.group is not None else "(none)" for e in rows)
            self.report.groups[split] = dict(sorted(counts.items()))
            missing = counts.get("(none)", 0)
            if missing:
                self.report.warnings.append(
                    f"{missing} {split} rows have no value in fairness group column {self.group_column!r}; "
                    "they are left out of the per-group comparison"
                )

    def _suspicious_drops(self, src: SourceReport) -> None:
        """Many rows failing one structural check usually means a wrong mapping, not bad rows."""
        read = src.rows_read
        if not read:
            return
        for reason in ("too_large", "undecodable", "empty", "unknown_label"):
            drops = src.dropped.get(reason)
            if drops is not None and drops.count / read > SUSPICIOUS_DROP_SHARE and drops.count < read:
                advice = "check dataset.format and dataset.columns"
                if reason == "too_large":
                    advice += ", or raise dataset.cleaning.maxRowBytes if rows are this big on purpose"
                self.report.warnings.append(
                    f"{100 * drops.count / read:.0f} % of the rows of {src.uri} were dropped as {reason} "
                    f"(e.g. {', '.join(drops.examples[:3])}); {advice}"
                )


# --- helpers ----------------------------------------------------------------------------


def split_bucket(seed: int, uid: str) -> float:
    """A row's position in [0, 1), from its content and the split seed only (never its position)."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    return int.from_bytes(digest, "big") / 2**256


def normalize_text(text: str) -> str:
    """The ``dedupe: normalized`` form: compatibility-folded, case-folded, punctuation
    removed and whitespace collapsed, so "Great movie!" and "great  movie" are one row."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return _WHITESPACE.sub(" ", _PUNCTUATION.sub(" ", folded)).strip()


def _as_text(value: Any) -> str | None:
    """A cell as text; None when it is not text-like (a list, an object)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else str(value)
    return None


def _label_name(value: Any) -> tuple[str | None, str | None]:
    """A label cell as a class name, or (None, why not)."""
    if value is None:
        return None, "no label"
    if isinstance(value, bool):
        return ("true" if value else "false"), None
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float):
        if math.isnan(value):
            return None, "no label"
        if value.is_integer():
            return str(int(value)), None
        return None, f"label {value!r} is not a class"
    if isinstance(value, str):
        name = value.strip()
        if not name:
            return None, "no label"
        if has_bad_text(name):
            return None, "label is not valid UTF-8"
        return name, None
    return None, f"label is a {type(value).__name__}, not a class"


def _parse_messages(value: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """A chat conversation as ``[{role, content}]`` (other keys, such as ``name``, are dropped:
    chat templates disagree on them).

    Returns (None, why) when it cannot be read at all, (messages, why) when it reads but
    cannot be trained on (an unknown role, no assistant turn) — the caller decides whether
    an empty conversation is ``empty`` before calling the rest ``undecodable``.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        value = []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, "messages is not valid JSON"
    if not isinstance(value, list):
        return None, f"messages is a {type(value).__name__}, not a list of {{role, content}}"
    messages: list[dict[str, str]] = []
    problem: str | None = None
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            return None, f"message {i} is not an object"
        role, content = item.get("role"), item.get("content")
        content = "" if content is None else content
        if not isinstance(content, str):
            return None, f"message {i} content is a {type(content).__name__}, not text"
        if has_bad_text(content):
            return None, "invalid UTF-8"
        if not isinstance(role, str) or role not in CHAT_ROLES:
            quoted = _quoted(str(role))
            problem = problem or (
                f"message {i} has role {quoted}; use system, user or assistant"
                if quoted
                else f"message {i} has a role other than system, user or assistant (not shown: not a plain name)"
            )
        messages.append({"role": str(role), "content": content})
    if problem is None and not any(m["role"] == "assistant" for m in messages):
        problem = "no assistant turn to learn from"
    return messages, problem


def _is_empty(fields: dict[str, Any]) -> bool:
    """Whether any part of the row is blank. A conversation is empty when nothing in it has
    content, or when its assistant turns (what is learned) are all blank; one with user
    turns only is not empty but malformed, and reported as such."""
    for role, value in fields.items():
        if role == "messages":
            answers = [m["content"] for m in value if m["role"] == "assistant"]
            if not any(m["content"].strip() for m in value) or (answers and not any(a.strip() for a in answers)):
                return True
        elif isinstance(value, str) and not value.strip():
            return True
    return False


def _input_text(fields: dict[str, Any]) -> str:
    """What ``cleaning.minChars`` measures: the model's input (``text``, ``source``, a prompt with
    its completion, or a conversation's contents)."""
    if "messages" in fields:
        return "\n".join(m["content"] for m in fields["messages"])
    if "source" in fields:
        return str(fields["source"])
    if "prompt" in fields:
        return f"{fields['prompt']}{fields['completion']}"
    return str(fields.get("text", ""))


def _mask_fields(fields: dict[str, Any]) -> tuple[dict[str, Any], Counter[str]]:
    """Every text field (and every message's content) masked; labels are never screened."""
    found: Counter[str] = Counter()
    out: dict[str, Any] = {}
    for role, value in fields.items():
        if role == "messages":
            new_messages = []
            for m in value:
                content, kinds = mask_pii(m["content"])
                found.update(kinds)
                new_messages.append({"role": m["role"], "content": content})
            out[role] = new_messages
        elif role in TEXT_ROLES:
            text, kinds = mask_pii(value)
            found.update(kinds)
            out[role] = text
        else:
            out[role] = value
    return out, found


def _canonical(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _normalized_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role, value in fields.items():
        if role == "messages":
            out[role] = [{"role": m["role"], "content": normalize_text(m["content"])} for m in value]
        elif role in TEXT_ROLES:
            out[role] = normalize_text(value)
        else:
            out[role] = value
    return out


def _qualified(source: str, ref: str) -> str:
    return ref if source == "dataset" else f"{source} {ref}"


def _label_problem(label: str, what: str) -> str:
    quoted = _quoted(label)
    return f"label {quoted} {what}" if quoted else f"a label {what} (not shown: it is not a plain name)"


def _quoted(value: str, limit: int = 30) -> str | None:
    """A cell value quoted for a drop detail when it reads as a name (a label, a role), else
    None: details reach error messages, and a cell may hold any file's content."""
    return repr(value) if value and show_name(value, max_chars=limit) == value else None


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")
