"""Token lengths per split, and what ``hyperparameters.maxSeqLength`` cuts off.

Truncation is silent in the features (the tokenizer drops what does not fit), so a
``maxSeqLength`` too small for the data shows up only as a model that never saw the end of
its inputs. This stage measures it after the features are built: per split, percentiles of
the untruncated length in tokens and how many rows lost tokens (and how many).

It costs little: a row whose feature is shorter than ``maxSeqLength`` was not truncated, so
its feature length is its full length; only rows that reached the limit are tokenized again
without truncation. What counts as a row's length follows :mod:`tuneloop_trainer.features`:
the classifier's input, the causal model's whole sequence (prompt, answer and end-of-sequence
token, or the rendered conversation), and for seq2seq the source (the target's truncation
counts too: a row is truncated when either part is).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from transformers import PreTrainedTokenizerBase

from tuneloop_trainer.features import Feature, chat_segments, ensure_chat_template

if TYPE_CHECKING:
    from tuneloop_trainer.data import Example

#: Warn when more than this share of a split's rows is truncated: a few very long outliers
#: are normal, one row in twenty is a setting that does not fit the data.
TRUNCATION_WARNING_SHARE: Final = 0.05
#: Splits in report order.
SPLIT_ORDER: Final = ("train", "validation", "test", "out_of_domain", "forgetting")


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """The nearest-rank percentile (a length that occurs in the data, never an interpolation)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return int(sorted_values[rank - 1])


@dataclass
class SplitLengths:
    """One split's lengths in tokens before truncation, and what truncation cut."""

    rows: int
    lengths: list[int] = field(default_factory=list, repr=False)
    """Untruncated length of each row (the input; the source for seq2seq)."""
    target_lengths: list[int] = field(default_factory=list, repr=False)
    """Untruncated target lengths (seq2seq only)."""
    cuts: list[int] = field(default_factory=list, repr=False)
    """Tokens cut from each truncated row (one entry per truncated row)."""

    @property
    def truncated(self) -> int:
        return len(self.cuts)

    @property
    def share(self) -> float:
        return self.truncated / self.rows if self.rows else 0.0

    @staticmethod
    def _stats(values: list[int]) -> dict[str, int]:
        ordered = sorted(values)
        return {
            "p50": percentile(ordered, 50),
            "p90": percentile(ordered, 90),
            "p99": percentile(ordered, 99),
            "max": ordered[-1] if ordered else 0,
        }

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.rows, "tokens": self._stats(self.lengths)}
        if self.target_lengths:
            out["targetTokens"] = self._stats(self.target_lengths)
        out["truncated"] = {
            "rows": self.truncated,
            "share": round(self.share, 4),
            "meanTokensCut": round(sum(self.cuts) / len(self.cuts), 2) if self.cuts else 0.0,
            "maxTokensCut": max(self.cuts, default=0),
        }
        return out


