"""Length statistics: untruncated token lengths per split and what maxSeqLength cuts off.

The oracle for a row's full length is the same feature built with a limit it never reaches,
so the cheap path (only rows at the limit are tokenized again) is checked against the
features a user would get with a large enough maxSeqLength.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tests.harness.tiny_models import build_tiny_tokenizer
from tuneloop_trainer.data.report import ValidationReport
from tuneloop_trainer.features import build_features
from tuneloop_trainer.lengths import TRUNCATION_WARNING_SHARE, measure_lengths, percentile

pytestmark = pytest.mark.unit

UNLIMITED = 100_000


def ex(**fields: Any) -> Any:
    return SimpleNamespace(fields=fields, group=None)


def words(n: int) -> str:
    return " ".join(["cat", "dog", "sat", "mat"][i % 4] for i in range(n))


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 99) == 7
    assert percentile([], 50) == 0
    assert percentile([1, 2, 3, 10], 50) == 2


def _measure(examples: list[Any], task: str, tok: Any, max_len: int, columns: dict[str, str]) -> dict[str, Any]:
    feats = build_features(examples, task, tok, max_len, columns)
    return measure_lengths({"train": (examples, feats)}, task, tok, max_len, columns).to_dict()


def test_classification_lengths_and_truncation_match_untruncated_features() -> None:
    tok = build_tiny_tokenizer("bert")
    columns = {"text": "text", "label": "label"}
    examples = [ex(text=words(n), label=0) for n in (1, 2, 3, 4, 5, 6, 30, 40, 3, 2)]
    full = [f.length for f in build_features(examples, "sequence-classification", tok, UNLIMITED, columns)]
    max_len = 10
    report = _measure(examples, "sequence-classification", tok, max_len, columns)
    split = report["splits"]["train"]
    ordered = sorted(full)
    assert split["rows"] == 10
    assert split["tokens"] == {
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": max(full),
    }
    assert split["tokens"]["max"] == len(tok(words(40))["input_ids"]) > max_len  # not the truncated length
    cuts = [n - max_len for n in full if n > max_len]
    assert split["truncated"] == {
        "rows": len(cuts),
        "share": round(len(cuts) / 10, 4),
        "meanTokensCut": round(sum(cuts) / len(cuts), 2),
        "maxTokensCut": max(cuts),
    }
    assert report["maxSeqLength"] == max_len


@pytest.mark.parametrize(
    ("columns", "make"),
    [
        pytest.param({"text": "text"}, lambda n: ex(text=words(n)), id="text"),
        pytest.param(
            {"prompt": "prompt", "completion": "completion"},
            lambda n: ex(prompt=words(n), completion=" " + words(n // 2 + 1)),
            id="prompt-completion",
        ),
        pytest.param(
            {"messages": "messages"},
            lambda n: ex(
                messages=[{"role": "user", "content": words(n)}, {"role": "assistant", "content": words(n // 3 + 1)}]
            ),
            id="chat",
        ),
    ],
)
def test_causal_full_lengths_equal_features_without_a_limit(columns: dict[str, str], make: Any) -> None:
    tok = build_tiny_tokenizer("gpt2")
    examples = [make(n) for n in (2, 5, 9, 14, 20, 33)]
    full = [f.length for f in build_features(examples, "causal-lm", tok, UNLIMITED, columns)]
    max_len = 16
    split = _measure(examples, "causal-lm", tok, max_len, columns)["splits"]["train"]
    assert split["tokens"]["max"] == max(full)
    assert split["tokens"]["p50"] == percentile(sorted(full), 50)
    assert split["truncated"]["rows"] == sum(n > max_len for n in full) > 0
    assert split["truncated"]["maxTokensCut"] == max(full) - max_len


def test_seq2seq_counts_a_truncated_target() -> None:
    tok = build_tiny_tokenizer("t5")
    columns = {"source": "source", "target": "target"}
    # Short sources, one long target: the row is truncated although its input fits.
    examples = [ex(source=words(3), target=words(2)), ex(source=words(3), target=words(30))]
    unlimited = build_features(examples, "seq2seq", tok, UNLIMITED, columns)
    max_len = 12
    split = _measure(examples, "seq2seq", tok, max_len, columns)["splits"]["train"]
    long_target = len(unlimited[1].labels)
    assert long_target > max_len
    assert split["targetTokens"]["max"] == long_target
    assert split["tokens"]["max"] == unlimited[0].length
    assert split["truncated"]["rows"] == 1
    assert split["truncated"]["maxTokensCut"] == long_target - max_len


def test_warning_only_when_truncation_is_common() -> None:
    tok = build_tiny_tokenizer("bert")
    columns = {"text": "text", "label": "label"}
    max_len = 8
    # 1 long row in 20 is 5 %: not over the threshold. 2 in 20 is.
    rare = [ex(text=words(2), label=0) for _ in range(19)] + [ex(text=words(20), label=0)]
    common = [ex(text=words(2), label=0) for _ in range(18)] + [ex(text=words(20), label=0) for _ in range(2)]
    assert TRUNCATION_WARNING_SHARE == 0.05
    for examples, warned in ((rare, False), (common, True)):
        feats = build_features(examples, "sequence-classification", tok, max_len, columns)
        report = measure_lengths({"validation": (examples, feats)}, "sequence-classification", tok, max_len, columns)
        warnings = report.warnings()
        assert bool(warnings) is warned
        short, long = len(tok(words(2))["input_ids"]), len(tok(words(20))["input_ids"])
        # Nearest rank: the 90th percentile of 20 rows is the 18th, still a short one.
        assert report.summary_lines()[0].startswith(
            f"lengths (validation, tokens): p50 {short}, p90 {short}, p99 {long}, max {long}; maxSeqLength 8 truncates"
        )
    (warning,) = warnings
    assert warning.startswith("maxSeqLength 8 truncates 2 of 20 validation rows (10.0 %")
    assert "raise hyperparameters.maxSeqLength" in warning


def test_nothing_truncated_is_said_and_empty_splits_are_left_out() -> None:
    tok = build_tiny_tokenizer("bert")
    columns = {"text": "text", "label": "label"}
    examples = [ex(text=words(3), label=1)]
    feats = build_features(examples, "sequence-classification", tok, 64, columns)
    report = measure_lengths(
        {"test": (examples, feats), "train": (examples, feats), "out_of_domain": ([], [])},
        "sequence-classification",
        tok,
        64,
        columns,
    )
    assert list(report.splits) == ["train", "test"]
    assert report.warnings() == []
    assert report.summary_lines()[0].endswith("; nothing truncated at maxSeqLength 64")
    validation = ValidationReport(task="sequence-classification")
    validation.lengths = report.to_dict()
    assert validation.to_dict()["lengths"]["splits"]["test"]["truncated"]["rows"] == 0
