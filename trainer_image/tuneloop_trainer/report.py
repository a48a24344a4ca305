"""What a run leaves for people to read: the model card, training curves and the summary
table printed at the end of ``tuneloop run``.

The model card is written twice from one :class:`ModelCard`: ``model-card.md`` for people
and ``model-card.json`` for tools, so the two can never disagree. JSON keys are camelCase,
like the API, and non-finite numbers are written as ``null`` (JSON has no NaN).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tuneloop.api.spec import metric_direction
from tuneloop_trainer.analysis import render_markdown as render_error_analysis
from tuneloop_trainer.card_data import data_section
from tuneloop_trainer.evaluation import GateResult, PromotedEvaluation

MODEL_CARD_MD: Final = "model-card.md"
MODEL_CARD_JSON: Final = "model-card.json"
#: Keys of an evaluation record that are coordinates, not metrics.
_EVAL_COORDINATES: Final = frozenset({"step", "epoch"})


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _json_safe(value: Any) -> Any:
    """Replace NaN and infinities with ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# --- training history -------------------------------------------------------------------


@dataclass
class TrainingHistory:
    """Per-step training records and per-evaluation validation records.

    ``train`` rows: ``step``, ``epoch``, ``loss``, ``learning_rate``, ``grad_norm``,
    ``tokens_per_second``. ``eval`` rows: ``step``, ``epoch``, ``eval_loss`` and whatever
    metrics the evaluation computed, under their metric names.
    """

    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)

    def append_train(
        self,
        *,
        step: int,
        epoch: float,
        loss: float,
        learning_rate: float,
        grad_norm: float | None = None,
        tokens_per_second: float | None = None,
    ) -> None:
        self.train.append(
            {
                "step": int(step),
                "epoch": float(epoch),
                "loss": float(loss),
                "learning_rate": float(learning_rate),
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_second": None if tokens_per_second is None else float(tokens_per_second),
            }
        )

    def append_eval(self, *, step: int, epoch: float, **metrics: float) -> None:
        self.eval.append({"step": int(step), "epoch": float(epoch), **{k: float(v) for k, v in metrics.items()}})

    def eval_metric_names(self) -> list[str]:
        """Metric names across all evaluations, in order of first appearance."""
        names: dict[str, None] = {}
        for row in self.eval:
            names.update((k, None) for k in row if k not in _EVAL_COORDINATES)
        return list(names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a NaN loss (a diverged step) becomes ``null``."""
        return {"train": _json_safe(self.train), "eval": _json_safe(self.eval)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingHistory:
        train, evals = data.get("train", []), data.get("eval", [])
        if not isinstance(train, list) or not isinstance(evals, list):
            raise ValueError("a training history has lists under 'train' and 'eval'")
        return cls(train=[dict(r) for r in train], eval=[dict(r) for r in evals])


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have a finite ``key``."""
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        value, step = row.get(key), row.get("step")
        if isinstance(value, int | float) and math.isfinite(value) and step is not None:
            xs.append(float(step))
            ys.append(float(value))
    return xs, ys


def _ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to 0."""
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_curves(history: TrainingHistory, directory: Path) -> list[Path]:
    """Write training curves as PNGs and return the files written.

    * ``loss.png``: training loss per step (raw, and smoothed when noisy) with the
      validation loss at each evaluation: the gap between them shows overfitting.
    * ``learning_rate.png``: the schedule as run (warmup, decay), at its peak: the largest
      parameter group's rate (the head's under layer-wise decay).
    * ``grad_norm.png``: gradient norms before clipping; spikes precede divergence.
    * ``metrics.png``: each validation metric against the step, one panel per metric
      (their scales differ: BLEU is 0-100, F1 0-1).

    A plot with no data is not written. Figures are drawn on the Agg canvas without pyplot,
    so no display is needed and the caller's matplotlib backend and state are untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = directory / name
        fig.savefig(path, format="png", dpi=100)
        written.append(path)

    train_x, train_y = _series(history.train, "loss")
    eval_x, eval_y = _series(history.eval, "eval_loss")
    if train_x or eval_x:
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot()
        if train_x:
            noisy = len(train_y) > 50
            ax.plot(train_x, train_y, color="tab:blue", alpha=0.3 if noisy else 1.0, linewidth=1, label="train")
            if noisy:
                ax.plot(train_x, _ema(train_y, 0.9), color="tab:blue", linewidth=2, label="train (smoothed)")
        if eval_x:
            ax.plot(eval_x, eval_y, color="tab:orange", marker="o", linewidth=2, label="validation")
        ax.set(xlabel="step", ylabel="loss", title="Loss")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss.png")

    for key, title, name in (
        ("learning_rate", "Learning rate", "learning_rate.png"),
        ("grad_norm", "Gradient norm (before clipping)", "grad_norm.png"),
    ):
        xs, ys = _series(history.train, key)
        if not xs:
            continue
        fig = Figure(figsize=(8, 4))
        ax = fig.add_subplot()
        ax.plot(xs, ys, color="tab:green", linewidth=1.5)
        ax.set(xlabel="step", ylabel=key.replace("_", " "), title=title)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        save(fig, name)

    panels = [(m, *_series(history.eval, m)) for m in history.eval_metric_names() if m != "eval_loss"]
    panels = [p for p in panels if p[1]]
    if panels:
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig = Figure(figsize=(4.5 * cols, 3.5 * rows))
        for i, (metric, xs, ys) in enumerate(panels, start=1):
            ax = fig.add_subplot(rows, cols, i)
            ax.plot(xs, ys, color="tab:purple", marker="o", linewidth=1.5)
            better = "lower" if metric_direction(metric) == "min" else "higher"
            ax.set(xlabel="step", title=f"{metric} ({better} is better)")
            ax.grid(alpha=0.3)
        fig.suptitle("Validation metrics")
        save(fig, "metrics.png")
    return written


