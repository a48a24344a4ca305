"""Error analysis and augmentation through the trainer: the files and the card section exist,
hold bounded, masked content, and augmentation adds training rows only."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tests.harness.trainer_jobs import WORDS, manifest, run_recipe, tiny_job, write_jsonl
from tuneloop.api import FineTuneJob
from tuneloop_trainer.analysis import MAX_TEXT_CHARS, WORST_GENERATION, WORST_PER_CLASS
from tuneloop_trainer.data import prepare_data

pytestmark = pytest.mark.integration


def classification_rows(n: int = 90) -> list[dict[str, Any]]:
    rng = random.Random(3)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        positive = i % 2 == 0
        words.insert(rng.randint(0, len(words)), "good" if positive else "bad")
        # Personal data in every row, and long rows: what the analysis writes must mask and cut them.
        text = " ".join(words) + f" contact user{i}@mail.example.com " + "filler " * (60 if i % 4 == 0 else 1)
        rows.append(
            {
                "text": text,
                "label": "pos" if positive else "neg",
                "group": "a" if i % 3 else "b",
                "lang": ("en", "fr")[i % 2],
            }
        )
    return rows


def test_classification_run_writes_error_analysis_and_augments_train_only(tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = tiny_job(
        "sequence-classification",
        tiny_model_dir("bert"),
        tmp_path,
        rows=classification_rows(),
        method={"type": "lora"},
        hyperparameters={"epochs": 1},
        evaluation={"fairness": {"groupColumn": "group", "metric": "accuracy", "maxGap": 1.0}, "slices": ["lang"]},
    )
    m["spec"]["dataset"]["augmentation"] = {"ratio": 1.0, "seed": 5}
    run_recipe(m, tmp_path)

    run_dir = out / "runs" / "1"
    report = run_dir / "report"
    analysis_file = report / "error-analysis.json"
    raw = analysis_file.read_text()
    analysis = json.loads(raw)
    assert "@" not in raw and "[EMAIL]" in raw  # screening.pii is off: the analysis masks anyway
    assert analysis_file.stat().st_size < 20_000
    assert (report / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    test_rows = analysis["rows"]
    matrix = analysis["confusionMatrix"]
    assert matrix["labels"] == ["neg", "pos"]
    assert sum(map(sum, matrix["matrix"])) == test_rows
    per_label: dict[str, int] = {}
    for w in analysis["worstExamples"]:
        per_label[w["label"]] = per_label.get(w["label"], 0) + 1
        assert len(w["text"]) <= MAX_TEXT_CHARS and w["prediction"] in ("neg", "pos")
    assert 0 < max(per_label.values()) <= WORST_PER_CLASS
    assert set(analysis["slices"]) == {"group:group", "lang"}
    assert sum(v["rows"] for v in analysis["slices"]["lang"].values()) == test_rows
    assert set(analysis["slices"]["lang"]) == {"en", "fr"}
    assert analysis["seconds"] >= 0

    card_md = (run_dir / "model-card.md").read_text()
    section = card_md.split("## Error analysis", 1)[1].split("\n## ", 1)[0]
    assert "| true \\ predicted | neg | pos |" in section
    assert "confusion_matrix.png" in section and "### Metrics per `lang`" in section
    assert "@mail.example.com" not in section
    card = json.loads((run_dir / "model-card.json").read_text())
    assert card["errorAnalysis"]["confusionMatrix"] == matrix

    # Augmentation: rows added to train only, counted; validation and test as without it.
    aug = card["validationReport"]["augmentation"]
    sizes = card["validationReport"]["split"]["sizes"]
    assert aug["rowsAdded"] > 0.8 * aug["sourceRows"]
    assert sizes["train"] == aug["sourceRows"] + aug["rowsAdded"]
    plain_spec = FineTuneJob.from_manifest(m).spec.model_copy(deep=True)
    plain_spec.dataset.augmentation = None
    plain = prepare_data(plain_spec, lambda uri: [Path(uri.removeprefix("file://"))])
    assert sizes["validation"] == len(plain.validation) and sizes["test"] == len(plain.test) == test_rows
    assert aug["sourceRows"] == len(plain.train)


def test_seq2seq_run_lists_the_lowest_scoring_outputs(tiny_model_dir, tmp_path: Path) -> None:
    rng = random.Random(1)
    rows = []
    for i in range(60):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        rows.append({"source": " ".join(words) + f" from 192.168.1.{i % 200}", "target": " ".join(words[:3])})
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    m = manifest("seq2seq", tiny_model_dir("t5", base_only=True), data, out, hyperparameters={"epochs": 1})
    run_recipe(m, tmp_path)

    report = out / "runs" / "1" / "report"
    raw = (report / "error-analysis.json").read_text()
    analysis = json.loads(raw)
    assert analysis["worstBy"] == "rougeL"
    worst = analysis["worstExamples"]
    assert 0 < len(worst) <= WORST_GENERATION
    assert [w["rougeL"] for w in worst] == sorted(w["rougeL"] for w in worst)
    assert all({"input", "reference", "output"} <= set(w) for w in worst)
    assert "192.168" not in raw and "[IP]" in raw
    assert not (report / "confusion_matrix.png").exists()
    assert "Lowest-scoring examples (ROUGE-L)" in (out / "runs" / "1" / "model-card.md").read_text()
