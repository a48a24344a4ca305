"""The chart's ServiceMonitor and PodMonitor select what really serves metrics.

The monitoring.coreos.com CRDs are not among kubernetes-validate's schemas, so the structure is
checked here, against the objects they must select: the chart's own metrics Service, and trainer
pods as the operator renders them (operator/tuneloop_operator/render.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.manifests import minimal_job
from tuneloop.api import FineTuneJob
from tuneloop_operator.render import render_attempt

pytestmark = pytest.mark.unit

CHART = Path(__file__).resolve().parents[2] / "helm" / "tuneloop"
RELEASE, NAMESPACE = "tl", "tuneloop-system"
UID = "0b7f6c1e-5d2a-4c1b-9e3f-1a2b3c4d5e6f"


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    import helm_python

    rendered = helm_python.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=NAMESPACE)
    return [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if isinstance(doc, dict)
    ]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)} rendered"
    return found[0]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against labels (In, NotIn, Exists, DoesNotExist)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for rule in selector.get("matchExpressions") or []:
        key, op, values = rule["key"], rule["operator"], rule.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def trainer_pods(nodes: int, namespace: str = "ml") -> list[dict[str, Any]]:
    m = minimal_job(task="causal-lm", name="assistant-chat")
    m["metadata"]["namespace"] = namespace
    m["spec"]["resources"] = {"gpus": 1, "nodes": nodes}
    job = FineTuneJob.from_manifest(m)
    owner = {"apiVersion": "tuneloop.dev/v1alpha1", "kind": "FineTuneJob", "name": job.metadata.name, "uid": UID}
    objects = render_attempt(job, 1, 1, image="ghcr.io/tuneloop/trainer:0.1.0", owner=owner)
    return [o for o in objects if o["kind"] == "Pod"]


def container_ports(pod: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []}


MONITORS = {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}


def test_service_monitor_scrapes_the_operator_metrics_service_and_honours_its_labels() -> None:
    objects = render({"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}})
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE and monitor["metadata"]["labels"]["release"] == "kps"
    spec = monitor["spec"]
    assert selects(spec["selector"], service["metadata"]["labels"])
    assert spec["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["honorLabels"] is True  # the per-job series' namespace label wins
    assert endpoint["interval"] == "30s" and "scrapeTimeout" not in endpoint
    # the scrape job is named after the Service: what TuneloopOperatorDown looks for
    rule = one(render({"monitoring": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    down = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "TuneloopOperatorDown")
    assert f'up{{job="{service["metadata"]["name"]}", namespace="{NAMESPACE}"}}' in down["expr"]


def test_pod_monitor_selects_the_rank_zero_trainer_pod_only() -> None:
    monitor = one(render({"monitoring": MONITORS}), "PodMonitor")
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}  # no watchNamespaces: every namespace
    (endpoint,) = spec["podMetricsEndpoints"]
    pods = trainer_pods(nodes=3)
    chosen = [p["metadata"]["name"] for p in pods if selects(spec["selector"], p["metadata"]["labels"])]
    assert chosen == ["assistant-chat-r1-a1-n0"]
    rank0, *others = pods
    assert container_ports(rank0)[endpoint["port"]] == 9400
    assert rank0["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    for pod in others:  # ranks that serve nothing are neither named a metrics port nor annotated
        assert endpoint["port"] not in container_ports(pod)
        assert "prometheus.io/scrape" not in (pod["metadata"].get("annotations") or {})
    # a single-node job's only pod is scraped
    (single,) = trainer_pods(nodes=1)
    assert selects(spec["selector"], single["metadata"]["labels"]) and "metrics" in container_ports(single)
    # the operator's own pod is not a trainer
    deployment = one(render({}), "Deployment")
    assert not selects(spec["selector"], deployment["spec"]["template"]["metadata"]["labels"])


def test_pod_monitor_looks_only_in_the_watched_namespaces() -> None:
    values = {"watchNamespaces": ["ml", "research"], "monitoring": MONITORS | {"podMonitor": {"enabled": True}}}
    monitor = one(render(values), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml", "research"]}


def test_intervals_and_timeouts_are_set_per_monitor() -> None:
    values = {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "10s"},
            "podMonitor": {"enabled": True, "interval": "1m", "labels": {"team": "ml"}},
        }
    }
    objects = render(values)
    (service_endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    pod_monitor = one(objects, "PodMonitor")
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert (service_endpoint["interval"], service_endpoint["scrapeTimeout"]) == ("15s", "10s")
    assert pod_endpoint["interval"] == "1m" and pod_monitor["metadata"]["labels"]["team"] == "ml"


@pytest.mark.parametrize(
    "monitoring",
    [
        {"serviceMonitor": {"enabled": True, "interval": "often"}},
        {"podMonitor": {"enabled": True, "port": "metrics"}},
        {"prometheusRule": {"enabled": True, "thresholds": {"approvalWaitHours": -1}}},
    ],
)
def test_the_schema_refuses_wrong_monitoring_values(monitoring: dict[str, Any]) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmError):
        render({"monitoring": monitoring})