# --- model card -------------------------------------------------------------------------


@dataclass
class ModelCard:
    """Everything known about one trained model: provenance, data, setup, results, verdict."""

    job: str
    run: int
    task: str
    base_model: str
    method: str
    created: str
    """ISO 8601, UTC."""
    data_fingerprint: str
    """Identifies the exact training, validation and test rows."""
    validation_report: dict[str, Any]
    """The data validation report (rows read, dropped and why, label distribution, …)."""
    hyperparameters: dict[str, Any]
    metrics: dict[str, float]
    """Final metrics on the test split (with ``ood_*``, ``forgetting_increase`` and
    ``fairness_gap`` when those checks ran)."""
    validation_metrics: dict[str, float]
    """Validation metrics of the selected (best) checkpoint."""
    per_class: dict[str, Any] | None
    out_of_domain: dict[str, float] | None
    forgetting: dict[str, Any] | None
    fairness: dict[str, Any] | None
    gates: list[dict[str, Any]]
    passed: bool
    notes: list[str]
    model_uri: str | None
    save_format: str
    promoted: dict[str, Any] | None = None
    """The comparison with the model promoted when the run started (:func:`comparison`);
    ``None`` when nothing was promoted."""
    data_drift: dict[str, Any] | None = None
    """How far the training data moved since the promoted run
    (:meth:`tuneloop_trainer.data.profile.DataDrift.to_dict`); ``None`` when nothing was promoted."""
    baselines: dict[str, Any] | None = None
    """The baselines measured before training and the gain over the best
    (:meth:`tuneloop_trainer.baselines.BaselineReport.to_dict`); ``None`` when they were off."""
    privacy: dict[str, Any] | None = None
    """The differential-privacy guarantee the weights carry
    (:meth:`tuneloop_trainer.privacy.PrivacySpent.to_dict`: ε spent, δ, noise, sampling); ``None``
    when the run trained without ``spec.privacy``."""
    error_analysis: dict[str, Any] | None = None
    """Where the model fails (:meth:`tuneloop_trainer.analysis.ErrorAnalysis.to_dict`): confusion
    matrix, worst examples, metrics per slice."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: camelCase keys at the top level, no NaN."""
        return {_camel(f.name): _json_safe(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Read a card back from :meth:`to_dict`'s form (``null`` metrics become NaN)."""
        kwargs: dict[str, Any] = {f.name: data.get(_camel(f.name)) for f in dataclasses.fields(cls)}
        for name in ("metrics", "validation_metrics"):
            kwargs[name] = {k: math.nan if v is None else float(v) for k, v in (kwargs[name] or {}).items()}
        for name in ("validation_report", "hyperparameters"):
            kwargs[name] = dict(kwargs[name] or {})
        kwargs["gates"] = list(kwargs["gates"] or [])
        kwargs["notes"] = list(kwargs["notes"] or [])
        return cls(**kwargs)


def comparison(
    metrics: Mapping[str, float], gates: Sequence[GateResult], promoted: PromotedEvaluation | None
) -> dict[str, Any] | None:
    """The model card's comparison of the candidate with the promoted model: both evaluated by
    this run on the same splits, per metric, with the gates on each metric."""
    if promoted is None:
        return None
    rows = []
    for name in dict.fromkeys([*metrics, *promoted.metrics]):
        mine, theirs = metrics.get(name), promoted.metrics.get(name)
        difference = mine - theirs if mine is not None and theirs is not None else None
        rows.append(
            {
                "metric": name,
                "candidate": mine,
                "promoted": theirs,
                "difference": difference,
                "better": "lower" if metric_direction(name) == "min" else "higher",
                "gates": [
                    {"passed": g.passed, "minImprovement": g.min_improvement, "message": g.message}
                    for g in gates
                    if g.metric == name
                ],
            }
        )
    return _json_safe({**promoted.to_dict(), "comparison": rows})


def _fmt(value: Any) -> str:
    """A number or value as it reads in a table."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}"
    if isinstance(value, Mapping | list | tuple):
        return f"`{json.dumps(_json_safe(value), sort_keys=True)}`"
    return str(value)


def _cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _pct(value: Any) -> str:
    return f"{value:+.1%}" if isinstance(value, int | float) and math.isfinite(value) else _fmt(value)


def _verdict(card: ModelCard) -> str:
    failed = [str(g.get("metric")) for g in card.gates if not g.get("passed")]
    reasons = [f"gate{'s' if len(failed) > 1 else ''} {', '.join(failed)} failed"] if failed else []
    if card.forgetting is not None and not card.forgetting.get("passed", True):
        reasons.append("the forgetting limit was exceeded")
    if card.fairness is not None and not card.fairness.get("passed", True):
        reasons.append("the fairness gap was exceeded")
    if card.passed:
        return "**Result: passed.** Every promotion gate and limit held; the model may be promoted."
    because = "; ".join(reasons) or "see below"
    return f"**Result: failed — must not be promoted** ({because})."


def _baselines_section(baselines: Mapping[str, Any] | None) -> list[str]:
    """What cheap baselines score on the same split, and how much fine-tuning gained over the best."""
    if not baselines or not baselines.get("baselines"):
        return []
    split = baselines.get("split", "test")
    out = ["### Baselines", "", f"Measured before training on the same {split} split, with the same metrics.", ""]
    rows = baselines["baselines"]
    names = list(dict.fromkeys(k for b in rows for k in b.get("metrics", {})))
    out += _table(
        ["Baseline", *names, "Rows", "Seconds"],
        [
            [f"{b['name']}: {b['description']}", *(b["metrics"].get(n) for n in names), b["rows"], b["seconds"]]
            for b in rows
        ],
    )
    gain = baselines.get("gain")
    if gain:
        out += [f"Gain on {gain['metric']} over the best baseline ({gain['over']}): {gain['value']:+.4g}.", ""]
    costs = baselines.get("seconds") or {}
    if costs:
        out += ["Cost before training: " + ", ".join(f"{k} {v:.1f} s" for k, v in costs.items()) + ".", ""]
    out += [f"{note}." if not str(note).endswith(".") else str(note) for note in baselines.get("notes", [])]
    return out


def _render_markdown(card: ModelCard) -> str:
    out: list[str] = [f"# Model card: {card.job}, run {card.run}", "", _verdict(card), ""]
    out += _table(
        ["", ""],
        [
            ["Task", card.task],
            ["Base model", card.base_model],
            ["Method", f"{card.method} (saved as {card.save_format})"],
            ["Model", card.model_uri],
            ["Created (UTC)", card.created],
            ["Data fingerprint", card.data_fingerprint],
        ],
    )

    out += [
        "## Intended use",
        "",
        "_Not described yet: state who should use this model, on which inputs, and what it must not be used for._",
        "",
    ]

    out += [
        "## Data",
        "",
        f"Data fingerprint `{card.data_fingerprint}`: runs with the same fingerprint trained and were "
        "tested on the same rows.",
        "",
    ]
    out += data_section(card.validation_report)

    out += ["## Training setup", ""]
    out += _table(["Setting", "Value"], list(card.hyperparameters.items()))
    out += _render_privacy(card.privacy)

    out += ["## Results", ""]
    test = {k: v for k, v in card.metrics.items() if not k.startswith(("ood_", "baseline_", "privacy_"))}
    names = list(dict.fromkeys([*test, *card.validation_metrics]))
    if names:
        out += [
            "Test split metrics of the selected checkpoint, with its validation metrics. "
            "Classification metrics are macro averages (every class counts once).",
            "",
        ]
        rows = [
            [
                n,
                test.get(n),
                card.validation_metrics.get(n),
                "lower" if metric_direction(n) == "min" else "higher",
            ]
            for n in names
        ]
        out += _table(["Metric", "Test", "Validation", "Better"], rows)
        if "bleu" in names:
            out += ["BLEU is on sacreBLEU's 0-100 scale; ROUGE and the other scores are on 0-1.", ""]
    else:
        out += ["No metrics were computed.", ""]

    if card.per_class:
        out += ["### Per class (test)", ""]
        out += _table(
            ["Class", "Precision", "Recall", "F1", "Support"],
            [
                [name, s.get("precision"), s.get("recall"), s.get("f1"), s.get("support")]
                for name, s in card.per_class.items()
            ],
        )

    if card.out_of_domain:
        out += ["### Out of domain", "", "The same metrics on the out-of-domain set, beside the test split.", ""]
        rows = []
        for key, value in card.out_of_domain.items():
            base = key.removeprefix("ood_")
            in_domain = card.metrics.get(base)
            delta = value - in_domain if in_domain is not None else None
            rows.append([base, in_domain, value, delta])
        out += _table(["Metric", "Test (in domain)", "Out of domain", "Difference"], rows)

    out += render_error_analysis(card.error_analysis)

    out += _baselines_section(card.baselines)

    out += ["## Promotion gates", ""]
    if card.gates:
        out += _table(
            ["Metric", "Value", "Min", "Max", "Min improvement", "Promoted", "Result", "Detail"],
            [
                [
                    g.get("metric"),
                    g.get("value"),
                    g.get("min"),
                    g.get("max"),
                    g.get("minImprovement"),
                    g.get("promotedValue"),
                    "PASS" if g.get("passed") else "FAIL",
                    g.get("message", ""),
                ]
                for g in card.gates
            ],
        )
    else:
        out += ["No promotion gates are configured.", ""]

    out += _render_comparison(card)
    out += _render_drift(card)

    out += ["## Forgetting", ""]
    if card.forgetting is None:
        out += ["Not checked (`evaluation.forgetting` is not set).", ""]
    else:
        f = card.forgetting
        out += [
            "Perplexity on general-domain text before and after fine-tuning; a rise means the model "
            "lost some of what it knew.",
            "",
        ]
        out += _table(
            ["Base perplexity", "Tuned perplexity", "Increase", "Limit", "Result"],
            [
                [
                    f.get("base"),
                    f.get("tuned"),
                    _pct(f.get("relativeIncrease")),
                    _pct(f.get("maxIncrease")).lstrip("+"),
                    "PASS" if f.get("passed") else "FAIL",
                ]
            ],
        )

    out += ["## Fairness", ""]
    if card.fairness is None:
        out += ["Not checked (`evaluation.fairness` is not set).", ""]
    else:
        fair = card.fairness
        per_group: Mapping[str, Any] = fair.get("perGroup") or {}
        counts: Mapping[str, Any] = fair.get("counts") or {}
        out += [f"`{fair.get('metric')}` per group on the test split.", ""]
        out += _table(["Group", "Rows", str(fair.get("metric"))], [[g, counts.get(g), v] for g, v in per_group.items()])
        out += [
            f"Gap between the best and the worst group: {_fmt(fair.get('gap'))} "
            f"(limit {_fmt(fair.get('maxGap'))}): **{'PASS' if fair.get('passed') else 'FAIL'}**.",
            "",
        ]
        if fair.get("tooSmall"):
            out += [f"Groups too small to judge (rows): {_fmt(fair['tooSmall'])}.", ""]
        if fair.get("missingGroup"):
            out += [f"Rows without a group: {fair['missingGroup']}.", ""]
        if fair.get("message"):
            out += [str(fair["message"]), ""]

    out += ["## Limitations and notes", ""]
    out += [f"- {note}" for note in card.notes]
    out += [
        "- Test metrics come from a held-out split of the training data's source; they say little about "
        "inputs unlike it" + (" (see the out-of-domain results)." if card.out_of_domain else "."),
        "- Fairness is only measured over the groups in the data's group column, if any.",
        "",
    ]
    return "\n".join(out)


def _render_privacy(privacy: Mapping[str, Any] | None) -> list[str]:
    if not privacy:
        return []
    return [
        "## Differential privacy",
        "",
        f"Trained with DP-SGD (Opacus): the weights are **(ε = {_fmt(privacy.get('epsilon'))}, "
        f"δ = {_fmt(privacy.get('delta'))})-differentially private** with respect to each training row "
        f"(target ε {_fmt(privacy.get('targetEpsilon'))}, {privacy.get('accountant', 'rdp').upper()} accountant).",
        "",
        *_table(
            ["Setting", "Value"],
            [
                ["DP-SGD steps", privacy.get("steps")],
                ["Noise multiplier", privacy.get("noiseMultiplier")],
                ["Per-row gradient clipping norm", privacy.get("maxGradNorm")],
                ["Sampling", f"Poisson, rate {_fmt(privacy.get('sampleRate'))}"],
                ["Expected batch size", privacy.get("expectedBatchSize")],
                ["Training rows", privacy.get("trainRows")],
                ["Noise calibration (s)", privacy.get("setupSeconds")],
            ],
        ),
        "The guarantee covers the weights only: the training-loss curve, the data profile and the validation "
        "report are computed from the training rows directly.",
        "",
    ]


def _render_comparison(card: ModelCard) -> list[str]:
    out = ["## Compared with the promoted model", ""]
    promoted = card.promoted
    if promoted is None:
        return [
            *out,
            "No model was promoted when this run started: `minImprovement` gates passed without a comparison.",
            "",
        ]
    run, uri = promoted.get("run"), promoted.get("modelUri")
    if promoted.get("error"):
        return [
            *out,
            f"The promoted model (run {run}, `{uri}`) could not be evaluated: {promoted['error']}. "
            "`minImprovement` gates failed, since there was nothing to compare with; the numbers stored when it was "
            "promoted come from another test split and were not used.",
            "",
        ]
    table = promoted.get("comparison") or []
    ood = any(str(row.get("metric", "")).startswith("ood_") for row in table)
    out += [
        f"This model and the promoted one (run {run}, `{uri}`) were evaluated by this run, by the same code, on "
        f"the same test split{' and out-of-domain set' if ood else ''}: the difference is the models', not the "
        "data's. Difference = this run minus the promoted model.",
        "",
    ]
    rows = []
    for row in table:
        verdicts = [
            ("PASS" if g.get("passed") else "FAIL")
            + (f" (minImprovement {_fmt(g['minImprovement'])})" if g.get("minImprovement") is not None else "")
            for g in row.get("gates") or []
        ]
        rows.append(
            [
                row.get("metric"),
                row.get("candidate"),
                row.get("promoted"),
                row.get("difference"),
                row.get("better"),
                ", ".join(verdicts) or "",
            ]
        )
    out += _table(["Metric", f"Run {card.run} (this)", f"Promoted (run {run})", "Difference", "Better", "Gates"], rows)
    return out


def _render_drift(card: ModelCard) -> list[str]:
    drift = card.data_drift
    if drift is None:
        return []
    out = ["## Data drift", ""]
    against = drift.get("againstRun")
    if drift.get("score") is None:
        return [*out, f"Not measured against the promoted run {against}: {drift.get('reason') or 'unknown'}.", ""]
    out += [
        f"How far this run's training data is from the training data of the promoted run {against}: "
        f"{drift.get('method')}.",
        "",
    ]
    distances: Mapping[str, Any] = drift.get("distances") or {}
    out += _table(["Distribution", "Distance"], [*distances.items(), ["**score**", drift.get("score")]])
    out += [f"- {note}" for note in drift.get("notes") or []]
    return [*out, ""] if drift.get("notes") else out


def write_model_card(card: ModelCard, directory: Path) -> tuple[Path, Path]:
    """Write ``model-card.md`` and ``model-card.json`` into ``directory``; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    md_path, json_path = directory / MODEL_CARD_MD, directory / MODEL_CARD_JSON
    md_path.write_text(_render_markdown(card), encoding="utf-8")
    json_path.write_text(
        json.dumps(card.to_dict(), indent=2, sort_keys=False, allow_nan=False, default=str) + "\n", encoding="utf-8"
    )
    return md_path, json_path


# --- console summary --------------------------------------------------------------------


def _bounds(gate: GateResult) -> str:
    parts = []
    if gate.min is not None:
        parts.append(f">= {gate.min:g}")
    if gate.max is not None:
        parts.append(f"<= {gate.max:g}")
    if gate.min_improvement is not None:
        vs = f" vs {_fmt(gate.promoted_value)}" if gate.promoted_value is not None else " (nothing to compare)"
        parts.append(f"improve {gate.min_improvement:+g}{vs}")
    return ", ".join(parts)


def format_summary_table(
    metrics: Mapping[str, float], gates: Sequence[GateResult], promoted: PromotedEvaluation | None = None
) -> str:
    """A plain-text table of the final metrics and the gates on them, for a terminal or a
    pod log (ASCII only: log pipelines mangle box-drawing characters). With a ``promoted``
    model, a column shows its metrics on the same splits. Failed gates are explained under the
    table."""
    rows: list[tuple[str, ...]] = []
    gated: dict[str, list[GateResult]] = {}
    for g in gates:
        gated.setdefault(g.metric, []).append(g)
    compare = promoted is not None and promoted.error is None
    for name in dict.fromkeys([*metrics, *gated]):
        value = _fmt(metrics[name]) if name in metrics else "missing"
        theirs = () if not compare or promoted is None else (_fmt(promoted.metrics.get(name)),)
        verdicts = [f"{'PASS' if g.passed else 'FAIL'}  {_bounds(g)}" for g in gated.get(name, [])]
        rows += [(name, value, *theirs, v) for v in verdicts or [""]]
    headers: tuple[str, ...] = ("metric", "value", "gate")
    if compare and promoted is not None:
        headers = ("metric", "value", f"promoted (run {promoted.run})", "gate")
    columns = len(headers)
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) if rows else len(headers[i]) for i in range(columns)]

    def line(cells: Sequence[str]) -> str:
        numbers = "  ".join(f"{c:>{w}}" for c, w in zip(cells[1:-1], widths[1:-1], strict=True))
        return f"{cells[0]:<{widths[0]}}  {numbers}  {cells[-1]}".rstrip()

    lines = [line(headers), line(["-" * w for w in widths])]
    lines += [line(r) for r in rows]
    if promoted is not None and promoted.error is not None:
        lines.append(f"\npromoted model (run {promoted.run}) not evaluated: {promoted.error}")
    if gates:
        passed = sum(g.passed for g in gates)
        lines.append(f"\ngates: {passed} of {len(gates)} passed")
        lines += [f"  FAIL {g.metric}: {g.message}" for g in gates if not g.passed]
    else:
        lines.append("\ngates: none configured")
    return "\n".join(lines)
