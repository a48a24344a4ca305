"""Reading files: every format, headers or not, and bad rows reported instead of crashing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneloop_trainer.data.loading import display_names, file_format, load_file
from tuneloop_trainer.data.rows import Column
from tuneloop_trainer.errors import InvalidDataError

pytestmark = pytest.mark.unit

TEXT_LABEL = [Column("text", "text", "dataset.columns.text"), Column("label", "label", "dataset.columns.label")]


def test_jsonl_rows_keep_line_numbers_and_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0, "extra": 3}\n')
    loaded = load_file(path, "d.jsonl", "auto", TEXT_LABEL)
    assert loaded.format == "jsonl"
    assert [(r.ref, r.values) for r in loaded.rows] == [
        ("d.jsonl:1", {"text": "a", "label": 1}),
        ("d.jsonl:3", {"text": "b", "label": 0}),
    ]


def test_jsonl_bad_lines_are_rows_with_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "\xff\xfe", "label": 1}\n{not json}\n[1, 2]\n')
    rows = load_file(path, "d.jsonl", "auto", TEXT_LABEL).rows
    assert [r.problem for r in rows] == [
        None,
        "invalid UTF-8",
        "unparsable JSON (Expecting property name enclosed in double quotes)",
        "not a JSON object (list)",
    ]
    assert rows[1].ref == "d.jsonl:2"


def test_json_array_files_are_read_too(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    rows = load_file(path, "d.json", "auto", TEXT_LABEL).rows
    assert [(r.ref, r.values["text"]) for r in rows] == [("d.json:row 0", "a"), ("d.json:row 1", "b")]


def test_a_key_missing_from_every_json_object_is_a_wrong_column_name(tmp_path: Path) -> None:
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"review": "a", "stars": 1}\n{"review": "b", "stars": 2}\n')
    with pytest.raises(InvalidDataError) as exc:
        load_file(path, "reviews.jsonl", "auto", TEXT_LABEL)
    assert str(exc.value) == (
        "text column 'text' missing in reviews.jsonl (columns: review, stars); "
        "set dataset.columns.text to the column that holds it"
    )


def test_a_key_missing_from_some_objects_leaves_those_rows_without_it(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    rows = load_file(path, "d.jsonl", "auto", TEXT_LABEL).rows
    assert rows[1].values == {"text": "b"}


def test_csv_with_quoting_multiline_fields_and_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('\ufefflabel,text\npos,"Great, really ""great"""\nneg,"two\nlines"\nneg,last\n', encoding="utf-8")
    loaded = load_file(path, "d.csv", "auto", TEXT_LABEL)
    assert loaded.format == "csv" and loaded.header
    assert [(r.ref, r.values) for r in loaded.rows] == [
        ("d.csv:2", {"text": 'Great, really "great"', "label": "pos"}),
        ("d.csv:3", {"text": "two\nlines", "label": "neg"}),
        ("d.csv:5", {"text": "last", "label": "neg"}),
    ]


def test_csv_rows_with_bad_bytes_or_the_wrong_width_are_undecodable_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nfine,1\nbad \xe9 byte,1\ntoo,many,fields\nalso fine,0\n")
    rows = load_file(path, "d.csv", "auto", TEXT_LABEL).rows
    assert [(r.ref, r.problem) for r in rows] == [
        ("d.csv:2", None),
        ("d.csv:3", "invalid UTF-8"),
        ("d.csv:4", "3 fields where the header has 2"),
        ("d.csv:5", None),
    ]