@dataclass
class LengthReport:
    """Token lengths of every split against ``maxSeqLength``; goes into the validation report."""

    max_seq_length: int
    splits: dict[str, SplitLengths] = field(default_factory=dict)
    seconds: float = 0.0
    threshold: float = TRUNCATION_WARNING_SHARE

    def warnings(self) -> list[str]:
        """One warning per split where truncation is common (more than :attr:`threshold` of rows)."""
        out = []
        for name, split in self.splits.items():
            if split.rows and split.share > self.threshold:
                longest = split.to_dict()["tokens"]
                out.append(
                    f"maxSeqLength {self.max_seq_length} truncates {split.truncated:,} of {split.rows:,} {name} rows "
                    f"({100 * split.share:.1f} %, over the {100 * self.threshold:g} % warning threshold; "
                    f"{split.to_dict()['truncated']['meanTokensCut']:g} tokens cut on average, at most "
                    f"{max(split.cuts)}): the model never sees the end of those inputs. Their p90 length is "
                    f"{longest['p90']} and p99 {longest['p99']} tokens; raise hyperparameters.maxSeqLength "
                    f"(the model permitting) or shorten the data"
                )
        return out

    def summary_lines(self) -> list[str]:
        """One line per split, for the run log."""
        lines = []
        for name, split in self.splits.items():
            d = split.to_dict()
            t = d["tokens"]
            line = f"lengths ({name}, tokens): p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}"
            if "targetTokens" in d:
                tt = d["targetTokens"]
                line += f"; targets p50 {tt['p50']}, p90 {tt['p90']}, p99 {tt['p99']}, max {tt['max']}"
            cut = d["truncated"]
            if cut["rows"]:
                line += (
                    f"; maxSeqLength {self.max_seq_length} truncates {cut['rows']:,} rows ({100 * cut['share']:.1f} %, "
                    f"{cut['meanTokensCut']:g} tokens cut on average, at most {cut['maxTokensCut']})"
                )
            else:
                line += f"; nothing truncated at maxSeqLength {self.max_seq_length}"
            lines.append(line)
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "maxSeqLength": self.max_seq_length,
            "warningShare": self.threshold,
            "seconds": round(self.seconds, 3),
            "splits": {name: split.to_dict() for name, split in self.splits.items()},
        }


def _full_length(
    example: Example, task: str, tokenizer: PreTrainedTokenizerBase, columns: Mapping[str, str]
) -> tuple[int, int | None]:
    """A row's untruncated length in tokens, as :mod:`tuneloop_trainer.features` would build it
    without a limit (and the target's, for seq2seq)."""
    fields = example.fields

    def count(text: str, *, special: bool = True) -> int:
        return len(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])

    if task == "sequence-classification":
        return count(fields["text"]), None
    if task == "seq2seq":
        return count(fields["source"]), count(fields["target"])
    eos = 1 if tokenizer.eos_token_id is not None else 0
    if "messages" in columns:
        ensure_chat_template(tokenizer)
        return sum(count(text, special=False) for text, _ in chat_segments(tokenizer, fields["messages"])), None
    if "prompt" in columns:
        return count(fields["prompt"]) + count(fields["completion"], special=False) + eos, None
    return count(fields["text"]) + eos, None


def split_lengths(
    examples: Sequence[Example],
    features: Sequence[Feature],
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_len: int,
    columns: Mapping[str, str],
) -> SplitLengths:
    """Lengths of one split from its examples and the features built from them (same order)."""
    out = SplitLengths(rows=len(features))
    for example, feature in zip(examples, features, strict=True):
        kept = feature.length
        target_kept = len(feature.labels) if task == "seq2seq" and isinstance(feature.labels, list) else None
        # Below the limit nothing was cut: the feature's length is the row's length.
        if kept < max_len and (target_kept is None or target_kept < max_len):
            out.lengths.append(kept)
            if target_kept is not None:
                out.target_lengths.append(target_kept)
            continue
        full, target_full = _full_length(example, task, tokenizer, columns)
        full = max(full, kept)
        cut = full - kept
        out.lengths.append(full)
        if target_kept is not None:
            target_full = max(target_full or 0, target_kept)
            out.target_lengths.append(target_full)
            cut += target_full - target_kept
        if cut > 0:
            out.cuts.append(cut)
    return out


def measure_lengths(
    splits: Mapping[str, tuple[Sequence[Example], Sequence[Feature]]],
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    columns: Mapping[str, str],
) -> LengthReport:
    """The length report of every non-empty split (``name: (examples, features)``)."""
    start = time.perf_counter()
    report = LengthReport(max_seq_length=max_len)
    for name in sorted(splits, key=lambda n: SPLIT_ORDER.index(n) if n in SPLIT_ORDER else len(SPLIT_ORDER)):
        examples, features = splits[name]
        if features:
            report.splits[name] = split_lengths(examples, features, task, tokenizer, max_len=max_len, columns=columns)
    report.seconds = time.perf_counter() - start
    return report
