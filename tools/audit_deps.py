"""Read pip-audit's JSON report of the pinned constraints and decide CI's verdict.

``.ci/run`` runs ``pip-audit --no-deps --disable-pip -r constraints.txt --format json`` in a
throw-away virtual environment and passes the report here. Every known vulnerability is printed
with the versions that fix it. It fails CI (exit 1) only with ``TUNELOOP_AUDIT_STRICT=1``: some
pins cannot simply move (``torch==2.13.0`` is the CPU build this project's machines install from
disk), so a finding is first a task — bump the pin, or record why it does not apply — and a new
advisory against an old pin must not, by itself, stop every change from landing. Packages
pip-audit could not look up (no network, the index unreachable) are a warning: an unreachable
vulnerability service is not a finding. A missing or unreadable report is the same kind of
trouble (pip-audit could not run) and is a warning too.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def verdict(report: dict[str, object]) -> tuple[int, list[str]]:
    """(exit code, lines to print) for one pip-audit JSON report."""
    deps = report.get("dependencies")
    if not isinstance(deps, list):
        return 0, ["pip-audit: no dependency list in the report; audit skipped"]
    vulnerable = [d for d in deps if isinstance(d, dict) and d.get("vulns")]
    skipped = [d for d in deps if isinstance(d, dict) and d.get("skip_reason")]
    lines = [
        f"{d['name']} {d.get('version')}: {v.get('id')} "
        f"(fixed in {', '.join(v.get('fix_versions') or []) or 'no release'})"
        for d in vulnerable
        for v in d["vulns"]
    ]
    audited = len(deps) - len(skipped)
    lines.append(f"pip-audit: {audited} of {len(deps)} pinned packages audited, {len(vulnerable)} vulnerable")
    if skipped:
        lines.append(
            f"pip-audit: WARNING: {len(skipped)} could not be looked up (network?), e.g. {skipped[0].get('name')}"
        )
    if vulnerable and os.environ.get("TUNELOOP_AUDIT_STRICT") != "1":
        lines.append("pip-audit: WARNING: known vulnerabilities above (CI fails on them with TUNELOOP_AUDIT_STRICT=1)")
        return 0, lines
    return (1 if vulnerable else 0), lines


def main(argv: list[str]) -> int:
    try:
        report = json.loads(Path(argv[1]).read_text())
    except (OSError, ValueError, IndexError) as exc:
        print(f"pip-audit: WARNING: no readable report ({exc}); audit skipped")
        return 0
    code, lines = verdict(report if isinstance(report, dict) else {})
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
