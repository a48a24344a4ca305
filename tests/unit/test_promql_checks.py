"""Every PromQL expression Tuneloop ships parses and selects only series that really exist.

The expressions: each query of the Grafana dashboard (``helm/tuneloop/dashboards/tuneloop.json``,
its template variables' ``label_values`` selectors included) and each rule of the PrometheusRule
the chart renders with monitoring enabled. "Really exist" means exported by the operator's or the
trainer's own registry (:mod:`observability.registry` builds them as the processes do), or ``up``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from observability.registry import PROMETHEUS_SERIES, Family, exported_series

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tuneloop"
DASHBOARD = CHART / "dashboards" / "tuneloop.json"
#: Labels Prometheus adds to a scraped series (the ServiceMonitor / PodMonitor target labels).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "service", "endpoint"})
#: What Grafana puts in place of the dashboard's variables (any valid value parses the same).
VARIABLES = {
    "datasource": "prometheus",
    "namespace": "ml-team",
    "finetunejob": "support-bot",
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "6h",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*),\s*(?P<label>\w+)\)$")


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in VARIABLES:
            raise AssertionError(f"{expr!r}: unknown dashboard variable ${name}")
        return VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, PromQL)`` for every panel query and every ``label_values`` variable."""
    for panel in dashboard.get("panels") or []:
        for target in panel.get("targets") or []:
            yield f"panel {panel['title']!r} query {target['refId']}", target["expr"]
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") == "query":
            found = _LABEL_VALUES.match(variable["query"])
            assert found, f"variable {variable['name']}: not a label_values() query: {variable['query']!r}"
            yield f"variable {variable['name']!r}", found["selector"]


def monitoring_values() -> dict[str, Any]:
    """The chart's values with every ``monitoring.*.enabled`` switched on."""
    values = yaml.safe_load((CHART / "values.yaml").read_text()) or {}
    monitoring = values.get("monitoring") or {}
    return {
        "monitoring": {
            key: {"enabled": True}
            for key, section in monitoring.items()
            if isinstance(section, dict) and "enabled" in section
        }
    }


def chart_has_rules() -> bool:
    return any("PrometheusRule" in p.read_text() for p in (CHART / "templates").rglob("*.yaml"))


def rule_expressions() -> list[tuple[str, str]]:
    """``(where, PromQL)`` for every rule of every PrometheusRule the chart renders."""
    import helm_python

    rendered = helm_python.Chart.load(str(CHART)).render(
        monitoring_values(), name="tuneloop", namespace="tuneloop-system"
    )
    found: list[tuple[str, str]] = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if not isinstance(doc, dict) or doc.get("kind") != "PrometheusRule":
                continue
            for group in doc["spec"]["groups"]:
                for rule in group["rules"]:
                    name = rule.get("alert") or rule.get("record")
                    found.append((f"{path}: {group['name']}/{name}", str(rule["expr"])))
    return found


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    """The vector selectors of a parsed expression (the metric names and label matchers it uses)."""
    found: list[promql_parser.VectorSelector] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return found


def problems(expr: str, exported: dict[str, Family]) -> list[str]:
    """What is wrong with one expression (empty: nothing)."""
    try:
        found = selectors(substitute(expr))
    except ValueError as exc:
        return [f"does not parse: {exc}"]
    wrong: list[str] = []
    for selector in found:
        matchers = {m.name: m.value for m in selector.matchers.matchers}
        name = selector.name or matchers.get("__name__")
        if name is None:
            wrong.append(f"a selector without a metric name: {selector}")
        elif name in PROMETHEUS_SERIES:
            continue
        elif name not in exported:
            wrong.append(f"{name}: no such metric is exported by the operator or the trainer")
        else:
            allowed = set(exported[name].series_labels) | TARGET_LABELS | {"__name__"}
            wrong += [f"{name}: has no label {label!r}" for label in matchers if label not in allowed]
    if not found:
        wrong.append("selects no series")
    return wrong


@pytest.fixture(scope="module")
def exported() -> dict[str, Family]:
    return exported_series()


def test_the_registries_are_read_for_both_processes(exported: dict[str, Family]) -> None:
    sources = {f.source for f in exported.values()}
    assert sources == {"operator", "trainer"}
    assert exported["tuneloop_operator_reconcile_duration_seconds_bucket"].type == "histogram"
    assert exported["tuneloop_trainer_loss"].type == "gauge"


def test_every_dashboard_query_parses_and_uses_exported_metrics(exported: dict[str, Family]) -> None:
    expressions = list(dashboard_expressions(json.loads(DASHBOARD.read_text())))
    assert len(expressions) >= 20, "the dashboard lost its queries"
    wrong = {where: p for where, expr in expressions if (p := problems(expr, exported))}
    assert not wrong, json.dumps(wrong, indent=1)


def test_every_alert_rule_parses_and_uses_exported_metrics(exported: dict[str, Family]) -> None:
    expressions = rule_expressions()
    if not chart_has_rules():
        assert not expressions
        pytest.skip("the chart has no PrometheusRule template yet")
    assert expressions, "the chart has a PrometheusRule template, but it rendered no rules with monitoring enabled"
    wrong = {where: p for where, expr in expressions if (p := problems(expr, exported))}
    assert not wrong, json.dumps(wrong, indent=1)


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        ('tuneloop_trainer_los{finetunejob="a"}', "tuneloop_trainer_los: no such metric"),
        ("rate(tuneloop_operator_retries[5m])", "tuneloop_operator_retries: no such metric"),  # _total missing
        ('tuneloop_trainer_loss{ftj="a"}', "has no label 'ftj'"),
        ("sum(rate(tuneloop_operator_retries_total[$__rate_interval])", "does not parse"),
    ],
)
def test_a_wrong_expression_is_caught(expr: str, complaint: str, exported: dict[str, Family]) -> None:
    assert any(complaint in p for p in problems(expr, exported)), problems(expr, exported)


def test_a_right_expression_passes(exported: dict[str, Family]) -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le) (rate(tuneloop_operator_reconcile_duration_seconds_bucket"
        '[$__rate_interval]))) or vector(0) and up{job="x"}'
    )
    assert problems(expr, exported) == []
