"""What a run reads: the base model and the training data (columns, splits, cleaning,
class balance, PII screening, replay and augmentation)."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field

from tuneloop.api.types import ApiModel, ColumnName, DataUri, ModelUri, ObjectName, Ratio


class SecretReference(ApiModel):
    """A Secret in the FineTuneJob's namespace. Only its name is ever written in a spec:
    credentials are read from the Secret into the trainer's environment, never copied
    into specs, status, events or logs."""

    name: ObjectName
    """Name of the Secret."""


class ModelSource(ApiModel):
    """The base model to fine-tune."""

    uri: ModelUri
    """``hf://org/name`` (Hugging Face Hub, or its local cache when offline),
    ``s3://bucket/prefix/`` (a directory saved with ``save_pretrained``) or ``file:///dir``.
    A revision may be appended to an ``hf://`` URI as ``@revision``."""
    revision: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._/-]+$")] | None = None
    """Branch, tag or commit of an ``hf://`` model; pin a commit for reproducible runs."""
    secret_ref: SecretReference | None = None
    """Secret with key ``HF_TOKEN`` for gated or private Hugging Face models."""


class DatasetColumns(ApiModel):
    """Which columns (or JSON keys) hold what. Which ones apply depends on ``spec.task``:
    ``text``+``label`` for sequence-classification; ``messages`` (chat), or
    ``prompt``+``completion``, or ``text`` for causal-lm; ``source``+``target`` for seq2seq.
    Omitted columns take their own name (``text``, ``label``, …)."""

    text: ColumnName | None = None
    """Input text (classification) or raw training text (causal-lm)."""
    label: ColumnName | None = None
    """Class label, as an integer id or a string (strings are mapped to ids and recorded)."""
    prompt: ColumnName | None = None
    """Prompt of a prompt/completion pair (causal-lm); the loss ignores its tokens."""
    completion: ColumnName | None = None
    """Completion of a prompt/completion pair (causal-lm); only these tokens are learned."""
    messages: ColumnName | None = None
    """Chat conversation as a list of ``{role, content}`` (causal-lm), rendered with the
    tokenizer's chat template; only assistant turns are learned."""
    source: ColumnName | None = None
    """Input sequence (seq2seq), e.g. the article to summarize."""
    target: ColumnName | None = None
    """Output sequence (seq2seq), e.g. the summary."""


class DatasetSplit(ApiModel):
    """How validation and test sets are made. Rows are assigned by a hash of their content
    and ``seed``, so a row never moves between splits when data is appended — retraining
    on grown data never leaks old test rows into training."""

    validation: Ratio = 0.1
    """Fraction of rows held out for validation (early stopping, model selection)."""
    test: Ratio = 0.1
    """Fraction of rows held out for the final test metrics and promotion gates."""
    seed: Annotated[int, Field(ge=0)] = 42
    """Salt of the split hash; change it only to draw a different split."""
    validation_uri: DataUri | None = None
    """A separate validation set; then ``validation`` is ignored and no validation rows are
    taken from ``dataset.uri``."""
    test_uri: DataUri | None = None
    """A separate test set; then ``test`` is ignored and no test rows are taken from ``dataset.uri``."""


class DataCleaning(ApiModel):
    """Cleaning applied before training; every dropped row is counted, with its reason,
    in the validation report."""

    drop_empty: bool = True
    """Drop rows whose input or output is empty or whitespace."""
    dedupe: Literal["off", "exact", "normalized"] = "normalized"
    """Drop duplicates: ``exact`` text, or ``normalized`` (case, whitespace and punctuation folded)."""
    min_chars: Annotated[int, Field(ge=0)] | None = None
    """Drop rows whose input is shorter than this many characters."""
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    """Drop rows longer than this many tokens instead of truncating them at ``maxSeqLength``."""
    max_row_bytes: Annotated[int, Field(gt=0)] = 1048576
    """Largest row, in bytes, that is read at all (default 1 MiB). A bigger row is dropped
    and counted under the drop reason ``too_large`` in the validation report, with its
    ``file:line`` reference, so one huge row cannot exhaust the trainer's memory or time.
    JSON lines, CSV and TSV are read line by line with a bounded read: the rest of an oversize
    line (or CSV record) is skipped without being kept. Parquet is columnar and JSON-array
    files are parsed whole, so there each row is checked after reading (the bytes of the
    values in the configured columns); prefer JSON lines for very large data."""


