"""The model card's data section reads as tables and sentences; the JSON stays in model-card.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.trainer.test_report import make_card
from tuneloop_trainer.data.report import FileStats, LabelReport, PiiReport, ReplayReport, ValidationReport
from tuneloop_trainer.report import write_model_card

pytestmark = pytest.mark.unit


def full_report() -> ValidationReport:
    report = ValidationReport(task="sequence-classification", split_seed=42)
    src = report.source("dataset", "s3://data/reviews/")
    src.files = [FileStats("reviews.jsonl", "jsonl", 1200), FileStats("extra.csv", "csv", 30, header=False)]
    for line in (3, 9):
        src.drop("empty", f"reviews.jsonl:{line}")
    src.drop("duplicate_exact", "reviews.jsonl:40", "same as reviews.jsonl:2")
    src.kept = 1227
    test = report.source("test", "s3://data/reviews-test.jsonl")
    test.files = [FileStats("reviews-test.jsonl", "jsonl", 200)]
    test.kept = 200
    report.split_method = {"validation": "hash", "test": "uri"}
    report.sizes = {"train": 1100, "validation": 127, "test": 200}
    report.labels = LabelReport(
        names=["negative", "positive"],
        train={"negative": 900, "positive": 200},
        imbalance_ratio=4.5,
        strategy="class-weights",
        max_imbalance_ratio=3.0,
        action="class-weights",
        class_weights=[0.611, 2.75],
        validation={"negative": 100, "positive": 27},
        test={"negative": 150, "positive": 50},
    )
    report.pii = PiiReport("mask", rows=2, matches={"email": 2, "phone": 1, "card": 0, "ip": 0})
    report.pii.examples = ["reviews.jsonl:17", "reviews.jsonl:88"]
    report.replay = ReplayReport("s3://data/general/", 0.1, rows_added=110)
    report.groups = {"test": {"en": 120, "de": 80}}
    report.lengths = {
        "maxSeqLength": 128,
        "warningShare": 0.05,
        "seconds": 0.012,
        "splits": {
            "train": {
                "rows": 1100,
                "tokens": {"p50": 41, "p90": 97, "p99": 190, "max": 612},
                "truncated": {"rows": 70, "share": 0.0636, "meanTokensCut": 55.5, "maxTokensCut": 484},
            }
        },
    }
    report.data_drift = {
        "againstRun": 2,
        "score": 0.2134,
        "distances": {"labels": 0.05, "lengths": 0.2134, "tokens": 0.1},
        "method": "jensen-shannon",
        "notes": [],
        "reason": "",
    }
    report.warnings = ["maxSeqLength 128 truncates 70 of 1,100 train rows (6.4 %, over the 5 % warning threshold)"]
    report.fingerprint = "sha256:feed"
    return report


def data_section(md: str) -> str:
    start = md.index("## Data\n")
    return md[start : md.index("\n## ", start + 1)]


def test_data_section_is_tables_and_sentences_not_json(tmp_path: Path) -> None:
    report = full_report().to_dict()
    md_path, json_path = write_model_card(make_card(validation_report=report), tmp_path)
    section = data_section(md_path.read_text())
    # No JSON blob anywhere a reader looks.
    assert "{" not in section and '"' not in section
    for expected in (
        "1,430 rows read in all; 3 dropped (2 empty, 1 duplicate exact).",
        "| dataset (`dataset.uri`, before splitting) | `s3://data/reviews/` | 2 | 1,230 | 3 | 1,227 |",
        "| test | `s3://data/reviews-test.jsonl` | 1 | 200 | 0 | 200 |",
        "Read without a header row: `extra.csv`.",
        "| dataset (`dataset.uri`, before splitting) | empty | 2 | reviews.jsonl:3, reviews.jsonl:9 |",
        "| dataset (`dataset.uri`, before splitting) | duplicate exact | 1 "
        "| reviews.jsonl:40 (same as reviews.jsonl:2) |",
        "Held-out splits: validation split off `dataset.uri` by content hash; test read from its own URI (seed 42).",
        "| train | 1,100 |",
        "| Label | train | validation | test |",
        "| negative | 900 | 100 | 150 |",
        "| positive | 200 | 27 | 50 |",
        "Imbalance (most over least frequent class in train): 4.50. Balanced with class weights negative 0.611, "
        "positive 2.75.",
        "Scanned for personal data (action `mask`): 2 rows held some (2 email, 1 phone); masked.",
        "First rows with personal data: reviews.jsonl:17, reviews.jsonl:88.",
        "110 general-domain rows from `s3://data/general/` were mixed into training (ratio 0.1).",
        "| Group | test |",
        "| en | 120 |",
        "Lengths in tokens before truncation, and the rows `maxSeqLength` (128) cut short",
        "| train | 1,100 | 41 | 97 | 190 | 612 | 70 | 6.4 % | 55.5 | 484 |",
        "Against promoted run 2: 0.213 (Jensen-Shannon distance, 0 = same data, 1 = disjoint; the largest of "
        "labels 0.050, lengths 0.213, tokens 0.100).",
        "### Warnings",
        "- maxSeqLength 128 truncates 70 of 1,100 train rows",
    ):
        assert expected in section, expected
    # The machine-readable form is untouched.
    assert json.loads(json_path.read_text())["validationReport"] == json.loads(json.dumps(report))


def test_sparse_and_unknown_parts_still_read_as_text(tmp_path: Path) -> None:
    # An older or partial report (what earlier trainers wrote), a PII scan that was off, a
    # drift that could not be measured, and a key this renderer does not know.
    report = {
        "rowsRead": 1000,
        "dropped": {},
        "pii": {"action": "off", "rows": 0, "matches": {}, "examples": []},
        "dataDrift": {"againstRun": 4, "score": None, "distances": {}, "notes": [], "reason": "run 4 has no profile"},
        "labelIssues": {"suspected": 3, "action": "report", "rows": ["a.jsonl:1", "a.jsonl:7"]},
    }
    md_path, _ = write_model_card(make_card(validation_report=report), tmp_path)
    section = data_section(md_path.read_text())
    assert "{" not in section
    assert "1,000 rows read in all; none dropped." in section
    assert "Not scanned for personal data (`dataset.pii` is off)." in section
    assert "Not measured against promoted run 4: run 4 has no profile." in section
    assert "- labelIssues.suspected: 3" in section
    assert "- labelIssues.rows: a.jsonl:1, a.jsonl:7" in section


def test_no_report_says_so(tmp_path: Path) -> None:
    md_path, _ = write_model_card(make_card(validation_report={}), tmp_path)
    assert "No data validation report was recorded." in data_section(md_path.read_text())
