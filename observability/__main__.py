"""``python -m observability [--check]``: write (or check) every generated observability file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

from observability import dashboard, metrics_doc
from observability.layout import render_png

REPO: Final = Path(__file__).resolve().parents[1]
DASHBOARD_JSON: Final = REPO / "helm" / "tuneloop" / "dashboards" / "tuneloop.json"
DOC: Final = REPO / "docs" / "observability.md"
LAYOUT_PNG: Final = REPO / "docs" / "img" / "dashboard-layout.png"


def generated() -> dict[Path, Callable[[], str]]:
    """Each generated text file and how to make its fresh content."""
    return {
        DASHBOARD_JSON: dashboard.render,
        DOC: lambda: metrics_doc.rewrite(DOC.read_text(encoding="utf-8")),
    }


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m observability", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when a generated file is out of date")
    args = parser.parse_args(argv)
    stale: list[Path] = []
    for path, make in generated().items():
        fresh = make()
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == fresh:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(fresh, encoding="utf-8")
            print(f"wrote {_shown(path)}")
    if not args.check:
        # The picture is not checked for drift (font rendering differs between machines); it is
        # redrawn with the JSON.
        LAYOUT_PNG.parent.mkdir(parents=True, exist_ok=True)
        LAYOUT_PNG.write_bytes(render_png(json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))))
    if stale:
        names = ", ".join(_shown(p) for p in stale)
        print(f"out of date: {names}; run `python -m observability` and commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