def test_missing_csv_column_names_the_column_the_file_and_what_exists(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,stars\ngood,5\n")
    columns = [Column("text", "text", "dataset.columns.text"), Column("label", "sentiment", "dataset.columns.label")]
    with pytest.raises(InvalidDataError) as exc:
        load_file(path, "reviews.csv", "auto", columns, allow_headerless=True)
    assert str(exc.value) == (
        "label column 'sentiment' missing in reviews.csv (columns: text, stars); "
        "set dataset.columns.label to the column that holds it"
    )


def test_tsv_is_tab_separated_and_unquoted(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\n"quoted" start, comma\t1\nplain\t0\n')
    loaded = load_file(path, "d.tsv", "auto", TEXT_LABEL)
    assert loaded.format == "tsv"
    assert [r.values["text"] for r in loaded.rows] == ['"quoted" start, comma', "plain"]
    # format: csv on a .tsv file still means tabs
    assert load_file(path, "d.tsv", "csv", TEXT_LABEL).format == "tsv"


def test_headerless_tsv_is_recognised_when_labels_recur(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("\ufeffa fine film\t1\na dull film\t0\nanother fine one\t1\n", encoding="utf-8")
    loaded = load_file(path, "d.tsv", "auto", TEXT_LABEL, allow_headerless=True)
    assert not loaded.header
    assert (loaded.rows[0].ref, loaded.rows[0].values) == ("d.tsv:1", {"text": "a fine film", "label": "1"})
    assert len(loaded.rows) == 3


def test_a_header_with_wrong_names_is_not_mistaken_for_data(tmp_path: Path) -> None:
    # "stars" never recurs as a label, so this is a header with unexpected names: an error, not a row.
    path = tmp_path / "d.csv"
    path.write_text("review,stars\ngood,5\nbad,1\n")
    with pytest.raises(InvalidDataError, match=r"text column 'text' missing in d.csv \(columns: review, stars\)"):
        load_file(path, "d.csv", "auto", TEXT_LABEL, allow_headerless=True)
    # and without permission (other tasks, group columns) there is never a guess
    path.write_text("a fine film\t1\na dull film\t1\n".replace("\t", ","))
    with pytest.raises(InvalidDataError, match="the first row is read as the header"):
        load_file(path, "d.csv", "auto", TEXT_LABEL)


def test_parquet_reads_only_the_needed_columns_and_flags_bad_binary(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table = pa.table(
        {
            "text": pa.array([b"ok", b"\xff bad", b"fine"], type=pa.binary()),
            "label": [1, 0, 1],
            "unused": ["x", "y", "z"],
        }
    )
    pq.write_table(table, path)
    loaded = load_file(path, "d.parquet", "auto", TEXT_LABEL)
    assert loaded.format == "parquet"
    assert [(r.ref, r.values, r.problem) for r in loaded.rows] == [
        ("d.parquet:row 0", {"text": "ok", "label": 1}, None),
        ("d.parquet:row 1", {}, "invalid UTF-8"),
        ("d.parquet:row 2", {"text": "fine", "label": 1}, None),
    ]


def test_parquet_missing_column_and_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["a"], "label": [1]}), path)
    with pytest.raises(InvalidDataError, match=r"text column 'text' missing in d.parquet \(columns: body, label\)"):
        load_file(path, "d.parquet", "auto", TEXT_LABEL)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(InvalidDataError, match=r"cannot read broken\.parquet as Parquet"):
        load_file(broken, "broken.parquet", "auto", TEXT_LABEL)


def test_format_by_extension_and_unknown_extensions(tmp_path: Path) -> None:
    assert file_format(Path("a.JSONL"), "auto", "a") == "jsonl"
    assert file_format(Path("a.json"), "auto", "a") == "jsonl"
    assert file_format(Path("a.parquet"), "auto", "a") == "parquet"
    assert file_format(Path("a.txt"), "jsonl", "a") == "jsonl"  # a declared format wins
    with pytest.raises(InvalidDataError) as exc:
        file_format(Path("data/notes.txt"), "auto", "notes.txt")
    assert "cannot tell the format of notes.txt: its extension '.txt'" in str(exc.value)
    assert "set dataset.format" in str(exc.value)


def test_display_names_are_relative_to_the_common_folder() -> None:
    assert display_names([Path("/cache/x/reviews.csv")]) == ["reviews.csv"]
    assert display_names([Path("/cache/x/2024/a.jsonl"), Path("/cache/x/2025/a.jsonl")]) == [
        "2024/a.jsonl",
        "2025/a.jsonl",
    ]
