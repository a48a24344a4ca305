"""The model card's data section: the validation report as a reader wants it.

``model-card.json`` keeps the report as it is (:meth:`ValidationReport.to_dict`, the form
tools read); the Markdown card renders the same facts as tables and sentences (where the
data came from, what was dropped and why, the splits, labels, personal data, lengths,
drift, warnings), so nobody has to read JSON to know what a model was trained on. Every
part is optional: a report from an older trainer, or one without labels or PII scanning,
renders what it has. A key this module does not know is still shown, as plain
``name: value`` lines, never as a JSON blob.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from tuneloop_trainer.report.markdown import table

#: Keys rendered by a section of their own (everything else goes to "Other facts").
_KNOWN: Final = frozenset(
    {
        "task",
        "rowsRead",
        "dropped",
        "sources",
        "split",
        "labels",
        "pii",
        "replay",
        "groups",
        "warnings",
        "fingerprint",
        "dataDrift",
        "lengths",
    }
)
_SOURCE_NAMES: Final = {
    "dataset": "dataset (`dataset.uri`, before splitting)",
    "validation": "validation",
    "test": "test",
    "replay": "replay",
    "out_of_domain": "out of domain",
    "forgetting": "forgetting",
}
_SPLIT_METHODS: Final = {"hash": "split off `dataset.uri` by content hash", "uri": "read from its own URI"}


def _num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.4g}" if value != int(value) else f"{int(value):,}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A table whose counts read with thousands separators."""
    return table(headers, rows, _num)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _flat(value: Any, prefix: str = "") -> list[str]:
    """``a.b: 1`` lines for a nested value (lists of scalars joined by commas)."""
    if isinstance(value, Mapping):
        if not value:
            return [f"{prefix}: none"] if prefix else []
        return [line for k, v in value.items() for line in _flat(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list | tuple):
        if all(not isinstance(v, Mapping | list | tuple) for v in value):
            return [f"{prefix}: {', '.join(_num(v) for v in value) or 'none'}"]
        return [line for i, v in enumerate(value) for line in _flat(v, f"{prefix}[{i}]")]
    return [f"{prefix}: {_num(value)}"]


def _sources(report: Mapping[str, Any]) -> list[str]:
    sources: Mapping[str, Any] = report.get("sources") or {}
    out: list[str] = []
    dropped_total: Mapping[str, int] = report.get("dropped") or {}
    read = report.get("rowsRead")
    if read is not None or dropped_total:
        sentence = f"{_plural(int(read), 'row')} read in all" if read is not None else "Rows"
        n_dropped = sum(int(v) for v in dropped_total.values())
        if n_dropped:
            reasons = ", ".join(f"{_num(v)} {k.replace('_', ' ')}" for k, v in dropped_total.items())
            sentence += f"; {_num(n_dropped)} dropped ({reasons})."
        else:
            sentence += "; none dropped."
        out += [sentence, ""]
    if not sources:
        return out
    out += ["### Sources", ""]
    out += _table(
        ["Source", "URI", "Files", "Rows read", "Dropped", "Kept"],
        [
            [
                _SOURCE_NAMES.get(name, name),
                f"`{src.get('uri', '')}`",
                len(src.get("files") or []),
                src.get("rowsRead"),
                src.get("rowsDropped"),
                src.get("rowsKept"),
            ]
            for name, src in sources.items()
        ],
    )
    headerless = [
        f"`{f.get('file')}`" for src in sources.values() for f in src.get("files") or [] if not f.get("header", True)
    ]
    if headerless:
        out += [f"Read without a header row: {', '.join(headerless)}.", ""]
    drops = [
        [_SOURCE_NAMES.get(name, name), reason.replace("_", " "), d.get("count"), ", ".join(d.get("examples") or [])]
        for name, src in sources.items()
        for reason, d in (src.get("dropped") or {}).items()
    ]
    if drops:
        out += ["Dropped rows, by source and reason (first rows as `file:line`; row text is never shown):", ""]
        out += _table(["Source", "Reason", "Rows", "For example"], drops)
    return out


def _splits(report: Mapping[str, Any]) -> list[str]:
    split: Mapping[str, Any] = report.get("split") or {}
    sizes: Mapping[str, int] = split.get("sizes") or {}
    if not sizes:
        return []
    out = ["### Splits", ""]
    methods: Mapping[str, str] = split.get("method") or {}
    if methods:
        how = "; ".join(f"{name} {_SPLIT_METHODS.get(m, m)}" for name, m in methods.items())
        out += [f"Held-out splits: {how} (seed {_num(split.get('seed'))}).", ""]
    out += _table(["Split", "Rows"], [[name.replace("_", " "), n] for name, n in sizes.items()])
    return out


def _labels(labels: Mapping[str, Any] | None) -> list[str]:
    if not labels:
        return []
    names: list[str] = list(labels.get("names") or [])
    splits = [s for s in ("train", "validation", "test") if labels.get(s)]
    names += [n for s in splits for n in labels[s] if n not in names]
    out = ["### Labels", ""]
    if names and splits:
        out += _table(["Label", *splits], [[n, *(labels[s].get(n, 0) for s in splits)] for n in names])
    ratio = labels.get("imbalanceRatio")
    sentence = (
        f"Imbalance (most over least frequent class in train): {ratio:.2f}."
        if isinstance(ratio, int | float)
        else "Imbalance: not measured."
    )
    balance: Mapping[str, Any] = labels.get("balance") or {}
    action = balance.get("action") or "none"
    if action == "class-weights" and balance.get("classWeights"):
        sentence += " Balanced with class weights " + ", ".join(
            f"{n} {w:.3g}" for n, w in zip(names, balance["classWeights"], strict=False)
        )
        sentence += "."
    elif action == "oversample" and balance.get("oversampled"):
        sentence += " Balanced by oversampling: " + ", ".join(
            f"{n} +{_num(c)} copies" for n, c in balance["oversampled"].items()
        )
        sentence += "."
    elif balance.get("strategy"):
        sentence += (
            f" Balancing ({balance['strategy']}, limit {_num(balance.get('maxImbalanceRatio'))}) was not needed."
        )
    else:
        sentence += " No balancing was asked for."
    return [*out, sentence, ""]


def _pii(pii: Mapping[str, Any] | None) -> list[str]:
    if not pii:
        return []
    action = pii.get("action", "off")
    if action == "off":
        return ["### Personal data", "", "Not scanned for personal data (`dataset.pii` is off).", ""]
    rows = int(pii.get("rows") or 0)
    did = {"mask": "masked", "drop": "dropped", "fail": "the run fails on them"}.get(action, action)
    kinds = ", ".join(f"{_num(v)} {k}" for k, v in (pii.get("matches") or {}).items() if v)
    sentence = f"Scanned for personal data (action `{action}`): " + (
        f"{_plural(rows, 'row')} held some ({kinds}); {did}." if rows else "none found."
    )
    out = ["### Personal data", "", sentence, ""]
    if pii.get("examples"):
        out += [f"First rows with personal data: {', '.join(pii['examples'])}.", ""]
    return out


def _replay(replay: Mapping[str, Any] | None) -> list[str]:
    if not replay:
        return []
    extra = ", drawn with replacement" if replay.get("withReplacement") else ""
    return [
        "### Replay",
        "",
        f"{_num(replay.get('rowsAdded'))} general-domain rows from `{replay.get('uri')}` were mixed into training "
        f"(ratio {_num(replay.get('ratio'))}{extra}).",
        "",
    ]


def _groups(groups: Mapping[str, Mapping[str, int]] | None) -> list[str]:
    if not groups:
        return []
    splits = list(groups)
    values = list(dict.fromkeys(v for counts in groups.values() for v in counts))
    return [
        "### Fairness groups",
        "",
        *_table(["Group", *splits], [[v, *(groups[s].get(v, 0) for s in splits)] for v in values]),
    ]


def _lengths(lengths: Mapping[str, Any] | None) -> list[str]:
    if not lengths or not lengths.get("splits"):
        return []
    rows = []
    for name, s in lengths["splits"].items():
        t, cut = s.get("tokens") or {}, s.get("truncated") or {}
        share = cut.get("share")
        rows.append(
            [
                name.replace("_", " "),
                s.get("rows"),
                t.get("p50"),
                t.get("p90"),
                t.get("p99"),
                t.get("max"),
                cut.get("rows"),
                f"{100 * share:.1f} %" if isinstance(share, int | float) else None,
                cut.get("meanTokensCut"),
                cut.get("maxTokensCut"),
            ]
        )
    out = [
        "### Lengths",
        "",
        f"Lengths in tokens before truncation, and the rows `maxSeqLength` ({_num(lengths.get('maxSeqLength'))}) "
        "cut short (tokens cut: mean and most, over the truncated rows).",
        "",
        *_table(["Split", "Rows", "p50", "p90", "p99", "Max", "Truncated", "Share", "Mean cut", "Most cut"], rows),
    ]
    targets = [
        [name.replace("_", " "), t["p50"], t["p90"], t["p99"], t["max"]]
        for name, s in lengths["splits"].items()
        if (t := s.get("targetTokens"))
    ]
    if targets:
        out += ["Target lengths (seq2seq), tokens:", "", *_table(["Split", "p50", "p90", "p99", "Max"], targets)]
    return out


def _drift(drift: Mapping[str, Any] | None) -> list[str]:
    if not drift:
        return []
    run = drift.get("againstRun")
    score = drift.get("score")
    if score is None:
        sentence = f"Not measured against promoted run {run}: {drift.get('reason') or 'no reason recorded'}."
    else:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in (drift.get("distances") or {}).items())
        sentence = (
            f"Against promoted run {run}: {score:.3f} (Jensen-Shannon distance, 0 = same data, 1 = disjoint; "
            f"the largest of {parts})."
        )
    notes = [f"- {n}" for n in drift.get("notes") or []]
    return ["### Data drift", "", sentence, "", *notes, *([""] if notes else [])]


def data_section(report: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the model card's data section (after its heading and fingerprint)."""
    if not report:
        return ["No data validation report was recorded.", ""]
    out = _sources(report)
    out += _splits(report)
    out += _labels(report.get("labels"))
    out += _pii(report.get("pii"))
    out += _replay(report.get("replay"))
    out += _groups(report.get("groups"))
    out += _lengths(report.get("lengths"))
    out += _drift(report.get("dataDrift"))
    other = [line for key, value in report.items() if key not in _KNOWN and value for line in _flat(value, key)]
    if other:
        out += ["### Other facts", "", *(f"- {line}" for line in other), ""]
    warnings = report.get("warnings") or []
    if warnings:
        out += ["### Warnings", "", *(f"- {w}" for w in warnings), ""]
    return out
