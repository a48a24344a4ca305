"""The data pipeline end to end on small synthetic files: every cleaning rule, the splits,
balance, replay, the held-out sets, the report and each error message."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.manifests import ROOT
from tuneloop.api.spec import FineTuneJobSpec
from tuneloop_trainer.data import (
    DataValidationError,
    Example,
    PreparedData,
    ValidationReport,
    normalize_text,
    prepare_data,
    split_bucket,
)
from tuneloop_trainer.errors import InvalidDataError

pytestmark = pytest.mark.unit

SST2 = ROOT.parent / "shared" / "data" / "sst2"
NO_SPLIT = {"validation": 0, "test": 0}


def fetch(uri: str) -> list[Path]:
    """The storage layer's job, for file:// URIs: a file, or a folder's files in sorted order."""
    path = Path(uri.removeprefix("file://"))
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def uri(path: Path) -> str:
    return f"file://{path}"


def make_spec(
    data: Path,
    task: str = "sequence-classification",
    *,
    split: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    seed: int = 42,
    **dataset: Any,
) -> FineTuneJobSpec:
    doc: dict[str, Any] = {
        "task": task,
        "model": {"uri": "hf://org/model"},
        "dataset": {"uri": uri(data), "split": NO_SPLIT if split is None else split, **dataset},
        "hyperparameters": {"seed": seed},
        "output": {"uri": "file:///tmp/out/"},
    }
    if evaluation:
        doc["evaluation"] = evaluation
    return FineTuneJobSpec.model_validate(doc)


def prepare(spec: FineTuneJobSpec, **kwargs: Any) -> PreparedData:
    return prepare_data(spec, fetch, **kwargs)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def reviews(n: int, start: int = 0, label: Any = None) -> list[dict[str, Any]]:
    """Distinct rows, even/odd labelled neg/pos unless ``label`` says otherwise."""
    return [
        {
            "text": f"review number {i} about a film",
            "label": label if label is not None else ("pos" if i % 2 else "neg"),
        }
        for i in range(start, start + n)
    ]


def texts(examples: list[Example], role: str = "text") -> list[Any]:
    return [e.fields[role] for e in examples]


def dropped(data: PreparedData, source: str = "dataset") -> dict[str, int]:
    return {k: v.count for k, v in data.report.sources[source].dropped.items()}


# --- tasks and formats ------------------------------------------------------------------


def test_classification_string_labels_become_ids_in_name_order(tmp_path: Path) -> None:
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "meh", "label": "neutral"}]
    data = prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert data.label_names == ["neg", "neutral", "pos"]
    assert [e.fields for e in data.train] == [
        {"text": "good", "label": 2},
        {"text": "bad", "label": 0},
        {"text": "meh", "label": 1},
    ]
    assert all(len(e.uid) == 64 and int(e.uid, 16) >= 0 for e in data.train)
    assert not any(e.replay for e in data.train)
    assert data.class_weights is None


def test_integer_labels_keep_their_values_also_from_csv_strings(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [["a", "2"], ["b", "0"], ["c", "02"], ["d", "0"]])
    data = prepare(make_spec(path))
    assert data.label_names == ["0", "1", "2"]
    assert texts(data.train, "label") == [2, 0, 2, 0]
    assert any("label ids '1' have no rows at all" in w for w in data.report.warnings)


def test_missing_invalid_and_negative_labels_are_unknown_label(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"text": "a", "label": 1},
        {"text": "b", "label": 0},
        {"text": "c"},
        {"text": "d", "label": " "},
        {"text": "e", "label": -1},
        {"text": "f", "label": 1.5},
        {"text": "g", "label": [1]},
        {"text": "h", "label": 1.0},
    ]
    data = prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert texts(data.train) == ["a", "b", "h"]
    drops = data.report.sources["dataset"].dropped["unknown_label"]
    assert drops.count == 5
    assert sorted(drops.examples) == [
        "d.jsonl:3 (no label)",
        "d.jsonl:4 (no label)",
        "d.jsonl:5 (label '-1' is not a class id (ids start at 0))",
        "d.jsonl:6 (label 1.5 is not a class)",
        "d.jsonl:7 (label is a list, not a class)",
    ]


def test_chat_messages_from_jsonl_csv_and_parquet(tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    good = [*chat, {"role": "assistant", "content": "Hello!", "name": "bot"}]
    rows: list[Any] = [
        good,
        [{"role": "user", "content": "only a question"}],  # no assistant turn
        [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}],  # unknown role
        [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}],  # content not text
        "not a list",
        [],  # empty
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}],  # blank answer: empty
    ]
    spec_args: dict[str, Any] = {"columns": {"messages": "chat"}}
    jsonl = write_jsonl(tmp_path / "j" / "d.jsonl", [{"chat": r} for r in rows])
    data = prepare(make_spec(jsonl, "causal-lm", **spec_args))
    assert texts(data.train, "messages") == [[*chat, {"role": "assistant", "content": "Hello!"}]]
    assert dropped(data) == {"undecodable": 4, "empty": 2}
    assert data.report.sources["dataset"].dropped["undecodable"].examples == [
        "d.jsonl:2 (no assistant turn to learn from)",
        "d.jsonl:3 (message 0 has role 'bot'; use system, user or assistant)",
        "d.jsonl:4 (message 0 content is a int, not text)",
        "d.jsonl:5 (messages is not valid JSON)",  # a string is parsed as JSON, as CSV stores it
    ]
    # CSV holds the conversation as a JSON string; a broken string is undecodable.
    path = write_csv(tmp_path / "c" / "d.csv", ["chat"], [[json.dumps(good)], ["[{'role': 'user'"]])
    data = prepare(make_spec(path, "causal-lm", **spec_args))
    assert len(data.train) == 1 and data.train[0].fields["messages"][-1]["content"] == "Hello!"
    assert data.report.sources["dataset"].dropped["undecodable"].examples == ["d.csv:3 (messages is not valid JSON)"]
    # Parquet: a list<struct<role, content>> column, or a JSON string column.
    pq.write_table(pa.table({"chat": [good, good[1:]]}), tmp_path / "p.parquet")
    data = prepare(make_spec(tmp_path / "p.parquet", "causal-lm", cleaning={"dedupe": "off"}, **spec_args))
    assert [len(e.fields["messages"]) for e in data.train] == [3, 2]


def test_prompt_completion_and_plain_text_layouts(tmp_path: Path) -> None:
    rows = [{"q": "Capital of France?", "a": " Paris"}, {"q": "2+2?", "a": ""}]
    data = prepare(
        make_spec(write_jsonl(tmp_path / "pc.jsonl", rows), "causal-lm", columns={"prompt": "q", "completion": "a"})
    )
    # values are kept verbatim (a completion's leading space matters to its tokens)
    assert [e.fields for e in data.train] == [{"prompt": "Capital of France?", "completion": " Paris"}]
    assert dropped(data) == {"empty": 1}
    data = prepare(make_spec(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}]), "causal-lm"))
    assert [e.fields for e in data.train] == [{"text": "Once upon a time."}]


def test_seq2seq_source_and_target_from_tsv(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "d.tsv", ["article", "summary"], [["long text one", "short one"], ["long two", ""]], delimiter="\t"
    )
    data = prepare(make_spec(path, "seq2seq", columns={"source": "article", "target": "summary"}))
    assert [e.fields for e in data.train] == [{"source": "long text one", "target": "short one"}]
    assert dropped(data) == {"empty": 1}


def test_non_text_values_are_read_as_text_or_dropped(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"text": 12345, "label": "a"},
        {"text": {"nested": 1}, "label": "b"},
        {"text": "ok", "label": "b"},
    ]
    data = prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert texts(data.train) == ["12345", "ok"]
    assert data.report.sources["dataset"].dropped["undecodable"].examples == ["d.jsonl:2 (text is a dict, not text)"]


def test_a_prefix_reads_every_data_file_in_sorted_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "b" / "part.jsonl", reviews(2, start=10))
    write_jsonl(tmp_path / "data" / "a.jsonl", reviews(2))
    pq.write_table(pa.Table.from_pylist(reviews(2, start=20)), tmp_path / "data" / "c.parquet")
    data = prepare(make_spec(tmp_path / "data"))
    files = data.report.sources["dataset"].files
    assert [(f.file, f.format, f.rows) for f in files] == [
        ("a.jsonl", "jsonl", 2),
        ("b/part.jsonl", "jsonl", 2),
        ("c.parquet", "parquet", 2),
    ]
    assert [t.split()[2] for t in texts(data.train)] == ["0", "1", "10", "11", "20", "21"]


def test_unknown_extension_under_auto_names_the_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "a.jsonl", reviews(2))
    (tmp_path / "data" / "notes.txt").write_text("hello")
    with pytest.raises(InvalidDataError, match=r"cannot tell the format of notes.txt: its extension '.txt'"):
        prepare(make_spec(tmp_path / "data"))


def test_missing_column_error_names_column_file_and_existing_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "reviews.csv", ["text", "stars"], [["good", 5], ["bad", 1]])
    with pytest.raises(InvalidDataError) as exc:
        prepare(make_spec(path, columns={"label": "sentiment"}))
    assert str(exc.value).startswith("label column 'sentiment' missing in reviews.csv (columns: text, stars)")


# --- cleaning ---------------------------------------------------------------------------


def test_drop_empty_on_and_off(tmp_path: Path) -> None:
    rows = [{"text": "fine", "label": "a"}, {"text": "   ", "label": "a"}, {"label": "b"}, {"text": "x", "label": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare(make_spec(path))
    assert texts(data.train) == ["fine", "x"]
    assert data.report.sources["dataset"].dropped["empty"].examples == ["d.jsonl:2", "d.jsonl:3"]
    kept = prepare(make_spec(path, cleaning={"dropEmpty": False, "dedupe": "off"}))
    assert texts(kept.train) == ["fine", "   ", "", "x"]


def test_dedupe_exact_normalized_and_off(tmp_path: Path) -> None:
    rows = [
        {"text": "Great movie!", "label": "pos"},
        {"text": "Great movie!", "label": "pos"},  # exact
        {"text": "great   MOVIE", "label": "pos"},  # normalized
        {"text": "Great movie!", "label": "neg"},  # same text, other label: not a duplicate row
        {"text": "Bad movie.", "label": "neg"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    normalized = prepare(make_spec(path))
    assert dropped(normalized) == {"duplicate_exact": 1, "duplicate_normalized": 1}
    src = normalized.report.sources["dataset"]
    assert src.dropped["duplicate_exact"].examples == ["d.jsonl:2 (same as d.jsonl:1)"]
    assert src.dropped["duplicate_normalized"].examples == ["d.jsonl:3 (same as d.jsonl:1)"]
    assert any("1 texts" in w and "different labels" in w for w in normalized.report.warnings)
    exact = prepare(make_spec(path, cleaning={"dedupe": "exact"}))
    assert dropped(exact) == {"duplicate_exact": 1}
    off = prepare(make_spec(path, cleaning={"dedupe": "off"}))
    assert dropped(off) == {} and len(off.train) == 5
    # exact duplicates share a uid (and so always a split)
    assert off.train[0].uid == off.train[1].uid != off.train[3].uid


def test_normalization_folds_case_whitespace_punctuation_and_width() -> None:
    assert normalize_text("  Héllo,\tWORLD!! — ok_ ") == "héllo world ok"
    assert normalize_text("ＡＢＣ") == "abc"  # full-width letters fold to ASCII


def test_min_chars_measures_the_input(tmp_path: Path) -> None:
    rows = [{"text": "ok", "label": "a"}, {"text": "long enough", "label": "b"}, {"text": "also long", "label": "a"}]
    data = prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", rows), cleaning={"minChars": 5}))
    assert texts(data.train) == ["long enough", "also long"]
    assert data.report.sources["dataset"].dropped["too_short"].examples == ["d.jsonl:1 (2 chars)"]


def test_max_tokens_drops_long_rows_only_when_a_counter_is_given(tmp_path: Path) -> None:
    rows = [
        {"text": "one two three", "label": "a"},
        {"text": "one two three four five six", "label": "b"},
        {"text": "four", "label": "b"},
    ]
    spec = make_spec(write_jsonl(tmp_path / "d.jsonl", rows), cleaning={"maxTokens": 4})
    seen: list[Example] = []

    def count(example: Example) -> int:
        seen.append(example)
        return len(example.fields["text"].split())

    data = prepare(spec, count_tokens=count)
    assert texts(data.train) == ["one two three", "four"]
    assert data.report.sources["dataset"].dropped["too_long"].examples == ["d.jsonl:2 (6 tokens)"]
    assert isinstance(seen[0].fields["label"], int)  # the counter sees the example as trained on
    assert len(prepare(spec).train) == 3  # no tokenizer: no length check


# --- PII --------------------------------------------------------------------------------

PII_ROWS = [
    {"text": "mail me at jane@example.com", "label": "a"},
    {"text": "nothing personal here", "label": "b"},
    {"text": "card 4111 1111 1111 1111, phone +1 415 555 2671", "label": "a"},
    {"text": "server 10.1.2.3 crashed", "label": "b@example.com"},  # labels are not screened
    {"text": "all quiet", "label": "a"},
]


def test_pii_mask_replaces_finds_and_counts_them(tmp_path: Path) -> None:
    data = prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", PII_ROWS), screening={"pii": "mask"}))
    assert texts(data.train) == [
        "mail me at [EMAIL]",
        "nothing personal here",
        "card [CARD], phone [PHONE]",
        "server [IP] crashed",
        "all quiet",
    ]
    assert data.label_names == ["a", "b", "b@example.com"]
    pii = data.report.pii
    assert (pii.action, pii.rows) == ("mask", 3)
    assert pii.matches == {"email": 1, "phone": 1, "card": 1, "ip": 1}
    assert pii.examples == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:4"]
    assert "jane@example.com" not in json.dumps(data.report.to_dict())


def test_pii_is_screened_in_every_text_field_and_message(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "I am jane@example.com"},
                {"role": "assistant", "content": "Noted, call 020 7946 0958"},
            ]
        }
    ]
    data = prepare(make_spec(write_jsonl(tmp_path / "c.jsonl", rows), "causal-lm", columns={"messages": "messages"}))
    assert [m["content"] for m in data.train[0].fields["messages"]] == ["I am [EMAIL]", "Noted, call [PHONE]"]
    rows2 = [{"source": "from 192.168.0.1", "target": "to a@b.io"}]
    data = prepare(make_spec(write_jsonl(tmp_path / "s.jsonl", rows2), "seq2seq"))
    assert data.train[0].fields == {"source": "from [IP]", "target": "to [EMAIL]"}


def test_pii_drop_removes_the_rows(tmp_path: Path) -> None:
    data = prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", PII_ROWS), screening={"pii": "drop"}))
    assert texts(data.train) == ["nothing personal here", "all quiet"]
    assert data.report.sources["dataset"].dropped["pii"].examples == [
        "d.jsonl:1 (email)",
        "d.jsonl:3 (card, phone)",
        "d.jsonl:4 (ip)",
    ]


def test_pii_fail_names_the_rows_and_how_to_proceed(tmp_path: Path) -> None:
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "reach me: bob@example.org", "label": "a"}])
    spec = make_spec(
        write_jsonl(tmp_path / "d.jsonl", PII_ROWS), screening={"pii": "fail"}, split={"validationUri": uri(val)}
    )
    with pytest.raises(InvalidDataError) as exc:
        prepare(spec)
    assert str(exc.value) == (
        "personal data found in 4 rows (1 card, 2 email, 1 ip, 1 phone) and dataset.screening.pii is fail: "
        "d.jsonl:1, d.jsonl:3, d.jsonl:4, validation val.jsonl:1; set dataset.screening.pii to mask "
        "(replace finds with [EMAIL], [PHONE], [CARD], [IP]) or drop (remove those rows), or remove the data "
        "at its source"
    )
    assert isinstance(exc.value, DataValidationError) and exc.value.report.pii.rows == 4


def test_pii_off_leaves_text_alone(tmp_path: Path) -> None:
    data = prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", PII_ROWS), screening={"pii": "off"}))
    assert texts(data.train)[0] == "mail me at jane@example.com"
    assert data.report.pii.rows == 0


# --- splits -----------------------------------------------------------------------------

SPLIT = {"validation": 0.1, "test": 0.1, "seed": 7}


def split_of(data: PreparedData) -> dict[str, str]:
    return {e.uid: name for name in ("train", "validation", "test") for e in getattr(data, name)}


def test_hash_split_is_deterministic_and_sized_by_the_fractions(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", reviews(1000))
    first, second = prepare(make_spec(path, split=SPLIT)), prepare(make_spec(path, split=SPLIT))
    assert split_of(first) == split_of(second)
    assert first.fingerprint == second.fingerprint
    sizes = first.report.sizes
    assert sizes["train"] + sizes["validation"] + sizes["test"] == 1000
    assert 70 <= sizes["validation"] <= 130 and 70 <= sizes["test"] <= 130
    for e in first.test:
        assert split_bucket(7, e.uid) < 0.1
    other_seed = prepare(make_spec(path, split={**SPLIT, "seed": 8}))
    assert split_of(other_seed) != split_of(first)
    assert first.report.split_method == {"validation": "hash", "test": "hash"}


def test_appending_rows_never_moves_an_old_row_between_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "2024.jsonl", reviews(600))
    before = split_of(prepare(make_spec(tmp_path / "data", split=SPLIT)))
    # new rows arrive in a new file *and* appended to the old one, which is also reordered
    write_jsonl(tmp_path / "data" / "2025.jsonl", reviews(300, start=600))
    write_jsonl(tmp_path / "data" / "2024.jsonl", list(reversed(reviews(600))) + reviews(100, start=900))
    after = split_of(prepare(make_spec(tmp_path / "data", split=SPLIT)))
    assert len(after) == 1000
    assert {uid: after[uid] for uid in before} == before
    assert set(before.values()) == {"train", "validation", "test"}


def test_separate_validation_and_test_uris_are_the_splits_and_cleaned_the_same(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [*reviews(40), {"text": "Shared row", "label": "pos"}])
    val_rows = [
        {"text": "shared row!", "label": "pos"},  # the same content as a training row: a leak
        {"text": "held out one", "label": "neg"},
        {"text": "held out one", "label": "neg"},  # duplicate
        {"text": "a new class", "label": "neutral"},  # not a training label
        {"text": "   ", "label": "pos"},
    ]
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [["tested here", "neg"], ["also tested", "pos"]])
    spec = make_spec(train, split={"validation": 0.5, "test": 0.5, "validationUri": uri(val), "testUri": uri(test)})
    data = prepare(spec)
    assert len(data.train) == 40  # fractions ignored: nothing held out of dataset.uri; the leak dropped
    assert texts(data.validation) == ["shared row!", "held out one"]
    assert texts(data.test) == ["tested here", "also tested"]
    assert dropped(data, "validation") == {"empty": 1, "unknown_label": 1, "duplicate_exact": 1}
    assert data.report.sources["validation"].dropped["unknown_label"].examples == [
        "val.jsonl:4 (label 'neutral' is not among the training labels)"
    ]
    assert data.report.sources["dataset"].dropped["leak"].examples == [
        "train.jsonl:41 (same as validation val.jsonl:1)"
    ]
    assert data.report.split_method == {"validation": "uri", "test": "uri"}
    assert data.report.sources["dataset"].kept == 40


def test_a_validation_uri_with_a_hashed_test_split(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", reviews(300))
    val = write_jsonl(tmp_path / "val.jsonl", reviews(5, start=1000))
    data = prepare(make_spec(train, split={"validation": 0.3, "test": 0.2, "validationUri": uri(val)}))
    assert len(data.validation) == 5
    assert 30 <= len(data.test) <= 90 and len(data.train) == 300 - len(data.test)


# --- labels and balance -----------------------------------------------------------------


def imbalanced(tmp_path: Path, majority: int = 90, minority: int = 5) -> Path:
    rows = reviews(majority, label="neg") + reviews(minority, start=majority, label="pos")
    return write_jsonl(tmp_path / "d.jsonl", rows)


def test_without_a_balance_block_the_distribution_is_only_reported(tmp_path: Path) -> None:
    data = prepare(make_spec(imbalanced(tmp_path)))
    labels = data.report.labels
    assert labels is not None
    assert labels.train == {"neg": 90, "pos": 5}
    assert labels.imbalance_ratio == 18.0
    assert (labels.strategy, labels.action) == (None, "none")
    assert data.class_weights is None and len(data.train) == 95


def test_balance_fail_reports_the_distribution_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(InvalidDataError) as exc:
        prepare(make_spec(imbalanced(tmp_path), balance={"maxImbalanceRatio": 10, "strategy": "fail"}))
    assert str(exc.value) == (
        "class imbalance 18.0 exceeds dataset.balance.maxImbalanceRatio 10 (training rows per label: neg: 90, "
        "pos: 5); collect more rows of the rare classes, raise maxImbalanceRatio, or set balance.strategy to "
        "class-weights or oversample"
    )
    ok = prepare(make_spec(imbalanced(tmp_path), balance={"maxImbalanceRatio": 20, "strategy": "fail"}))
    assert ok.report.labels is not None and ok.report.labels.action == "none"


def test_balance_class_weights_are_inverse_frequency(tmp_path: Path) -> None:
    data = prepare(make_spec(imbalanced(tmp_path), balance={"maxImbalanceRatio": 10, "strategy": "class-weights"}))
    assert data.class_weights == pytest.approx([95 / (2 * 90), 95 / (2 * 5)])
    assert data.report.labels is not None and data.report.labels.action == "class-weights"
    assert len(data.train) == 95


def test_balance_oversample_copies_minority_rows_up_to_the_ratio(tmp_path: Path) -> None:
    spec = make_spec(imbalanced(tmp_path), balance={"maxImbalanceRatio": 10, "strategy": "oversample"})
    data = prepare(spec)
    counts = Counter(e.fields["label"] for e in data.train)
    assert counts == {0: 90, 1: 9}  # ceil(90 / 10)
    assert data.report.labels is not None and data.report.labels.oversampled == {"pos": 4}
    originals = {e.uid for e in data.train[:95]}
    assert {e.uid for e in data.train[95:]} <= originals
    assert [e.uid for e in prepare(spec).train] == [e.uid for e in data.train]  # seeded
    assert data.class_weights is None


def test_a_single_training_class_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidDataError, match=r"only one label in the training split \(neg: 10\)"):
        prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", reviews(10, label="neg"))))


def test_rare_labels_are_reported(tmp_path: Path) -> None:
    rows = [*reviews(200), {"text": "the only neutral one", "label": "neutral"}]
    data = prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", rows), split=SPLIT))
    warnings = " | ".join(data.report.warnings)
    assert "label 'neutral' has a single example in total" in warnings
    in_train = any(e.fields["label"] == 1 for e in data.train)
    assert ("label 'neutral' is in validation/test only" in warnings) is (not in_train)


# --- replay, out-of-domain, forgetting, fairness ----------------------------------------


def test_replay_adds_the_ratio_of_general_rows_to_train_only(tmp_path: Path) -> None:
    main = write_jsonl(tmp_path / "main.jsonl", [{"text": f"domain text {i}"} for i in range(200)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"general text {i}"} for i in range(100)])
    spec = make_spec(main, "causal-lm", split=SPLIT, replay={"uri": uri(general), "ratio": 0.2})
    data = prepare(spec)
    assert data.replay is not None and not any(e.replay for e in data.train)  # drawn per epoch, not here
    replayed = [data.replay.pool[i] for i in data.replay.draw(0)]
    n_domain = len(data.train)
    assert len(replayed) == round(0.2 * n_domain / 0.8)
    assert all(t.startswith("general") for t in texts(replayed))
    assert len({e.uid for e in replayed}) == len(replayed)  # enough rows: no repeats
    assert not any(e.replay for e in data.validation + data.test)
    assert all(t.startswith("domain") for t in texts(data.validation + data.test))
    assert data.report.replay is not None and data.report.replay.rows_added == len(replayed)
    again = prepare(spec).replay
    assert again is not None and [e.uid for e in again.pool] == [e.uid for e in data.replay.pool]


def test_replay_repeats_rows_only_when_there_are_too_few(tmp_path: Path) -> None:
    main = write_jsonl(tmp_path / "main.jsonl", [{"text": f"domain text {i}"} for i in range(90)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"general {i}"} for i in range(4)] + [{"text": ""}])
    data = prepare(make_spec(main, "causal-lm", replay={"uri": uri(general), "ratio": 0.1}))
    assert data.replay is not None
    replayed = [data.replay.pool[i] for i in data.replay.draw(0)]
    assert len(replayed) == 10 and len({e.uid for e in replayed}) == 4
    assert data.report.replay is not None and data.report.replay.with_replacement
    assert dropped(data, "replay") == {"empty": 1}
    assert any("replay data has 4 usable rows but 10 were wanted per epoch" in w for w in data.report.warnings)


def test_out_of_domain_and_forgetting_sets_are_cleaned_the_same_way(tmp_path: Path) -> None:
    main = write_jsonl(tmp_path / "main.jsonl", reviews(20))
    ood = write_jsonl(
        tmp_path / "ood.jsonl",
        [
            {"text": "a tweet, mail x@example.com", "label": "pos"},
            {"text": "another tweet", "label": "neg"},
            {"text": "another tweet", "label": "neg"},
            {"text": "label unseen", "label": "mixed"},
        ],
    )
    data = prepare(make_spec(main, evaluation={"outOfDomain": {"uri": uri(ood)}}))
    assert [e.fields for e in data.out_of_domain] == [
        {"text": "a tweet, mail [EMAIL]", "label": 1},
        {"text": "another tweet", "label": 0},
    ]
    assert dropped(data, "out_of_domain") == {"unknown_label": 1, "duplicate_exact": 1}
    assert data.report.sizes["out_of_domain"] == 2
    assert data.forgetting == []

    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    chats = write_jsonl(tmp_path / "chats.jsonl", [chat])
    general = write_jsonl(
        tmp_path / "wiki.jsonl", [chat, {"messages": [{"role": "user", "content": "no answer"}]}, chat]
    )
    data = prepare(
        make_spec(
            chats, "causal-lm", columns={"messages": "messages"}, evaluation={"forgetting": {"uri": uri(general)}}
        )
    )
    assert len(data.forgetting) == 1 and "messages" in data.forgetting[0].fields
    assert dropped(data, "forgetting") == {"undecodable": 1, "duplicate_exact": 1}


def test_fairness_groups_are_carried_and_reported(tmp_path: Path) -> None:
    rows = [{**r, "region": "north" if i % 3 else "south"} for i, r in enumerate(reviews(300))]
    rows[5]["region"] = ""
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare(make_spec(path, split=SPLIT, evaluation={"fairness": {"groupColumn": "region"}}))
    assert {e.group for e in data.train} == {"north", "south", None}
    groups = data.report.groups["test"]
    assert set(groups) <= {"north", "south", "(none)"} and sum(groups.values()) == len(data.test)
    # the group is not part of the content: it never changes a row's uid or split
    plain = prepare(make_spec(path, split=SPLIT))
    assert split_of(plain) == split_of(data)
    with pytest.raises(InvalidDataError) as exc:
        prepare(make_spec(path, evaluation={"fairness": {"groupColumn": "country"}}))
    assert str(exc.value).startswith(
        "fairness group column 'country' missing in d.jsonl (columns: text, label, region)"
    )
    assert "set evaluation.fairness.groupColumn" in str(exc.value)


# --- error messages ---------------------------------------------------------------------


def test_no_training_rows_left_says_how_many_were_dropped_and_why(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "", "label": "a"}\n{"text": " ", "label": "b"}\n{broken\n{"text": "", "label": "a"}\n')
    with pytest.raises(InvalidDataError) as exc:
        prepare(make_spec(path))
    assert str(exc.value) == (
        f"no training rows left after cleaning {uri(path)}: 1 undecodable (e.g. d.jsonl:3 (unparsable JSON "
        "(Expecting property name enclosed in double quotes))), 3 empty (e.g. d.jsonl:1, d.jsonl:2, d.jsonl:4)"
    )


def test_an_empty_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(InvalidDataError, match=r"no rows in file://.*d.jsonl \(files: d.jsonl\)"):
        prepare(make_spec(tmp_path / "d.jsonl"))


def test_an_empty_validation_split_says_what_to_change(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", reviews(6))
    with pytest.raises(InvalidDataError) as exc:
        prepare(make_spec(path, split={"validation": 0.01, "test": 0}))
    assert str(exc.value) == (
        "validation split is empty: split.validation 0.01 of 6 rows took none; add rows, raise split.validation, "
        "give split.validationUri, or set split.validation to 0"
    )
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "other"}])
    with pytest.raises(InvalidDataError) as exc:
        prepare(make_spec(path, split={"validationUri": uri(val), "test": 0}))
    assert str(exc.value) == (
        f"validation split is empty: no usable rows in {uri(val)} (1 unknown_label (e.g. val.jsonl:1 "
        "(label 'other' is not among the training labels)))"
    )


def test_empty_out_of_domain_data_is_an_error(tmp_path: Path) -> None:
    main = write_jsonl(tmp_path / "main.jsonl", reviews(10))
    ood = write_jsonl(tmp_path / "ood.jsonl", [{"text": "", "label": "pos"}])
    with pytest.raises(InvalidDataError) as exc:
        prepare(make_spec(main, evaluation={"outOfDomain": {"uri": uri(ood)}}))
    assert str(exc.value) == (
        f"out-of-domain data {uri(ood)} has no usable rows (1 empty (e.g. ood.jsonl:1)); fix the data or "
        "remove evaluation.outOfDomain"
    )


def test_many_rows_failing_one_check_hint_at_a_wrong_mapping(tmp_path: Path) -> None:
    rows = reviews(10) + [{"text": f"t{i}", "label": None} for i in range(5)]
    data = prepare(make_spec(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert any("33 % of the rows" in w and "unknown_label" in w for w in data.report.warnings)


# --- the report and the fingerprint -----------------------------------------------------


def test_report_is_json_and_tells_the_whole_story(tmp_path: Path) -> None:
    rows = [*reviews(200), {"text": "", "label": "pos"}, reviews(1)[0], {"text": "mail a@b.com now", "label": "pos"}]
    general = write_jsonl(tmp_path / "general.jsonl", reviews(50, start=5000))
    spec = make_spec(
        write_jsonl(tmp_path / "d.jsonl", rows),
        split=SPLIT,
        replay={"uri": uri(general), "ratio": 0.1},
        balance={"maxImbalanceRatio": 3, "strategy": "fail"},
    )
    data = prepare(spec)
    doc = json.loads(json.dumps(data.report.to_dict()))
    assert doc["task"] == "sequence-classification"
    assert doc["rowsRead"] == 203 + 50
    assert doc["dropped"] == {"empty": 1, "duplicate_exact": 1}
    src = doc["sources"]["dataset"]
    assert src["files"] == [{"file": "d.jsonl", "format": "jsonl", "rows": 203, "header": True}]
    assert (src["rowsRead"], src["rowsDropped"], src["rowsKept"]) == (203, 2, 201)
    assert src["dropped"]["duplicate_exact"] == {"count": 1, "examples": ["d.jsonl:202 (same as d.jsonl:1)"]}
    assert list(doc["sources"]) == ["dataset", "replay"]
    assert doc["split"]["seed"] == 7 and doc["split"]["method"] == {"validation": "hash", "test": "hash"}
    sizes = doc["split"]["sizes"]
    replay_rows = doc["replay"]["rowsAdded"]
    assert sizes["train"] + sizes["validation"] + sizes["test"] == 201 + replay_rows
    labels = doc["labels"]
    assert labels["names"] == ["neg", "pos"]
    assert sum(labels["train"].values()) == sizes["train"] - replay_rows
    assert sum(labels["validation"].values()) == sizes["validation"]
    assert 0.5 < labels["imbalanceRatio"] < 2
    assert labels["balance"] == {
        "strategy": "fail",
        "maxImbalanceRatio": 3.0,
        "action": "none",
        "classWeights": None,
        "oversampled": {},
    }
    assert doc["pii"] == {
        "action": "mask",
        "rows": 1,
        "matches": {"email": 1, "phone": 0, "card": 0, "ip": 0},
        "examples": ["d.jsonl:203"],
    }
    assert doc["replay"]["uri"] == uri(general) and replay_rows == round(0.1 * (sizes["train"] - replay_rows) / 0.9)
    assert doc["fingerprint"] == data.fingerprint and len(data.fingerprint) == 64
    assert "a@b.com" not in json.dumps(doc)

    lines = data.report.summary_lines()
    assert lines[0] == "dataset: 203 rows read from 1 file; 2 dropped: 1 empty, 1 duplicate_exact"
    assert lines[1] == "replay: 50 rows read from 1 file"
    assert lines[2].startswith(f"splits: train {sizes['train']}, validation {sizes['validation']}, test ")
    assert lines[3].startswith("labels (train): neg: ") and "imbalance" in lines[3]
    assert lines[4] == "PII (mask): 1 row with personal data (1 email)"
    assert (
        lines[5] == f"replay mix: {replay_rows} general-domain rows added to each epoch, drawn afresh per epoch from 50"
    )


def test_report_defaults_serialise() -> None:
    report = ValidationReport(task="causal-lm")
    assert json.loads(json.dumps(report.to_dict()))["labels"] is None
    assert report.summary_lines() == []


def test_fingerprint_is_data_identity(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", reviews(50))
    first = prepare(make_spec(path, split=SPLIT)).fingerprint
    write_jsonl(tmp_path / "d.jsonl", list(reversed(reviews(50))))  # same rows, other order
    assert prepare(make_spec(path, split=SPLIT)).fingerprint == first
    write_jsonl(tmp_path / "d.jsonl", reviews(51))
    assert prepare(make_spec(path, split=SPLIT)).fingerprint != first


def test_many_rows_are_prepared_quickly(tmp_path: Path) -> None:
    import time

    rows = [{"text": f"row {i} mentions item {i * 7} in 2019 with 300 units", "label": i % 3} for i in range(30_000)]
    rows += rows[:1000]  # duplicates
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    start = time.perf_counter()
    data = prepare(make_spec(path, split=SPLIT))
    assert time.perf_counter() - start < 6.0  # linear work: ~1 s here
    assert len(data.train) + len(data.validation) + len(data.test) == 30_000


# --- real data --------------------------------------------------------------------------


@pytest.mark.skipif(not (SST2 / "train.tsv").exists(), reason=f"SST-2 not found at {SST2} (the shared data checkout)")
def test_real_sst2_train_split() -> None:
    spec = make_spec(SST2 / "train.tsv", split={"validation": 0.1, "test": 0.1})
    data = prepare(spec)
    src = data.report.sources["dataset"]
    assert src.rows_read == 6920
    assert [(f.format, f.header) for f in src.files] == [("tsv", False)]  # SST-2's TSV has no header row
    assert data.label_names == ["0", "1"]
    assert src.rows_dropped < 50  # a handful of duplicate sentences
    labels = data.report.labels
    assert labels is not None and labels.imbalance_ratio is not None
    assert 1.0 <= labels.imbalance_ratio < 1.3
    n = len(data.train) + len(data.validation) + len(data.test)
    assert n == src.kept
    assert 0.07 < len(data.test) / n < 0.13 and 0.07 < len(data.validation) / n < 0.13
    assert data.report.pii.rows < 10
