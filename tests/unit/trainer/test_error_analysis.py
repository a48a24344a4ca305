"""Error analysis: confusion matrix, worst examples, metrics per slice; bounded and masked."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tuneloop.api.spec import FineTuneJobSpec
from tuneloop_trainer.analysis import (
    MAX_SLICE_VALUES,
    MAX_TEXT_CHARS,
    WORST_GENERATION,
    WORST_PER_CLASS,
    analyse_errors,
    render_markdown,
    safe_text,
)
from tuneloop_trainer.data import Example

pytestmark = pytest.mark.unit


@dataclass
class Result:
    per_example_loss: list[float]
    per_example_units: list[int]
    predictions: list[Any] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)


def spec(task: str = "sequence-classification", **evaluation: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "task": task,
            "model": {"uri": "hf://org/model"},
            "dataset": {"uri": "file:///data.jsonl"},
            "evaluation": evaluation,
            "output": {"uri": "file:///tmp/out/"},
        }
    )


def test_classification_confusion_worst_examples_and_slices(tmp_path: Path) -> None:
    names = ["neg", "pos", "neutral"]
    refs = [0, 0, 0, 1, 1, 1, 2, 2, 0, 1] * 3
    preds = [0, 1, 0, 1, 1, 0, 2, 0, 0, 1] * 3
    losses = [0.1 + 0.1 * i if r != p else 0.05 for i, (r, p) in enumerate(zip(refs, preds, strict=True))]
    examples = [
        Example(
            {"text": f"row {i} write to jane.doe{i}@example.com " + "long " * 200, "label": r},
            f"u{i}",
            group="a" if i % 2 else "b",
            slices={"lang": "en" if i < 20 else "fr"},
        )
        for i, r in enumerate(refs)
    ]
    s = spec(fairness={"groupColumn": "g", "metric": "accuracy", "maxGap": 1.0}, slices=["lang"])
    analysis = analyse_errors(s, examples, Result(losses, [1] * 30, preds, refs), names)

    cm = analysis.confusion
    assert cm is not None and cm["labels"] == names
    # Rows: true class, columns: predicted class.
    for t in range(3):
        for p in range(3):
            assert cm["matrix"][t][p] == sum(1 for r, q in zip(refs, preds, strict=True) if (r, q) == (t, p))

    by_label: dict[str, list[dict[str, Any]]] = {}
    for w in analysis.worst:
        by_label.setdefault(w["label"], []).append(w)
    assert set(by_label) == set(names)
    assert all(len(v) <= WORST_PER_CLASS for v in by_label.values())
    worst_neg = by_label["neg"][0]
    neg_losses = [(loss, i) for i, (loss, r) in enumerate(zip(losses, refs, strict=True)) if r == 0]
    assert worst_neg["loss"] == pytest.approx(max(neg_losses)[0])
    assert worst_neg["prediction"] == "pos" and worst_neg["correct"] is False
    for w in analysis.worst:
        assert "@" not in w["text"] and "[EMAIL]" in w["text"]
        assert len(w["text"]) <= MAX_TEXT_CHARS and w["text"].endswith("…")

    lang = analysis.slices["lang"]
    assert lang["en"]["rows"] == 20 and lang["fr"]["rows"] == 10
    en = range(20)
    assert lang["en"]["accuracy"] == pytest.approx(sum(refs[i] == preds[i] for i in en) / 20)
    group = analysis.slices["group:g"]
    assert group["a"]["rows"] == group["b"]["rows"] == 15

    written = analysis.write(tmp_path)
    assert [p.name for p in written] == ["error-analysis.json", "confusion_matrix.png"]
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    stored = json.loads((tmp_path / "error-analysis.json").read_text())
    assert stored["confusionMatrix"]["matrix"] == cm["matrix"]
    assert stored["seconds"] >= 0
    assert "example.com" not in (tmp_path / "error-analysis.json").read_text()

    md = "\n".join(render_markdown(analysis.to_dict()))
    assert "## Error analysis" in md and "| true \\ predicted | neg | pos | neutral |" in md
    assert "| neg | 9 | 3 | 0 |" in md  # 12 neg rows: 9 right, 3 taken for pos
    assert "### Metrics per `lang`" in md and "### Metrics per fairness group `g`" in md
    assert "example.com" not in md


def test_many_classes_fold_into_other_and_the_card_points_to_the_png() -> None:
    n = 40
    refs = [i % n for i in range(200)]
    preds = [(i + 1) % n if i % 5 == 0 else i % n for i in range(200)]
    names = [f"class{i}" for i in range(n)]
    examples = [Example({"text": f"t{i}", "label": r}, f"u{i}") for i, r in enumerate(refs)]
    analysis = analyse_errors(spec(), examples, Result([1.0] * 200, [1] * 200, preds, refs), names)
    cm = analysis.confusion
    assert cm is not None
    assert len(cm["labels"]) == 30 and cm["labels"][-1] == "(other)"
    assert sum(map(sum, cm["matrix"])) == 200  # nothing lost in the folding
    md = "\n".join(render_markdown(analysis.to_dict()))
    assert "true \\ predicted" not in md and "confusion_matrix.png" in md


def test_slice_values_are_bounded_and_masked() -> None:
    values = [f"v{i}" for i in range(30)] + ["call +44 20 7946 0958"]
    examples = [Example({"text": "x", "label": 0}, f"u{i}", slices={"src": values[i % len(values)]}) for i in range(93)]
    result = Result([0.5] * 93, [1] * 93, [0] * 93, [0] * 93)
    analysis = analyse_errors(spec(slices=["src"]), examples, result, ["a"])
    src = analysis.slices["src"]
    assert len(src) == MAX_SLICE_VALUES + 1 and "(other)" in src
    assert sum(v["rows"] for v in src.values()) == 93
    assert not any("7946" in k for k in src)


def test_generation_lists_the_lowest_rouge_l_with_reference_and_output() -> None:
    refs = [f"the answer is {i}" for i in range(15)]
    outs = [r if i % 3 else "something else entirely" for i, r in enumerate(refs)]
    examples = [Example({"source": f"question {i} from 10.0.0.{i}", "target": r}, f"u{i}") for i, r in enumerate(refs)]
    analysis = analyse_errors(
        spec("seq2seq", slices=["topic"]),
        examples,
        Result([2.0] * 15, [4] * 15, outs, refs),
        None,
    )
    assert analysis.confusion is None and analysis.worst_by == "rougeL"
    assert len(analysis.worst) == WORST_GENERATION
    scores = [w["rougeL"] for w in analysis.worst]
    assert scores == sorted(scores) and scores[0] == 0.0
    first = analysis.worst[0]
    assert first["output"] == "something else entirely" and first["reference"].startswith("the answer is")
    assert "10.0.0" not in first["input"] and "[IP]" in first["input"]
    assert analysis.slices["topic"]["(none)"]["rows"] == 15
    assert 0 < analysis.slices["topic"]["(none)"]["rougeL"] < 1
    md = "\n".join(render_markdown(analysis.to_dict()))
    assert "Lowest-scoring examples (ROUGE-L)" in md


def test_language_modelling_without_generation_ranks_by_loss_per_token() -> None:
    examples = [Example({"text": f"text number {i}"}, f"u{i}") for i in range(12)]
    losses = [float(i) for i in range(12)]
    units = [2] * 12
    analysis = analyse_errors(spec("causal-lm"), examples, Result(losses, units), None)
    assert analysis.worst_by == "loss_per_token"
    assert [w["lossPerToken"] for w in analysis.worst][:2] == [5.5, 5.0]
    assert analysis.notes


def test_safe_text_masks_before_cutting() -> None:
    text = "x" * 290 + " mail me at someone@example.org please"
    out = safe_text(text)
    assert "someone" not in out and len(out) <= MAX_TEXT_CHARS


def test_slices_api_is_validated() -> None:
    assert spec(slices=["lang", "source"]).evaluation.slices == ["lang", "source"]
    with pytest.raises(ValidationError, match="listed twice"):
        spec(slices=["lang", "lang"])
    with pytest.raises(ValidationError, match="is the task's text column"):
        spec(slices=["text"])
