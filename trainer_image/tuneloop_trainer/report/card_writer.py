"""Writing the model card: ``model-card.md`` for people and ``model-card.json`` for tools,
both from one :class:`~.card.ModelCard`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from tuneloop.api.spec import metric_direction
from tuneloop_trainer.analysis import render_markdown as render_error_analysis
from tuneloop_trainer.report.card import ModelCard
from tuneloop_trainer.report.data_section import data_section
from tuneloop_trainer.report.markdown import fmt, pct, table

MODEL_CARD_MD: Final = "model-card.md"
MODEL_CARD_JSON: Final = "model-card.json"


def write_model_card(card: ModelCard, directory: Path) -> tuple[Path, Path]:
    """Write ``model-card.md`` and ``model-card.json`` into ``directory``; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    md_path, json_path = directory / MODEL_CARD_MD, directory / MODEL_CARD_JSON
    md_path.write_text(render_markdown(card), encoding="utf-8")
    json_path.write_text(
        json.dumps(card.to_dict(), indent=2, sort_keys=False, allow_nan=False, default=str) + "\n", encoding="utf-8"
    )
    return md_path, json_path


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
    out += table(
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


def render_markdown(card: ModelCard) -> str:
    out: list[str] = [f"# Model card: {card.job}, run {card.run}", "", _verdict(card), ""]
    out += table(
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
    out += table(["Setting", "Value"], list(card.hyperparameters.items()))
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
        out += table(["Metric", "Test", "Validation", "Better"], rows)
        if "bleu" in names:
            out += ["BLEU is on sacreBLEU's 0-100 scale; ROUGE and the other scores are on 0-1.", ""]
    else:
        out += ["No metrics were computed.", ""]

    if card.per_class:
        out += ["### Per class (test)", ""]
        out += table(
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
        out += table(["Metric", "Test (in domain)", "Out of domain", "Difference"], rows)

    out += render_error_analysis(card.error_analysis)

    out += _baselines_section(card.baselines)

    out += ["## Promotion gates", ""]
    if card.gates:
        out += table(
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
        out += table(
            ["Base perplexity", "Tuned perplexity", "Increase", "Limit", "Result"],
            [
                [
                    f.get("base"),
                    f.get("tuned"),
                    pct(f.get("relativeIncrease")),
                    pct(f.get("maxIncrease")).lstrip("+"),
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
        out += table(["Group", "Rows", str(fair.get("metric"))], [[g, counts.get(g), v] for g, v in per_group.items()])
        out += [
            f"Gap between the best and the worst group: {fmt(fair.get('gap'))} "
            f"(limit {fmt(fair.get('maxGap'))}): **{'PASS' if fair.get('passed') else 'FAIL'}**.",
            "",
        ]
        if fair.get("tooSmall"):
            out += [f"Groups too small to judge (rows): {fmt(fair['tooSmall'])}.", ""]
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
        f"Trained with DP-SGD (Opacus): the weights are **(ε = {fmt(privacy.get('epsilon'))}, "
        f"δ = {fmt(privacy.get('delta'))})-differentially private** with respect to each training row "
        f"(target ε {fmt(privacy.get('targetEpsilon'))}, {privacy.get('accountant', 'rdp').upper()} accountant).",
        "",
        *table(
            ["Setting", "Value"],
            [
                ["DP-SGD steps", privacy.get("steps")],
                ["Noise multiplier", privacy.get("noiseMultiplier")],
                ["Per-row gradient clipping norm", privacy.get("maxGradNorm")],
                ["Sampling", f"Poisson, rate {fmt(privacy.get('sampleRate'))}"],
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
    compared = promoted.get("comparison") or []
    ood = any(str(row.get("metric", "")).startswith("ood_") for row in compared)
    out += [
        f"This model and the promoted one (run {run}, `{uri}`) were evaluated by this run, by the same code, on "
        f"the same test split{' and out-of-domain set' if ood else ''}: the difference is the models', not the "
        "data's. Difference = this run minus the promoted model.",
        "",
    ]
    rows = []
    for row in compared:
        verdicts = [
            ("PASS" if g.get("passed") else "FAIL")
            + (f" (minImprovement {fmt(g['minImprovement'])})" if g.get("minImprovement") is not None else "")
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
    out += table(["Metric", f"Run {card.run} (this)", f"Promoted (run {run})", "Difference", "Better", "Gates"], rows)
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
    out += table(["Distribution", "Distance"], [*distances.items(), ["**score**", drift.get("score")]])
    out += [f"- {note}" for note in drift.get("notes") or []]
    return [*out, ""] if drift.get("notes") else out
