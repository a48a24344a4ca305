"""From data URIs to cleaned, labelled, split examples, before any GPU time is spent.

Most failed fine-tuning runs fail on data, and the cheapest place to find out is here:
a wrong column name, labels that do not match, personal data, a split too small to
measure anything. So this step reads every configured source (training data, separate
validation/test sets, replay, out-of-domain and forgetting sets), cleans each the same
way, and either returns :class:`PreparedData` with a :class:`ValidationReport` or raises
:class:`InvalidDataError` naming the rows and what to change. Invalid data is a permanent
failure: retrying the same data cannot help.

This module runs the steps in order and fills the report; the steps live beside it:
decoding cells (:mod:`.decode`), cleaning (:mod:`.clean`), classes and balance
(:mod:`.labels`) and content-hashed splits (:mod:`.split`).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Final, Literal

from tuneloop.api.spec import FineTuneJobSpec
from tuneloop_trainer.data.clean import Cleaner
from tuneloop_trainer.data.decode import SLICE, Row, decode_row
from tuneloop_trainer.data.examples import DataValidationError, Example, Kept, PreparedData
from tuneloop_trainer.data.labels import Labels, balance_classes, conflicting_labels, label_warnings
from tuneloop_trainer.data.loading import display_names, load_file
from tuneloop_trainer.data.replay import ReplayMix, replay_rows_wanted
from tuneloop_trainer.data.report import FileStats, PiiReport, ReplayReport, SourceReport, ValidationReport
from tuneloop_trainer.data.rows import Column
from tuneloop_trainer.data.split import drop_leaks, split_rows
from tuneloop_trainer.errors import InvalidDataError

CLASSIFICATION: Final = "sequence-classification"
#: Held-out splits smaller than this give metrics too noisy to gate on.
SMALL_SPLIT: Final = 20
#: A share of rows dropped for one reason above which the column mapping is suspect.
SUSPICIOUS_DROP_SHARE: Final = 0.1

#: The spec field each data source comes from, for messages.
SOURCE_SETTINGS: Final = {
    "dataset": "spec.dataset.uri",
    "validation": "spec.dataset.split.validationUri",
    "test": "spec.dataset.split.testUri",
    "replay": "spec.dataset.replay.uri",
    "out_of_domain": "spec.evaluation.outOfDomain.uri",
    "forgetting": "spec.evaluation.forgetting.uri",
}


GroupMode = Literal["required", "optional", "none"]


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
        self.task = spec.task
        self.roles = spec.columns()
        self.cleaning = spec.dataset.cleaning
        fairness = spec.evaluation.fairness
        self.group_column = fairness.group_column if fairness is not None else None
        self.report = ValidationReport(task=spec.task, split_seed=spec.dataset.split.seed)
        pii_action = spec.dataset.screening.pii
        self.report.pii = PiiReport(pii_action)
        self.cleaner = Cleaner(self.cleaning, pii_action, self.report, count_tokens)

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
        labels = Labels.from_names(r.label for r in main_rows if r.label is not None) if self._classify else None

        # 3. Clean each source the same way (PII findings of every source counted before failing).
        main = self._clean("dataset", main_rows, labels, training=True)
        val_uri = self._clean("validation", val_rows, labels) if val_rows is not None else None
        test_uri = self._clean("test", test_rows, labels) if test_rows is not None else None
        ood = self._clean("out_of_domain", ood_rows, labels) if ood_rows is not None else []
        forgetting = self._clean("forgetting", forget_rows, labels) if forget_rows is not None else []
        replay_pool = self._clean("replay", replay_rows, labels) if replay_rows is not None else []
        self.cleaner.fail_on_pii()

        # 4. Split, and keep held-out content out of training.
        train, val, test = split_rows(split, main, val_uri, test_uri, self.report)
        train = drop_leaks(train, val + test, self.report, "dataset")
        replay_pool = drop_leaks(replay_pool, val + test, self.report, "replay")
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
            held_rows = itertools.chain(main_rows, val_rows or [], test_rows or [])
            self.report.warnings.extend(label_warnings(labels, held_rows, train))
            train, class_weights = balance_classes(
                labels,
                train,
                val,
                test,
                balance=ds.balance,
                seed=self.spec.hyperparameters.seed,
                report=self.report,
            )

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

    # --- reading ------------------------------------------------------------------------

    def _read(self, name: str, uri: str | None, group: GroupMode) -> list[Row]:
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
                Column(f"{SLICE}{name}", name, "evaluation.slices", required=False)
                for name in self.spec.evaluation.slices
            ]
        headerless_ok = self._classify and len(columns) == len(self.roles)
        rows: list[Row] = []
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
                row = decode_row(
                    raw.ref,
                    raw.values,
                    src,
                    self.roles,
                    drop_empty=self.cleaning.drop_empty,
                    classify=self._classify,
                )
                if row is not None:
                    rows.append(row)
        return rows

    # --- cleaning and requirements ------------------------------------------------------

    def _clean(self, name: str, rows: list[Row], labels: Labels | None, *, training: bool = False) -> list[Kept]:
        """Clean one source's rows (:class:`~.clean.Cleaner`), then warn about what the drops suggest."""
        kept = self.cleaner.clean(name, rows, labels)
        src = self.report.sources[name]
        if training and self._classify:
            warning = conflicting_labels(kept, src)
            if warning is not None:
                self.report.warnings.append(warning)
        self._suspicious_drops(src)
        return kept

    def _require_rows(
        self,
        *,
        train: list[Kept],
        val: list[Kept],
        test: list[Kept],
        main: list[Kept],
        ood: list[Kept],
        forgetting: list[Kept],
        replay_pool: list[Kept],
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

    # --- replay and groups --------------------------------------------------------------

    def _replay(self, pool: list[Kept], n_train: int, uri: str | None) -> ReplayMix | None:
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
