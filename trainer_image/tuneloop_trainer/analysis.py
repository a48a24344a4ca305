"""Error analysis after the final evaluation: where the model still fails, not only how often.

From the final evaluation's per-example outputs (no extra forward pass):

* classification: the confusion matrix (``report/confusion_matrix.png`` and a table in the model
  card) and, for each true class, the examples with the highest loss, with their text, label
  and prediction;
* generation tasks: the examples with the lowest ROUGE-L (per example, ``rouge_score``) with
  input, reference and output; when no text was generated (``evaluation.metrics`` without
  rouge or bleu), the examples with the highest loss per token;
* metrics per slice: for each value of the fairness group column and of every
  ``evaluation.slices`` column, its rows and metrics.

Everything written is bounded: a few examples per class, texts cut to
:data:`MAX_TEXT_CHARS`, the most frequent slice values and classes only. Every text and slice
value goes through the PII masking of the data pipeline (:func:`~tuneloop_trainer.data.mask_pii`)
before it is cut, whatever ``dataset.screening.pii`` says: these files are read by more people
than the data is. Written to ``report/error-analysis.json`` and the model card's "Error
analysis" section, with its cost in seconds.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from tuneloop.api.spec import FineTuneJobSpec
from tuneloop_trainer.data import Example
from tuneloop_trainer.data.pii import masked_excerpt

#: Highest-loss examples kept per true class (classification).
WORST_PER_CLASS: Final = 5
#: Lowest-scoring (or highest-loss) examples kept for generation tasks.
WORST_GENERATION: Final = 10
#: Characters kept of each text written (after masking); a cut text ends with "…".
MAX_TEXT_CHARS: Final = 300
#: Characters kept of a slice value or class name.
MAX_VALUE_CHARS: Final = 60
#: Values reported per slice column (the most frequent; the rest are counted as "(other)").
MAX_SLICE_VALUES: Final = 20
#: Classes the confusion matrix shows by name (the most frequent; the rest fold into "(other)").
MAX_MATRIX_CLASSES: Final = 30
#: The card's confusion-matrix table stays readable up to this many classes (the PNG has all).
MAX_CARD_MATRIX_CLASSES: Final = 12
#: Worst examples per class shown in the model card (the JSON keeps :data:`WORST_PER_CLASS`).
CARD_WORST_PER_CLASS: Final = 3

ANALYSIS_JSON: Final = "error-analysis.json"
CONFUSION_PNG: Final = "confusion_matrix.png"
NONE_VALUE: Final = "(none)"
OTHER_VALUE: Final = "(other)"


class EvalResult(Protocol):
    """What the recipe's evaluation returns (``recipe.EvalOutput``), as far as it is read here."""

    @property
    def per_example_loss(self) -> list[float]: ...
    @property
    def per_example_units(self) -> list[int]: ...
    @property
    def predictions(self) -> list[Any]: ...
    @property
    def references(self) -> list[Any]: ...


def safe_text(value: Any, limit: int = MAX_TEXT_CHARS) -> str:
    """``value`` as text with personal data masked, then cut to ``limit`` characters (masked
    first, so that a cut never leaves half an email address unmasked)."""
    return masked_excerpt(value, limit)


def input_text(example: Example) -> str:
    """The input a model read: text, source, prompt, or a conversation without its last answer."""
    fields = example.fields
    if "messages" in fields:
        messages = fields["messages"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1] or messages)
    for role in ("text", "source", "prompt"):
        if role in fields:
            return str(fields[role])
    return ""


