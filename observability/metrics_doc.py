"""The metrics reference in docs/observability.md, generated from the registries.

The section between :data:`BEGIN` and :data:`END` is rewritten; the prose around it is not.
"""

from __future__ import annotations

from typing import Final

from observability.registry import Family, all_families

BEGIN: Final = "<!-- BEGIN GENERATED METRICS REFERENCE (python -m observability) -->"
END: Final = "<!-- END GENERATED METRICS REFERENCE -->"

_SOURCES: Final = {
    "operator": (
        "### Operator (`tuneloop_operator_*`)",
        "Served by the operator on `TUNELOOP_METRICS_PORT` (8080). Per-job series carry their own "
        "`namespace` and `finetunejob` labels (scrape with `honor_labels: true`); the others are operator-wide.",
    ),
    "trainer": (
        "### Trainer (`tuneloop_trainer_*`)",
        "Served by the node-rank-0 pod of a run on `TUNELOOP_METRICS_PORT` (9400). The pod's namespace "
        "is the Prometheus target label `namespace`, added by the PodMonitor.",
    ),
}


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _row(family: Family) -> str:
    series = [s for s in family.series if not s.endswith("_created")]
    names = ", ".join([f"`{series[0]}`"] + [f"`…{s.removeprefix(family.name)}`" for s in series[1:]])
    labels = ", ".join(f"`{label}`" for label in family.labels) or "—"
    return f"| {names} | {family.type} | {labels} | {_cell(family.help)} |"


def reference(families: list[Family] | None = None) -> str:
    """The generated section, markers included."""
    families = all_families() if families is None else families
    lines = [BEGIN, ""]
    for source, (heading, intro) in _SOURCES.items():
        lines += [heading, "", intro, "", "| Series | Type | Labels | Help |", "|---|---|---|---|"]
        lines += [_row(f) for f in families if f.source == source]
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def rewrite(text: str, section: str | None = None) -> str:
    """``text`` with the generated section replaced (appended under ``## Metrics`` when absent)."""
    section = reference() if section is None else section
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head + section + tail
    heading = "## Metrics\n"
    if heading not in text:
        raise ValueError("docs/observability.md has no '## Metrics' heading to put the reference under")
    head, _, tail = text.partition(heading)
    return f"{head}{heading}\n{section}\n{tail}"