class ClassBalance(ApiModel):
    """Class-imbalance policy (sequence-classification only)."""

    max_imbalance_ratio: Annotated[float, Field(ge=1.0)] = 10.0
    """Largest allowed ratio between the most and the least frequent class."""
    strategy: Literal["fail", "class-weights", "oversample"] = "fail"
    """Beyond the ratio: ``fail`` the run, weight the loss by inverse class frequency
    (``class-weights``), or ``oversample`` rare classes in the training split."""


class DataScreening(ApiModel):
    """Screening for personal data before it reaches a model."""

    pii: Literal["mask", "drop", "fail", "off"] = "mask"
    """What to do with rows that contain emails, phone numbers, card numbers (Luhn-checked)
    or IP addresses: replace them with a placeholder, drop the row, fail the run, or nothing."""


class ReplayData(ApiModel):
    """General-domain data mixed into training against catastrophic forgetting."""

    uri: DataUri | None = None
    """General-domain data, in the same column layout as the training data."""
    ratio: Ratio = 0.1
    """Fraction of each training epoch drawn from the replay data."""


AugmentOperation = Literal["swap", "delete", "insert"]
AUGMENT_OPERATIONS: Final[tuple[AugmentOperation, ...]] = ("swap", "delete", "insert")


class Augmentation(ApiModel):
    """Opt-in augmentation of the training split: extra rows made by perturbing the words of
    training inputs. Validation, test, out-of-domain and replay rows are never augmented, and
    the data fingerprint and data profile describe the user's rows only."""

    method: Literal["eda"] = "eda"
    """``eda``: easy data augmentation (Wei and Zou, 2019) without synonyms: each new row is a
    copy of a training row with some of its words swapped, deleted, or repeated at another
    place. Synonym replacement is left out because it needs WordNet, which trainer pods
    cannot download. What is perturbed: the ``text`` (sequence-classification), the
    ``source`` (seq2seq) or the ``prompt`` (causal-lm with prompt/completion); labels,
    targets and completions stay as written."""
    ratio: Annotated[float, Field(gt=0.0, le=16.0)] = 1.0
    """New rows per distinct training row: ``1`` adds one variant of every row, ``0.5`` one
    variant of a seeded half of them, ``2`` two variants of each."""
    strength: Annotated[float, Field(gt=0.0, le=0.5)] = 0.1
    """Share of a row's words each operation changes (at least one word)."""
    operations: Annotated[list[AugmentOperation], Field(min_length=1, max_length=3)] = Field(
        default_factory=lambda: list(AUGMENT_OPERATIONS)
    )
    """Operations to draw from, one per new row: ``swap`` two words, ``delete`` words (never
    all of them), ``insert`` a copy of one of the row's words at another place."""
    seed: Annotated[int, Field(ge=0)] | None = None
    """Seed of the draws; omit to use ``hyperparameters.seed``. Each row's variants depend on
    the seed and the row's content only, so a resumed run trains on the same rows."""


class Dataset(ApiModel):
    """The training data."""

    uri: DataUri
    """A file, or a prefix whose data files are all read (``s3://bucket/reviews/``)."""
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    """File format; ``auto`` goes by file extension."""
    columns: DatasetColumns = Field(default_factory=DatasetColumns)
    """Column mapping for the task."""
    split: DatasetSplit = Field(default_factory=DatasetSplit)
    """Validation and test splits."""
    cleaning: DataCleaning = Field(default_factory=DataCleaning)
    """Cleaning rules."""
    balance: ClassBalance | None = None
    """Class-imbalance policy; omit to only report the label distribution."""
    screening: DataScreening = Field(default_factory=DataScreening)
    """PII screening (on by default: masks)."""
    replay: ReplayData | None = None
    """General-domain replay data against forgetting."""
    label_issues: Literal["off", "report", "drop"] = "off"
    """Label-error detection (sequence-classification only). Before training, a linear probe
    (logistic regression on the frozen base model's mean-pooled features, the same one
    ``evaluation.baselines`` uses; one forward pass over the data) predicts every training row
    out of fold (5 folds, fewer when a class has fewer rows), and Cleanlab's
    ``find_label_issues`` flags the rows whose given label the probe finds unlikely. ``report``
    lists them in the validation report (split index, a PII-masked excerpt of the text, the
    given and the suggested label, the probe's confidence in the given label; at most 50
    rows, plus the total); ``drop`` also removes them from the training split, never from
    validation or test (so the metrics stay comparable). Needs at least 2 rows per class in
    training. Its cost in seconds is in the report."""
    augmentation: Augmentation | None = None
    """Augmentation of the training split (off when omitted); the validation report says how
    many rows it added."""
