"""The plain-text summary printed at the end of ``tuneloop run``: final metrics and gates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tuneloop_trainer.evaluation import GateResult, PromotedEvaluation
from tuneloop_trainer.report.markdown import fmt


def _bounds(gate: GateResult) -> str:
    parts = []
    if gate.min is not None:
        parts.append(f">= {gate.min:g}")
    if gate.max is not None:
        parts.append(f"<= {gate.max:g}")
    if gate.min_improvement is not None:
        vs = f" vs {fmt(gate.promoted_value)}" if gate.promoted_value is not None else " (nothing to compare)"
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
        value = fmt(metrics[name]) if name in metrics else "missing"
        theirs = () if not compare or promoted is None else (fmt(promoted.metrics.get(name)),)
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