@dataclass
class ErrorAnalysis:
    """The analysis of one evaluation split, ready to write (:meth:`write`) and render
    (:func:`render_markdown`)."""

    split: str
    task: str
    rows: int
    confusion: dict[str, Any] | None = None
    """``labels`` (class names, maybe ending in "(other)") and ``matrix`` (rows: true class,
    columns: predicted class)."""
    worst: list[dict[str, Any]] = field(default_factory=list)
    worst_by: str = ""
    """What ranks :attr:`worst`: ``loss`` (classification, per class), ``rougeL`` (lowest
    first) or ``loss_per_token``."""
    slices: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Column → value → ``rows`` and metrics. The fairness group column is listed as
    ``group:<column>``."""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "tuneloop-error-analysis/1",
            "split": self.split,
            "task": self.task,
            "rows": self.rows,
            "confusionMatrix": self.confusion,
            "worstBy": self.worst_by,
            "worstExamples": self.worst,
            "slices": self.slices,
            "notes": list(self.notes),
            "confusionMatrixPng": f"report/{CONFUSION_PNG}" if self.confusion else None,
            "seconds": round(self.seconds, 3),
        }

    def write(self, report_dir: Path) -> list[Path]:
        """``error-analysis.json`` and, for classification, ``confusion_matrix.png``."""
        report_dir.mkdir(parents=True, exist_ok=True)
        path = report_dir / ANALYSIS_JSON
        path.write_text(json.dumps(_finite(self.to_dict()), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        written = [path]
        if self.confusion is not None:
            written.append(plot_confusion(self.confusion["labels"], self.confusion["matrix"], report_dir))
        return written


def analyse_errors(
    spec: FineTuneJobSpec,
    examples: Sequence[Example],
    result: EvalResult,
    label_names: Sequence[str] | None,
    *,
    split: str = "test",
) -> ErrorAnalysis:
    """The error analysis of one evaluation (``result``, in ``examples``' order)."""
    started = time.monotonic()
    analysis = ErrorAnalysis(split=split, task=spec.task, rows=len(examples))
    losses = list(result.per_example_loss)
    units = list(result.per_example_units)
    if len(losses) != len(examples):
        raise ValueError(f"{len(losses)} losses for {len(examples)} examples")
    scores: list[float] | None = None
    if spec.task == "sequence-classification":
        names = [str(n) for n in label_names or []]
        preds = [int(p) for p in result.predictions]
        refs = [int(r) for r in result.references]
        analysis.confusion = confusion(refs, preds, names)
        analysis.worst = worst_per_class(examples, losses, refs, preds, names)
        analysis.worst_by = "loss"
    elif result.predictions and len(result.predictions) == len(examples):
        outputs = [str(p) for p in result.predictions]
        references = [str(r) for r in result.references]
        scores = rouge_l(outputs, references)
        analysis.worst = lowest_scoring(
            examples, scores=scores, outputs=outputs, references=references, losses=losses, units=units
        )
        analysis.worst_by = "rougeL"
    else:
        analysis.worst = highest_loss(examples, losses, units)
        analysis.worst_by = "loss_per_token"
        analysis.notes.append(
            "no text was generated (evaluation.metrics has no rouge or bleu): examples are ranked by loss per token"
        )
    analysis.slices = slice_metrics(spec, examples, result, label_names, scores)
    analysis.seconds = time.monotonic() - started
    return analysis


# --- classification -----------------------------------------------------------------------


def confusion(refs: Sequence[int], preds: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """The confusion matrix (scikit-learn) over the :data:`MAX_MATRIX_CLASSES` most frequent true
    classes by name, every other class folded into "(other)"."""
    from sklearn.metrics import confusion_matrix  # type: ignore[import-untyped]  # noqa: PLC0415

    n = max(len(names), max([*refs, *preds], default=-1) + 1)
    labels = [names[i] if i < len(names) else str(i) for i in range(n)]
    with warnings.catch_warnings():  # one class in the split: a 1×1 matrix is the right answer
        warnings.simplefilter("ignore", UserWarning)
        matrix = confusion_matrix(refs, preds, labels=list(range(n)))
    if n > MAX_MATRIX_CLASSES:
        support = Counter(refs)
        keep = sorted(sorted(range(n), key=lambda c: (-support[c], c))[: MAX_MATRIX_CLASSES - 1])
        groups = [[c] for c in keep] + [[c for c in range(n) if c not in set(keep)]]
        matrix = np.array([[matrix[np.ix_(rows, cols)].sum() for cols in groups] for rows in groups], dtype=np.int64)
        labels = [labels[c] for c in keep] + [OTHER_VALUE]
    return {"labels": [safe_text(x, MAX_VALUE_CHARS) for x in labels], "matrix": matrix.astype(int).tolist()}


def worst_per_class(
    examples: Sequence[Example],
    losses: Sequence[float],
    refs: Sequence[int],
    preds: Sequence[int],
    names: Sequence[str],
) -> list[dict[str, Any]]:
    """For each true class, its :data:`WORST_PER_CLASS` highest-loss examples."""

    def name(i: int) -> str:
        return safe_text(names[i] if 0 <= i < len(names) else str(i), MAX_VALUE_CHARS)

    by_class: dict[int, list[int]] = defaultdict(list)
    for i, ref in enumerate(refs):
        by_class[ref].append(i)
    out: list[dict[str, Any]] = []
    for ref in sorted(by_class):
        ranked = sorted(by_class[ref], key=lambda i: (-_finite_or(losses[i], math.inf), i))[:WORST_PER_CLASS]
        out += [
            {
                "label": name(ref),
                "prediction": name(preds[i]),
                "correct": preds[i] == ref,
                "loss": _round(losses[i]),
                "text": safe_text(input_text(examples[i])),
            }
            for i in ranked
        ]
    return out


# --- generation ---------------------------------------------------------------------------


@functools.cache
def _rouge_l_scorer() -> Any:
    from rouge_score import rouge_scorer  # type: ignore[import-untyped]  # noqa: PLC0415

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(outputs: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure per example (``rouge_score``, Porter stemming, as the run's metrics)."""
    scorer = _rouge_l_scorer()
    return [float(scorer.score(ref, out)["rougeL"].fmeasure) for out, ref in zip(outputs, references, strict=True)]


def lowest_scoring(
    examples: Sequence[Example],
    *,
    scores: Sequence[float],
    outputs: Sequence[str],
    references: Sequence[str],
    losses: Sequence[float],
    units: Sequence[int],
) -> list[dict[str, Any]]:
    """The :data:`WORST_GENERATION` examples with the lowest ROUGE-L, with input, reference and output."""
    ranked = sorted(range(len(examples)), key=lambda i: (scores[i], i))[:WORST_GENERATION]
    return [
        {
            "rougeL": _round(scores[i]),
            "lossPerToken": _round(losses[i] / units[i]) if units[i] else None,
            "input": safe_text(input_text(examples[i])),
            "reference": safe_text(references[i]),
            "output": safe_text(outputs[i]),
        }
        for i in ranked
    ]


def highest_loss(examples: Sequence[Example], losses: Sequence[float], units: Sequence[int]) -> list[dict[str, Any]]:
    """The :data:`WORST_GENERATION` examples with the highest loss per token."""
    per_token = [losses[i] / units[i] if units[i] else -math.inf for i in range(len(examples))]
    ranked = sorted(range(len(examples)), key=lambda i: (-_finite_or(per_token[i], math.inf), i))
    return [
        {"lossPerToken": _round(per_token[i]), "tokens": units[i], "text": safe_text(_full_text(examples[i]))}
        for i in ranked[:WORST_GENERATION]
        if units[i]
    ]


def _full_text(example: Example) -> str:
    fields = example.fields
    if "messages" in fields:
        return "\n".join(f"{m['role']}: {m['content']}" for m in fields["messages"])
    if "prompt" in fields:
        return f"{fields['prompt']}{fields.get('completion', '')}"
    return input_text(example)


# --- slices -------------------------------------------------------------------------------


def slice_metrics(
    spec: FineTuneJobSpec,
    examples: Sequence[Example],
    result: EvalResult,
    label_names: Sequence[str] | None,
    rouge_scores: Sequence[float] | None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Metrics per value of the fairness group column and of each ``evaluation.slices`` column."""
    columns: list[tuple[str, list[str]]] = []
    fairness = spec.evaluation.fairness
    if fairness is not None:
        columns.append((f"group:{fairness.group_column}", [e.group or NONE_VALUE for e in examples]))
    for column in spec.evaluation.slices:
        columns.append((column, [e.slices.get(column) or NONE_VALUE for e in examples]))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for column, values in columns:
        counts = Counter(values)
        kept = [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_SLICE_VALUES]]
        folded = [v if v in set(kept) else OTHER_VALUE for v in values]
        members: dict[str, list[int]] = defaultdict(list)
        for i, value in enumerate(folded):
            members[value].append(i)
        per_value: dict[str, dict[str, Any]] = {}
        for value in [*kept, OTHER_VALUE]:
            if value in members:
                shown = safe_text(value, MAX_VALUE_CHARS)
                per_value[shown] = _metrics_of(spec.task, members[value], result, label_names, rouge_scores)
        out[safe_text(column, MAX_VALUE_CHARS)] = per_value
    return out


def _metrics_of(
    task: str,
    idx: Sequence[int],
    result: EvalResult,
    label_names: Sequence[str] | None,
    rouge_scores: Sequence[float] | None,
) -> dict[str, Any]:
    losses, units = result.per_example_loss, result.per_example_units
    total_units = sum(units[i] for i in idx)
    row: dict[str, Any] = {"rows": len(idx), "eval_loss": _round(sum(losses[i] for i in idx) / max(1, total_units))}
    if task == "sequence-classification":
        from sklearn.metrics import accuracy_score, f1_score  # type: ignore[import-untyped]  # noqa: PLC0415

        refs = [int(result.references[i]) for i in idx]
        preds = [int(result.predictions[i]) for i in idx]
        with warnings.catch_warnings():  # a slice of one class is expected, not worth a warning
            warnings.simplefilter("ignore", UserWarning)
            row["accuracy"] = _round(float(accuracy_score(refs, preds)))
            # Macro F1 over the classes present in the slice: a class it has no row of would count as 0.
            f1 = f1_score(refs, preds, labels=sorted(set(refs)), average="macro", zero_division=0)
        row["f1"] = _round(float(f1))
    elif rouge_scores is not None:
        row["rougeL"] = _round(sum(rouge_scores[i] for i in idx) / len(idx))
    return row


# --- outputs ------------------------------------------------------------------------------


def plot_confusion(labels: Sequence[str], matrix: Sequence[Sequence[int]], directory: Path) -> Path:
    """``confusion_matrix.png``: counts, coloured by the share of each true class (row), so a
    rare class's errors show as clearly as a frequent one's. Drawn on the Agg canvas without
    pyplot, like :func:`tuneloop_trainer.report.plot_curves`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(labels)
    size = min(14.0, 3.0 + 0.45 * n)
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_xticks(
        range(n), [str(x)[:20] for x in labels], rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center"
    )
    ax.set_yticks(range(n), [str(x)[:20] for x in labels])
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    if n <= 15:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j, i, f"{int(counts[i, j])}", ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black", fontsize=9,
                )  # fmt: skip
    fig.tight_layout()
    path = directory / CONFUSION_PNG
    fig.savefig(path, format="png", dpi=100)
    return path


def render_markdown(analysis: Mapping[str, Any] | None) -> list[str]:
    """The model card's "Error analysis" section from :meth:`ErrorAnalysis.to_dict`."""
    if not analysis:
        return []
    out = [
        "## Error analysis",
        "",
        f"Where the selected checkpoint fails on the {analysis.get('split')} split "
        f"({analysis.get('rows', 0):,} rows); `report/{ANALYSIS_JSON}` has all of it. "
        f"Texts are cut to {MAX_TEXT_CHARS} characters and personal data is masked. "
        f"Cost: {float(analysis.get('seconds') or 0.0):.2f} s.",
        "",
    ]
    matrix = analysis.get("confusionMatrix")
    if matrix:
        labels = list(matrix["labels"])
        out += ["### Confusion matrix", ""]
        if len(labels) <= MAX_CARD_MATRIX_CLASSES:
            out += ["Rows: true class; columns: predicted class.", ""]
            out += _table(
                ["true \\ predicted", *labels], [[lab, *row] for lab, row in zip(labels, matrix["matrix"], strict=True)]
            )
        out += [f"![Confusion matrix]({analysis.get('confusionMatrixPng')})", ""]
    worst = list(analysis.get("worstExamples") or [])
    by = analysis.get("worstBy")
    if worst and by == "loss":
        out += ["### Highest-loss examples per class", ""]
        shown: Counter[str] = Counter()
        rows = []
        for w in worst:
            if shown[w["label"]] < CARD_WORST_PER_CLASS:
                shown[w["label"]] += 1
                rows.append([w["label"], w["prediction"], w["loss"], w["text"]])
        out += _table(["Label", "Prediction", "Loss", "Text"], rows)
    elif worst and by == "rougeL":
        out += ["### Lowest-scoring examples (ROUGE-L)", ""]
        out += _table(
            ["ROUGE-L", "Input", "Reference", "Output"],
            [[w["rougeL"], w["input"], w["reference"], w["output"]] for w in worst],
        )
    elif worst:
        out += ["### Highest-loss examples (per token)", ""]
        out += _table(
            ["Loss per token", "Tokens", "Text"], [[w["lossPerToken"], w["tokens"], w["text"]] for w in worst]
        )
    for column, values in (analysis.get("slices") or {}).items():
        metrics = list(dict.fromkeys(k for v in values.values() for k in v if k != "rows"))
        title = f"fairness group `{column.removeprefix('group:')}`" if column.startswith("group:") else f"`{column}`"
        out += [f"### Metrics per {title}", ""]
        out += _table(
            ["Value", "Rows", *metrics],
            [[value, m.get("rows"), *(m.get(k) for k in metrics)] for value, m in values.items()],
        )
    out += [f"- {note}" for note in analysis.get("notes") or []]
    return [*out, ""] if analysis.get("notes") else out


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _round(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def _finite_or(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def _finite(value: Any) -> Any:
    """NaN and infinities as ``None`` (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
