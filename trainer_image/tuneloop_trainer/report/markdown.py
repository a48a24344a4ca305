"""How values read in the Markdown card and the console summary: numbers, percentages and tables."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tuneloop_trainer.report.jsonsafe import json_safe


def fmt(value: Any) -> str:
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
        return f"`{json.dumps(json_safe(value), sort_keys=True)}`"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cell: Callable[[Any], str] = fmt) -> list[str]:
    """A Markdown table, each value formatted by ``cell`` (pipes escaped, one line per row)."""

    def escaped(value: Any) -> str:
        return cell(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(escaped(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def pct(value: Any) -> str:
    """A relative change as a signed percentage."""
    return f"{value:+.1%}" if isinstance(value, int | float) and math.isfinite(value) else fmt(value)
