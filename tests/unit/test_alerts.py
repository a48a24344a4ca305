"""The chart's PrometheusRule, tested by the real ``promtool`` (Debian's ``prometheus`` package).

The rules are taken from the chart as it renders (``monitoring.prometheusRule.enabled``), so what is
tested is what ships: ``promtool check rules`` on the whole rendering, then ``promtool test rules``
on synthetic series that fire each alert and, beside them, series that must not fire it. promtool
compares annotations exactly, so the unit tests run on the rendered groups with the annotations
left out (their templates are checked by ``check rules``, their wording by the tests below).

Skipped where promtool is absent, failed instead when ``TUNELOOP_REQUIRE_PROMETHEUS=1`` (as the
Prometheus harness does, tests/harness/prometheus.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tuneloop"
DOCS = REPO / "docs" / "observability.md"
RELEASE, NAMESPACE = "tl", "tuneloop-system"
OPERATOR = {"job": "tl-operator-metrics", "namespace": NAMESPACE, "instance": "10.0.0.7:8080"}
ALERTS = {
    "TuneloopOperatorDown",
    "TuneloopReconcileErrors",
    "TuneloopRunFailed",
    "TuneloopBackoffExhausted",
    "TuneloopProgressStalled",
    "TuneloopHeartbeatMissing",
    "TuneloopCandidateNotPromoted",
    "TuneloopApprovalPending",
    "TuneloopTriggerStorm",
}


def promtool() -> str:
    binary = os.environ.get("TUNELOOP_PROMTOOL") or shutil.which("promtool")
    if binary is None:
        if os.environ.get("TUNELOOP_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("TUNELOOP_REQUIRE_PROMETHEUS=1 but promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return binary


def render_rules(**rule_values: Any) -> dict[str, Any]:
    """The PrometheusRule the chart renders with the rule enabled (and ``rule_values``)."""
    import helm_python

    values = {"monitoring": {"prometheusRule": {"enabled": True, **rule_values}}}
    rendered = helm_python.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=NAMESPACE)
    found = [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule"
    ]
    assert len(found) == 1, f"expected one PrometheusRule, got {len(found)}"
    return found[0]


def rules_of(rule: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    text = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{text}}}", "values": values}


def alerts(at: str, name: str, *expected: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": e} for e in expected]}


def job(name: str, **labels: str) -> dict[str, str]:
    return {"namespace": "ml", "finetunejob": name, **labels}


def condition(name: str, type_: str, status: str, reason: str) -> dict[str, str]:
    return series(
        "tuneloop_operator_job_condition",
        "1x20",
        **OPERATOR | job(name, condition=type_, status=status, reason=reason),
    )


def trainer(name: str, step: str, training: str) -> list[dict[str, str]]:
    pod = {"namespace": "ml", "finetunejob": name, "run": "1", "instance": f"10.1.0.{len(name)}:9400"}
    pod |= {"job": "tuneloop-system/tl-operator-trainers", "pod": f"{name}-r1-a1-n0"}
    return [
        series("tuneloop_trainer_step", step, **pod),
        series("tuneloop_trainer_phase", training, **pod, phase="training"),
    ]


#: The synthetic series and expected alerts, one promtool test each.
CASES: list[dict[str, Any]] = [
    {  # the operator's target is up, then down: fires 5 minutes after it went down
        "input_series": [series("up", "1x10 0x15", **OPERATOR)],
        "alert_rule_test": [
            alerts("9m", "TuneloopOperatorDown"),
            alerts("14m", "TuneloopOperatorDown"),  # down for 3 minutes: pending
            alerts("17m", "TuneloopOperatorDown", OPERATOR | {"severity": "critical"}),
        ],
    },
    {  # no target at all (the ServiceMonitor selects nothing, the pod is gone): absent() fires
        "input_series": [series("up", "1x20", job="another-operator", namespace=NAMESPACE, instance="x:1")],
        "alert_rule_test": [
            alerts("3m", "TuneloopOperatorDown"),
            alerts(
                "6m", "TuneloopOperatorDown", {"job": OPERATOR["job"], "namespace": NAMESPACE, "severity": "critical"}
            ),
        ],
    },
    {  # two failed reconciles a minute for 15 minutes fire; one every two minutes does not
        "input_series": [
            series("tuneloop_operator_reconcile_errors_total", "0+2x40", **OPERATOR),
            series("tuneloop_operator_reconcile_errors_total", "0+0.5x40", **OPERATOR | {"job": "quiet-operator"}),
        ],
        "alert_rule_test": [
            alerts("10m", "TuneloopReconcileErrors"),
            alerts(
                "30m",
                "TuneloopReconcileErrors",
                {"job": OPERATOR["job"], "namespace": NAMESPACE, "severity": "warning"},
            ),
        ],
    },
    {  # per-job conditions: which failure is which alert, and what fires nothing
        "input_series": [
            condition("a", "Failed", "True", "InvalidData"),
            condition("b", "Failed", "True", "BackoffLimitExceeded"),
            condition("c", "Failed", "False", "Succeeded"),
            condition("c", "Promoted", "True", "Promoted"),
            condition("d", "Failed", "True", "GateFailed"),
            condition("d", "Promoted", "False", "NotPromoted"),
            condition("e", "Failed", "True", "InvalidConfig"),
            condition("e", "Promoted", "False", "NotPromoted"),  # the run failed: not a candidate
            condition("f", "Failed", "False", "Succeeded"),
            condition("f", "Promoted", "False", "NotPromoted"),
            condition("g", "Promoted", "Unknown", "AwaitingApproval"),
            condition("h", "Failed", "True", "PreemptionLimitExceeded"),
            condition("i", "Failed", "True", "Superseded"),
        ],
        "alert_rule_test": [
            alerts("0m", "TuneloopRunFailed"),  # pending for a minute first
            alerts(
                "5m",
                "TuneloopRunFailed",
                job("a", reason="InvalidData", severity="warning"),
                job("e", reason="InvalidConfig", severity="warning"),
            ),
            alerts(
                "5m",
                "TuneloopBackoffExhausted",
                job("b", reason="BackoffLimitExceeded", severity="warning"),
                job("h", reason="PreemptionLimitExceeded", severity="warning"),
            ),
            alerts(
                "5m",
                "TuneloopCandidateNotPromoted",
                job("d", severity="info"),
                job("f", severity="info"),
            ),
        ],
    },
    {  # heartbeat age: a grows a minute per minute, b's trainer keeps writing
        "input_series": [
            series("tuneloop_operator_job_heartbeat_age_seconds", "0+60x30", **OPERATOR | job("a")),
            series("tuneloop_operator_job_heartbeat_age_seconds", "100x30", **OPERATOR | job("b")),
        ],
        "alert_rule_test": [
            alerts("15m", "TuneloopHeartbeatMissing"),  # 900 s: not more than 15 minutes yet
            alerts("16m", "TuneloopHeartbeatMissing", job("a", severity="warning")),
        ],
    },
    {  # approval: a waits an hour more every minute, b an hour in all
        "input_series": [
            series("tuneloop_operator_job_awaiting_approval_seconds", "0+3600x30", **OPERATOR | job("a")),
            series("tuneloop_operator_job_awaiting_approval_seconds", "3600x30", **OPERATOR | job("b")),
        ],
        "alert_rule_test": [
            alerts("24m", "TuneloopApprovalPending"),
            alerts("25m", "TuneloopApprovalPending", job("a", severity="warning")),
        ],
    },
    {  # stalls: a trains 20 steps then hangs; b validates for 40 minutes (step 0), then hangs
        # in training; c trains steadily. The stall is counted in phase training only.
        "input_series": [
            *trainer("a", "0+1x20 20x60", "1x80"),
            *trainer("bb", "0x80", "0x40 1x40"),
            *trainer("ccc", "0+1x80", "1x80"),
        ],
        "alert_rule_test": [
            alerts("45m", "TuneloopProgressStalled"),
            alerts("55m", "TuneloopProgressStalled", job("a", run="1", severity="warning")),
            alerts(
                "75m",
                "TuneloopProgressStalled",
                job("a", run="1", severity="warning"),
                job("bb", run="1", severity="warning"),
            ),
        ],
    },
    {  # triggers: a is suppressed once a minute; b stopped an hour ago; c 12 times an hour
        "input_series": [
            series(
                "tuneloop_operator_job_triggers_suppressed_total", "0+1x120", **OPERATOR | job("a", trigger="Drift")
            ),
            series(
                "tuneloop_operator_job_triggers_suppressed_total",
                "0+1x10 10x110",
                **OPERATOR | job("b", trigger="NewData"),
            ),
            series(
                "tuneloop_operator_job_triggers_suppressed_total",
                "0+0.2x120",
                **OPERATOR | job("c", trigger="Schedule"),
            ),
        ],
        "alert_rule_test": [alerts("100m", "TuneloopTriggerStorm", job("a", severity="warning"))],
    },
]


def write_rules(rule: dict[str, Any], directory: Path, *, annotations: bool) -> Path:
    groups = rule["spec"]["groups"]
    if not annotations:
        groups = [
            {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups
        ]
    path = directory / ("rules.yaml" if annotations else "rules-for-tests.yaml")
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def run(binary: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_checks_the_shipped_rules(tmp_path: Path) -> None:
    binary = promtool()
    rule = render_rules()
    assert {r["alert"] for r in rules_of(rule)} == ALERTS
    checked = run(binary, "check", "rules", str(write_rules(rule, tmp_path, annotations=True)), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(ALERTS)} rules found" in checked.stdout


def test_each_alert_fires_and_does_not_fire_on_synthetic_series(tmp_path: Path) -> None:
    binary = promtool()
    rules = write_rules(render_rules(), tmp_path, annotations=False)
    tested = {t["alertname"] for case in CASES for t in case["alert_rule_test"]}
    assert tested == ALERTS
    spec = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", **case} for case in CASES],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run(binary, "test", "rules", "tests.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_thresholds_come_from_values(tmp_path: Path) -> None:
    binary = promtool()
    thresholds = {
        "stalledMinutes": 10,
        "heartbeatMissingMinutes": 5,
        "approvalWaitHours": 2.5,
        "triggerStormCount": 3,
        "triggerStormWindow": "30m",
        "reconcileErrorsPerMinute": 0.2,
        "operatorDownMinutes": 2,
    }
    rule = render_rules(thresholds=thresholds, operatorJob="my-operator")
    by_name = {r["alert"]: r for r in rules_of(rule)}
    assert "changes(tuneloop_trainer_step[10m])" in by_name["TuneloopProgressStalled"]["expr"]
    assert "offset 10m" in by_name["TuneloopProgressStalled"]["expr"]
    assert "> 5 * 60" in by_name["TuneloopHeartbeatMissing"]["expr"]
    assert "> 2.5 * 3600" in by_name["TuneloopApprovalPending"]["expr"]
    assert "[30m]" in by_name["TuneloopTriggerStorm"]["expr"] and "> 3" in by_name["TuneloopTriggerStorm"]["expr"]
    assert "> 0.2" in by_name["TuneloopReconcileErrors"]["expr"]
    assert by_name["TuneloopOperatorDown"]["for"] == "2m"
    assert 'up{job="my-operator", namespace="tuneloop-system"}' in by_name["TuneloopOperatorDown"]["expr"]
    checked = run(binary, "check", "rules", str(write_rules(rule, tmp_path, annotations=True)), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_missing_threshold_is_refused_by_the_schema() -> None:
    import helm_python

    values = {"monitoring": {"prometheusRule": {"enabled": True, "thresholds": {"stalledMinutes": "soon"}}}}
    with pytest.raises(helm_python.HelmError):
        helm_python.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=NAMESPACE)


def test_every_alert_says_what_and_where_and_links_its_runbook_section() -> None:
    docs = DOCS.read_text()
    headings = {m.group(1).lower() for m in re.finditer(r"^### (\w+)\s*$", docs, re.MULTILINE)}
    for r in rules_of(render_rules()):
        name, annotations = r["alert"], r["annotations"]
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        anchor = annotations["runbook_url"].rpartition("#")[2]
        assert annotations["runbook_url"].startswith(
            "https://github.com/tuneloop/tuneloop/blob/main/docs/observability.md#"
        )
        assert anchor == name.lower() and anchor in headings, f"{name}: no '### {name}' in docs/observability.md"
        if "finetunejob" in r["expr"] or "tuneloop_operator_job_" in r["expr"]:
            for field in ("summary", "description"):
                text = annotations[field]
                assert "{{ $labels.namespace }}/{{ $labels.finetunejob }}" in text, (name, field)
        assert "$" not in annotations["description"].replace("{{ $", ""), f"{name}: an unfilled placeholder"


def test_no_prometheus_rule_unless_enabled() -> None:
    import helm_python

    rendered = helm_python.Chart.load(str(CHART)).render({}, name=RELEASE, namespace=NAMESPACE)
    kinds = {
        doc.get("kind")
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if isinstance(doc, dict)
    }
    assert not kinds & {"PrometheusRule", "ServiceMonitor", "PodMonitor"}
