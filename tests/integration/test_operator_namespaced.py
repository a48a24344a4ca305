"""The operator in the chart's namespaced RBAC mode (``TUNELOOP_NAMESPACES`` set): it serves the
listed namespaces, ignores the others, and makes no call that a Role in those namespaces would
not allow: no cluster-scoped resource, no request outside them (the emulator records every request)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.k8s import parse_api_path
from tests.harness.k8s_fixtures import K8sApi
from tests.harness.operator import OperatorProcess
from tests.manifests import minimal_job
from tuneloop_operator.kopfsetup import FINALIZER

pytestmark = pytest.mark.integration

SERVED = "team-a"
OTHER = "team-b"


def job_in(namespace: str) -> dict[str, Any]:
    m = minimal_job(name="bot")
    m["metadata"]["namespace"] = namespace
    return m


def test_operator_serves_only_the_listed_namespace_with_namespaced_calls(
    k8s_api: K8sApi, k8s_kubeconfig: Path, crd: dict[str, Any], tmp_path: Path
) -> None:
    del crd
    for namespace in (SERVED, OTHER):
        k8s_api.create_namespace(namespace)
    proc = OperatorProcess(k8s_kubeconfig, tmp_path / "operator.log", env={"TUNELOOP_NAMESPACES": SERVED})
    start = len(k8s_api.emulator._requests)
    proc.start()
    try:
        k8s_api.create(job_in(SERVED))
        k8s_api.create(job_in(OTHER))

        def handled() -> dict[str, Any] | None:
            job = k8s_api.get("tuneloop.dev/v1alpha1", "FineTuneJob", "bot", SERVED)
            return job if job and (job.get("status") or {}).get("conditions") else None

        served = k8s_api.wait_for(handled, timeout=30, message="the served namespace's job got no status")
        assert FINALIZER in served["metadata"]["finalizers"]
        time.sleep(2 * 0.5)  # two of the test operator's reconcile intervals
        other = k8s_api.get("tuneloop.dev/v1alpha1", "FineTuneJob", "bot", OTHER)
        assert other is not None
        assert not other["metadata"].get("finalizers") and not other.get("status")
    finally:
        proc.stop()
        print(proc.logs()[-20000:])

    outside = []
    for request in k8s_api.emulator._requests[start:]:
        path = parse_api_path(request.url.path)
        if path is None:
            continue  # discovery (/api, /apis, /apis/<group>/<version>, /version): allowed to everyone
        if path.namespace != SERVED:
            outside.append(f"{request.method} {request.url.path}")
    assert outside == [], f"calls a Role in {SERVED} would not allow: {sorted(set(outside))}"
    assert "Not enough permissions" not in proc.logs()
