"""End to end: a real Prometheus scrapes the operator and a trainer pod during a run, and every
query of the Grafana dashboard returns data for the job.

Prometheus is configured as the chart's monitors configure it: the operator scraped with
``honor_labels: true`` (its per-job series keep their own ``namespace``) and target labels
``namespace``/``pod`` of the operator's pod; the trainer pod found when it appears (file-based
discovery stands in for the PodMonitor) with its ``namespace``, ``pod`` and ``container`` as
target labels. Scrapes every second; the dashboard's rate windows become 4 s (Grafana's
``$__rate_interval`` for a 1 s scrape interval).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.e2e.test_operator_e2e import NS, SECRET, job_manifest, phase_is, wait_status
from tests.harness.k8s_fixtures import K8sApi
from tests.harness.kubelet import LocalKubelet
from tests.harness.operator import OperatorProcess, free_port
from tests.harness.prometheus import (
    REQUIRE_ENV,
    SKIP_REASON,
    PrometheusServer,
    _wait_ready,
    get_json,
    prometheus_binary,
)
from tests.harness.s3 import S3Harness
from tests.harness.trainer_jobs import rows_for, write_jsonl
from tests.unit.test_promql_checks import DASHBOARD, dashboard_expressions

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

JOB = "watched"
OPERATOR_NAMESPACE = "tuneloop-system"
RATE_INTERVAL = "4s"


def start_prometheus(directory: Path, operator_target: str) -> PrometheusServer:
    binary = prometheus_binary()
    if binary is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {SKIP_REASON}")
        pytest.skip(SKIP_REASON)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trainers.json").write_text("[]")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {  # the ServiceMonitor
                "job_name": "tuneloop-operator",
                "honor_labels": True,
                "static_configs": [
                    {
                        "targets": [operator_target],
                        "labels": {
                            "namespace": OPERATOR_NAMESPACE,
                            "pod": "tuneloop-operator-0",
                            "service": "tuneloop",
                        },
                    }
                ],
            },
            {  # the PodMonitor
                "job_name": f"{OPERATOR_NAMESPACE}/tuneloop-trainer",
                "file_sd_configs": [{"files": [str(directory / "trainers.json")], "refresh_interval": "1s"}],
            },
        ],
    }
    server = PrometheusServer.launch(binary, config, directory)
    try:
        _wait_ready(server, 60)
    except BaseException:
        server.stop()
        raise
    return server


def discover_trainer(directory: Path, pod: dict[str, Any], port: int) -> None:
    """What the PodMonitor's discovery gives Prometheus: the pod's metrics port and target labels."""
    target = [
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {
                "namespace": pod["metadata"]["namespace"],
                "pod": pod["metadata"]["name"],
                "container": "trainer",
            },
        }
    ]
    staged = directory / "trainers.json.new"
    staged.write_text(json.dumps(target))
    staged.replace(directory / "trainers.json")


@pytest.fixture
def prometheus_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tuneloop-dashboard-") as scratch:
        yield Path(scratch)


def query(server: PrometheusServer, expr: str, *, start: float, end: float, instant: bool) -> Any:
    if instant:
        params = {"query": expr, "time": f"{end:.3f}"}
        return get_json(f"{server.url}/api/v1/query?{urlencode(params)}")
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"}
    return get_json(f"{server.url}/api/v1/query_range?{urlencode(params)}")


def has_data(answer: Any, instant: bool) -> bool:
    if not isinstance(answer, dict) or answer.get("status") != "success":
        return False
    result = answer["data"]["result"]
    if instant:
        return len(result) > 0
    return any(math.isfinite(float(v)) for series in result for _, v in series["values"])


def test_every_dashboard_query_returns_data_for_a_run(  # noqa: PLR0917 - fixtures
    k8s_api: K8sApi,
    k8s_kubeconfig: Path,
    crd: dict[str, Any],
    s3: S3Harness,
    tiny_model_dir: Any,
    tmp_path: Path,
    prometheus_dir: Path,
) -> None:
    del crd
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NS},
            "stringData": {"AWS_ACCESS_KEY_ID": "tuneloop-test", "AWS_SECRET_ACCESS_KEY": "not-a-secret"},
        }
    )
    trainer_port = free_port()
    operator = OperatorProcess(
        k8s_kubeconfig, tmp_path / "operator.log", env={"TUNELOOP_TRAINER_METRICS_PORT": str(trainer_port)}
    )
    server = start_prometheus(prometheus_dir, f"127.0.0.1:{operator.metrics_port}")
    kubelet = LocalKubelet(
        k8s_api,
        tmp_path / "kubelet",
        env_overrides={"TUNELOOP_FAULT_STEP_DELAY": "0.25", "HF_HUB_OFFLINE": "1", "TUNELOOP_LOG_LEVEL": "INFO"},
    )
    try:
        operator.start()
        kubelet.start()
        start = time.time()
        data = write_jsonl(tmp_path / "data" / "reviews.jsonl", rows_for("sequence-classification", "text", n=80))
        k8s_api.create(job_manifest(JOB, tiny_model_dir("bert"), data, s3))

        pod = k8s_api.wait_for(
            lambda: next(iter(k8s_api.list("v1", "Pod", NS, label_selector=f"tuneloop.dev/job={JOB}")), None),
            timeout=60,
            message="the trainer pod",
        )
        discover_trainer(prometheus_dir, pod, trainer_port)
        done = wait_status(k8s_api, JOB, phase_is("Succeeded", "Failed"), timeout=150, what="the end of the run")
        assert done["phase"] == "Succeeded", json.dumps(done, indent=1)
        time.sleep(3)  # the last scrapes of the operator's counters
        end = time.time()

        variables = {
            "$namespace": NS,
            "$finetunejob": JOB,
            "$__rate_interval": RATE_INTERVAL,
            "$__range": f"{math.ceil(end - start)}s",
            "$__interval": "1s",
        }
        dashboard = json.loads(DASHBOARD.read_text())
        targets = {
            f"panel {panel['title']!r} query {target['refId']}": target
            for panel in dashboard["panels"]
            for target in panel.get("targets") or []
        }
        assert len(targets) == sum(1 for where, _ in dashboard_expressions(dashboard) if where.startswith("panel"))
        empty: dict[str, str] = {}
        for where, target in targets.items():
            expr = target["expr"]
            for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            answer = query(server, expr, start=start, end=end, instant=bool(target.get("instant")))
            if not has_data(answer, bool(target.get("instant"))):
                empty[where] = f"{expr}\n  -> {json.dumps(answer)[:300]}"
        assert not empty, "dashboard queries without data:\n" + "\n".join(f"{k}: {v}" for k, v in empty.items())

        # The variables' own queries list the job.
        answer = get_json(
            f"{server.url}/api/v1/label/finetunejob/values?{urlencode({'match[]': 'tuneloop_operator_job_phase'})}"
        )
        assert JOB in answer["data"]
    except BaseException:
        print(operator.logs()[-6000:])
        print(server.log_tail())
        for pod_name, tail in kubelet.log_tails().items():
            print(f"--- pod {pod_name}\n{tail}")
        raise
    finally:
        kubelet.stop()
        operator.stop()
        server.stop()
