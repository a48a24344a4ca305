"""A layout sketch of the dashboard: its grid of panel titles drawn from the JSON's ``gridPos``.

Grafana does not run here, so this is not a screenshot: boxes where the panels are, with their
titles and kinds, for the docs. Drawn with matplotlib's Agg canvas (no display needed).
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

_KIND = {"timeseries": "time series", "bargauge": "bar gauge", "stat": "stat", "table": "table"}


def render_png(dashboard: dict[str, Any]) -> bytes:
    """The sketch as PNG bytes (deterministic: no timestamps in the file)."""
    panels = dashboard.get("panels") or []
    bottom = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels), default=1)
    unit = 0.5  # inches per grid row (a Grafana row is 30 px; a column is 1/24 of the width)
    fig = Figure(figsize=(12, bottom * unit * 0.6 + 0.6), dpi=100)  # no pyplot: no global state, no display
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98 - 0.5 / (bottom * unit * 0.6 + 0.6)))
    ax.set_xlim(0, 24)
    ax.set_ylim(bottom, 0)
    ax.axis("off")
    fig.suptitle(f"{dashboard.get('title', '')} dashboard — layout sketch (not a screenshot)", fontsize=11)
    for panel in panels:
        g = panel["gridPos"]
        if panel.get("type") == "row":
            ax.add_patch(Rectangle((g["x"], g["y"]), g["w"], g["h"], facecolor="#dde3ea", edgecolor="none"))
            ax.text(g["x"] + 0.2, g["y"] + g["h"] / 2, panel.get("title", ""), va="center", fontsize=9, weight="bold")
            continue
        ax.add_patch(
            Rectangle(
                (g["x"] + 0.1, g["y"] + 0.1), g["w"] - 0.2, g["h"] - 0.2, facecolor="#f7f8fa", edgecolor="#8a94a6"
            )
        )
        title = "\n".join(textwrap.wrap(panel.get("title", ""), width=max(10, int(g["w"] * 3.2))))
        ax.text(g["x"] + 0.4, g["y"] + 0.6, title, va="top", fontsize=8.5, weight="bold")
        ax.text(
            g["x"] + 0.4,
            g["y"] + g["h"] - 0.5,
            _KIND.get(panel.get("type", ""), panel.get("type", "")),
            va="bottom",
            fontsize=7.5,
            color="#5a6475",
        )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
