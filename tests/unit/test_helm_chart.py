"""The Helm chart helm/tuneloop: it lints clean, renders for its defaults and every ci/ scenario
into valid Kubernetes objects whose pods pass Pod Security "restricted", its RBAC equals the
operator's own rules in both modes, every operator setting has a value, its schema refuses what
it does not know, and its CRD is the generated one."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.manifests import CRD_PATH, ROOT
from tests.unit.operator.test_render import K8S_VERSION, assert_pod_security_restricted
from tuneloop import crd
from tuneloop_operator.permissions import (
    CLUSTER_RULES_WHEN_NAMESPACED,
    NAMESPACED_RULES,
    RULES,
    Rule,
    policy_rules,
)
from tuneloop_operator.render import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY, MASTER_PORT
from tuneloop_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

CHART = ROOT / "helm" / "tuneloop"
SCENARIOS = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "tuneloop"
NAMESPACE = "tuneloop-system"
NAME = f"{RELEASE}-operator"
#: API groups kubernetes-validate has schemas for; other kinds (monitoring.coreos.com) are CRDs.
BUILTIN_GROUPS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1"}

Obj = dict[str, Any]


def render(chart: helm_python.Chart, values: Obj) -> dict[str, str]:
    out: dict[str, str] = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return out


def objects(rendered: dict[str, str]) -> list[Obj]:
    return [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if isinstance(doc, dict)
    ]


def scenario_values(path: Path) -> Obj:
    return yaml.safe_load(path.read_text()) or {}


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


@pytest.fixture(scope="module")
def rendered(chart: helm_python.Chart) -> dict[str, dict[str, str]]:
    """Each ci/ scenario, rendered once for the module."""
    return {path.stem: render(chart, scenario_values(path)) for path in SCENARIOS}


def of(rendered: dict[str, dict[str, str]], scenario: str) -> list[Obj]:
    return objects(rendered[f"{scenario}-values"])


def find(objs: list[Obj], kind: str, name: str | None = None, namespace: str | None = None) -> list[Obj]:
    return [
        o
        for o in objs
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(objs: list[Obj], kind: str, name: str | None = None, namespace: str | None = None) -> Obj:
    found = find(objs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''} {namespace or ''}, found {len(found)}"
    return found[0]


def container(objs: list[Obj]) -> Obj:
    (c,) = one(objs, "Deployment", NAME)["spec"]["template"]["spec"]["containers"]
    return dict(c)


def env_of(objs: list[Obj]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(objs)["env"] if "value" in e}


# --- lint, render, validate ------------------------------------------------------------------


def test_the_ci_scenarios_are_the_documented_ones() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {"default-values", "namespaced-values", "networkpolicy-values", "trainer-irsa-values"} <= names
    assert {"custom-image-values", "monitoring-values"} <= names


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_chart_lints_clean_in_strict_mode(path: Path) -> None:
    result = helm_python.lint(str(CHART), scenario_values(path), strict=True, kube_version=K8S_VERSION)
    assert result["errors"] == []
    worse_than_info = [m for m in result["messages"] if m["severity"] > 1]
    assert worse_than_info == [], worse_than_info


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_rendered_object_is_valid_against_the_kubernetes_schema(
    rendered: dict[str, dict[str, str]], path: Path
) -> None:
    objs = objects(rendered[path.stem])
    assert find(objs, "Deployment", NAME), "no operator Deployment"
    for obj in objs:
        if obj["apiVersion"] in BUILTIN_GROUPS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        namespaced = obj["kind"] not in {"ClusterRole", "ClusterRoleBinding", "Namespace"}
        assert bool(obj["metadata"].get("namespace")) == namespaced, f"{obj['kind']} {obj['metadata']['name']}"


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_operator_pod_passes_pod_security_restricted(rendered: dict[str, dict[str, str]], path: Path) -> None:
    for deployment in find(objects(rendered[path.stem]), "Deployment"):
        assert_pod_security_restricted({"spec": deployment["spec"]["template"]["spec"]})


def test_operator_runs_alone_and_is_replaced_not_overlapped(rendered: dict[str, dict[str, str]]) -> None:
    spec = one(of(rendered, "default"), "Deployment", NAME)["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    text = " ".join((CHART / "templates" / "deployment.yaml").read_text().replace("#", " ").split())
    assert "no lease-based leader election" in text, "say why Recreate"


def test_operator_container_contract(rendered: dict[str, dict[str, str]]) -> None:
    objs = of(rendered, "default")
    pod = one(objs, "Deployment", NAME)["spec"]["template"]["spec"]
    c = container(objs)
    env = env_of(objs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["image"] == "ghcr.io/tuneloop/operator:0.1.0"  # the chart's appVersion
    assert env["TUNELOOP_TRAINER_IMAGE"] == "ghcr.io/tuneloop/trainer:0.1.0"
    assert env["TUNELOOP_NAMESPACES"] == ""  # cluster-wide, matching the ClusterRole
    assert ports["metrics"] == int(env["TUNELOOP_METRICS_PORT"]) == 8080
    assert ports["health"] == int(env["TUNELOOP_HEALTH_PORT"]) == 8081
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == NAME == one(objs, "ServiceAccount")["metadata"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts["/tmp"]]
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER
    assert c["resources"]["limits"]["memory"] == "512Mi"  # headroom over the 300 MB target, no more
    assert "cpu" not in c["resources"]["limits"]


def test_metrics_service_reaches_the_operators_metrics_port(rendered: dict[str, dict[str, str]]) -> None:
    objs = of(rendered, "default")
    service = one(objs, "Service", f"{NAME}-metrics")
    template = one(objs, "Deployment", NAME)["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert one(objs, "Deployment")["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics" and port["port"] == 8080


def test_custom_images_digest_and_pod_placement(rendered: dict[str, dict[str, str]]) -> None:
    objs = of(rendered, "custom-image")
    values = scenario_values(CHART / "ci" / "custom-image-values.yaml")
    pod = one(objs, "Deployment", NAME)["spec"]["template"]
    c = container(objs)
    assert c["image"] == f"{values['image']['repository']}@{values['image']['digest']}"
    assert c["imagePullPolicy"] == "Always"
    assert env_of(objs)["TUNELOOP_TRAINER_IMAGE"] == "registry.example.com/tuneloop/trainer:0.1.0-cuda12"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"] == values["tolerations"]
    assert pod["metadata"]["annotations"] == {"example.com/team": "platform"}
    assert pod["metadata"]["labels"]["example.com/cost-center"] == "ml"
    assert {"name": "HTTPS_PROXY", "value": "http://proxy.example.com:3128"} in c["env"]
    settings = OperatorSettings.from_env(env_of(objs))
    assert settings.default_s3_endpoint == "https://minio.storage.svc:9000"
    assert settings.default_storage_secret == "s3-credentials"


# --- every operator setting has a value ------------------------------------------------------


class Recorder(dict[str, str]):
    """An environment that records every variable read from it."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)


#: A value, different from the default, for every value of the chart that sets the operator.
CHANGED_VALUES: Obj = {
    "watchNamespaces": ["ml"],
    "config": {
        "logLevel": "DEBUG",
        "reconcileInterval": 7.5,
        "backoffBaseSeconds": 3,
        "backoffMaxSeconds": 99,
        "maxPreemptions": 4,
        "stuckTerminatingSeconds": 42,
        "watchTimeout": 123,
        "watchInactivityTimeout": 45,
        "metricsPort": 9000,
        "healthPort": 9001,
        "s3": {"connectTimeout": 2, "readTimeout": 9, "maxAttempts": 2},
    },
    "trainer": {
        "image": {"repository": "registry.example.com/trainer", "tag": "x"},
        "metricsPort": 9500,
        "storage": {"endpoint": "https://minio.example.com:9000", "region": "eu-west-1", "secretName": "s3"},
        "serviceAccount": {"create": True, "name": "trainer"},
    },
}


def test_every_variable_the_operator_reads_is_set_by_the_chart(rendered: dict[str, dict[str, str]]) -> None:
    recorder = Recorder()
    OperatorSettings.from_env(recorder)
    assert len(recorder.read) >= len(dataclasses.fields(OperatorSettings)) - 1
    missing = recorder.read - set(env_of(of(rendered, "default")))
    assert not missing, f"the chart's Deployment does not set {sorted(missing)}: add a value for each"


def test_every_operator_setting_follows_its_chart_value(chart: helm_python.Chart) -> None:
    """Each field of OperatorSettings differs from its default when the chart's values change:
    a new setting without a value in the chart fails here, by name."""
    env = env_of(objects(render(chart, CHANGED_VALUES)))
    changed = OperatorSettings.from_env(env)
    default = OperatorSettings()
    same = [
        f.name for f in dataclasses.fields(OperatorSettings) if getattr(changed, f.name) == getattr(default, f.name)
    ]
    assert not same, f"no chart value reaches OperatorSettings.{', '.join(same)}"
    assert changed.trainer_image == "registry.example.com/trainer:x"
    assert changed.namespaces == ("ml",)
    assert changed.reconcile_interval == 7.5
    assert changed.trainer_service_account == "trainer"
    assert (env["TUNELOOP_S3_CONNECT_TIMEOUT"], env["TUNELOOP_S3_READ_TIMEOUT"], env["TUNELOOP_S3_MAX_ATTEMPTS"]) == (
        "2",
        "9",
        "2",
    )


def test_default_settings_equal_the_operators_defaults(rendered: dict[str, dict[str, str]]) -> None:
    """Installed with defaults, the operator runs with its own defaults: the chart invents none."""
    assert OperatorSettings.from_env(env_of(of(rendered, "default"))) == OperatorSettings()


# --- RBAC --------------------------------------------------------------------------------------


def grants(rules: list[Obj]) -> set[tuple[str, str, str]]:
    """Every (group, resource, verb) the PolicyRules allow."""
    return {
        triple
        for rule in rules
        for triple in product(rule["apiGroups"], rule["resources"], rule["verbs"])
        if not rule.get("resourceNames") and not rule.get("nonResourceURLs")
    }


# The operator's API calls, as documented in permissions.py and docs/install.md: the rules grant
# exactly these, so widening RULES is a visible change to this list too.
NAMESPACED_GRANTS = {
    *product(["tuneloop.dev"], ["finetunejobs"], ["get", "list", "watch", "patch"]),
    ("tuneloop.dev", "finetunejobs/status", "patch"),
    *product([""], ["pods"], ["list", "watch", "create", "delete"]),
    *product([""], ["configmaps", "services"], ["list", "create", "delete"]),
    ("", "secrets", "get"),
    ("", "events", "create"),
}
CLUSTER_SCAN_GRANTS = {
    *product([""], ["namespaces"], ["list", "watch"]),
    *product(["apiextensions.k8s.io"], ["customresourcedefinitions"], ["list", "watch"]),
}


def test_rules_grant_exactly_the_operators_api_calls() -> None:
    assert grants(policy_rules(RULES)) == NAMESPACED_GRANTS | CLUSTER_SCAN_GRANTS
    assert grants(policy_rules(NAMESPACED_RULES)) == NAMESPACED_GRANTS
    assert CLUSTER_RULES_WHEN_NAMESPACED == ()


def test_cluster_mode_grants_the_operators_rules_cluster_wide(rendered: dict[str, dict[str, str]]) -> None:
    objs = of(rendered, "default")
    role = one(objs, "ClusterRole", NAME)
    assert role["rules"] == policy_rules(RULES), "the chart's ClusterRole differs from permissions.RULES"
    binding = one(objs, "ClusterRoleBinding", NAME)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    assert not find(objs, "Role") and not find(objs, "RoleBinding")


def test_namespaced_mode_grants_roles_in_each_watched_namespace_and_nothing_cluster_wide(
    rendered: dict[str, dict[str, str]],
) -> None:
    objs = of(rendered, "namespaced")
    watched = scenario_values(CHART / "ci" / "namespaced-values.yaml")["watchNamespaces"]
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")  # CLUSTER_RULES_WHEN_NAMESPACED
    assert sorted(r["metadata"]["namespace"] for r in find(objs, "Role")) == sorted(watched)
    for namespace in watched:
        role = one(objs, "Role", NAME, namespace)
        assert role["rules"] == policy_rules(NAMESPACED_RULES), f"the Role in {namespace} differs from the code"
        binding = one(objs, "RoleBinding", NAME, namespace)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    assert env_of(objs)["TUNELOOP_NAMESPACES"] == ",".join(watched)


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


def test_both_modes_are_least_privilege(rendered: dict[str, dict[str, str]]) -> None:
    assert_least_privilege(one(of(rendered, "default"), "ClusterRole")["rules"])
    for role in find(of(rendered, "namespaced"), "Role"):
        assert_least_privilege(role["rules"])


def test_least_privilege_check_catches_violations() -> None:
    good = policy_rules(RULES)
    breakages = [
        {"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["*"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["watch"]},
        {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["escalate"]},
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["update"]},
    ]
    for extra in breakages:
        with pytest.raises(AssertionError):
            assert_least_privilege([*good, extra])


def test_namespaced_mode_without_namespaces_fails_with_what_to_do(chart: helm_python.Chart) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape("rbac.scope=namespaced needs watchNamespaces")):
        render(chart, {"rbac": {"scope": "namespaced"}})


def test_rbac_can_be_left_to_the_platform(chart: helm_python.Chart) -> None:
    objs = objects(render(chart, {"rbac": {"create": False}}))
    assert not {o["kind"] for o in objs} & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


# --- trainer defaults --------------------------------------------------------------------------


def test_trainer_service_account_for_irsa_in_each_watched_namespace(rendered: dict[str, dict[str, str]]) -> None:
    objs = of(rendered, "trainer-irsa")
    values = scenario_values(CHART / "ci" / "trainer-irsa-values.yaml")
    account = one(objs, "ServiceAccount", f"{RELEASE}-trainer", "ml")
    assert account["metadata"]["annotations"] == values["trainer"]["serviceAccount"]["annotations"]
    assert account["automountServiceAccountToken"] is False
    settings = OperatorSettings.from_env(env_of(objs))
    assert settings.trainer_service_account == f"{RELEASE}-trainer"
    assert settings.default_s3_region == "eu-west-1"
    assert settings.default_storage_secret is None  # IRSA: no Secret
    operator_account = one(objs, "ServiceAccount", NAME, NAMESPACE)
    assert operator_account["metadata"]["annotations"] == values["serviceAccount"]["annotations"]


def test_default_install_sets_no_trainer_identity(rendered: dict[str, dict[str, str]]) -> None:
    objs = of(rendered, "default")
    assert [a["metadata"]["name"] for a in find(objs, "ServiceAccount")] == [NAME]
    settings = OperatorSettings.from_env(env_of(objs))
    assert settings.trainer_service_account is None and settings.default_storage_secret is None


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"trainer": {"serviceAccount": {"create": True}}}, "trainer.serviceAccount.create needs watchNamespaces"),
        ({"trainer": {"serviceAccount": {"annotations": {"a": "b"}}}}, "trainer.serviceAccount.create is false"),
        ({"config": {"backoffBaseSeconds": 100, "backoffMaxSeconds": 10}}, "backoffMaxSeconds"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
    ],
)
def test_values_that_cannot_work_fail_the_render(chart: helm_python.Chart, values: Obj, says: str) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(says)):
        render(chart, values)


# --- NetworkPolicy -------------------------------------------------------------------------------


def peer_lists(policy: Obj) -> Iterator[list[Obj]]:
    for rule in policy["spec"].get("ingress", []):
        yield rule["from"]
    for rule in policy["spec"].get("egress", []):
        yield rule["to"]


def test_network_policies(rendered: dict[str, dict[str, str]]) -> None:
    objs = of(rendered, "networkpolicy")
    values = scenario_values(CHART / "ci" / "networkpolicy-values.yaml")
    operator = one(objs, "NetworkPolicy", NAME, NAMESPACE)
    assert operator["spec"]["podSelector"]["matchLabels"] == one(objs, "Service")["spec"]["selector"]
    for policy in find(objs, "NetworkPolicy"):
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        for peers in peer_lists(policy):
            assert peers, f"an empty peer list allows everything: {policy['metadata']}"
    egress_ports = {p["port"] for rule in operator["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 6443, 9000, 9090} <= egress_ports  # DNS, API server, the in-cluster S3, Prometheus
    assert {"ipBlock": {"cidr": "10.0.0.10/32"}} in [p for r in operator["spec"]["egress"] for p in r["to"]]
    for namespace in values["watchNamespaces"]:
        trainer = one(objs, "NetworkPolicy", f"{RELEASE}-trainer", namespace)
        selector = trainer["spec"]["podSelector"]
        assert selector["matchLabels"] == {LABEL_MANAGED_BY: MANAGED_BY}
        assert selector["matchExpressions"] == [{"key": LABEL_JOB, "operator": "Exists"}]
        ingress_ports = {p["port"] for rule in trainer["spec"]["ingress"] for p in rule.get("ports", [])}
        assert {9400, MASTER_PORT} <= ingress_ports  # the trainer's metrics; rendezvous among its pods
        peers = [r for r in trainer["spec"]["egress"] if r["to"] == [{"podSelector": selector}]]
        assert [p["port"] for r in peers for p in r["ports"]] == [MASTER_PORT]
    assert not find(of(rendered, "default"), "NetworkPolicy")


def test_trainer_policy_allows_every_port_among_trainers_by_default(chart: helm_python.Chart) -> None:
    """Multi-node NCCL and Gloo open sockets on ephemeral ports beside the rendezvous port."""
    objs = objects(render(chart, {"networkPolicy": {"enabled": True}, "watchNamespaces": ["ml"]}))
    trainer = one(objs, "NetworkPolicy", f"{RELEASE}-trainer", "ml")
    selector = trainer["spec"]["podSelector"]
    assert {"to": [{"podSelector": selector}]} in trainer["spec"]["egress"]
    assert {"from": [{"podSelector": selector}]} in trainer["spec"]["ingress"]


# --- values and their schema ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"bogus": 1}, "bogus"),
        ({"config": {"reconcileIntervall": 5}}, "reconcileIntervall"),
        ({"networkPolicy": {"trainer": {"hf": {}}}}, "hf"),
        ({"config": {"reconcileInterval": "fast"}}, "/config/reconcileInterval"),
        ({"config": {"maxPreemptions": -1}}, "/config/maxPreemptions"),
        ({"rbac": {"scope": "global"}}, "/rbac/scope"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"extraEnv": [{"name": "A", "vaule": "typo"}]}, "vaule"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
        ({"trainer": {"storage": {"endpoint": "https://user:pw@minio:9000"}}}, "/trainer/storage/endpoint"),
    ],
)
def test_schema_refuses_unknown_keys_and_wrong_values_by_name(
    chart: helm_python.Chart, values: Obj, names: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError) as info:
        chart.validate_schema(values)
    assert names in str(info.value)


def test_default_values_and_scenarios_pass_the_schema(chart: helm_python.Chart) -> None:
    chart.validate_schema(yaml.safe_load((CHART / "values.yaml").read_text()))
    for path in SCENARIOS:
        chart.validate_schema(scenario_values(path))


def test_schema_is_strict_at_every_object_level() -> None:
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())

    def walk(node: Obj, where: str) -> Iterator[str]:
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            yield where
        for key, child in node.get("properties", {}).items():
            yield from walk(child, f"{where}.{key}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{where}[]")

    assert list(walk(schema, "values")) == []


def documented_values() -> list[str]:
    """Dotted paths of the values in values.yaml marked `# --` (helm-docs' convention)."""
    paths: list[str] = []
    stack: list[tuple[int, str]] = []
    documented = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            documented = True
            continue
        match = re.match(r"^( *)([A-Za-z][\w]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([*(k for _, k in stack), match.group(2)])
        if documented:
            paths.append(path)
        stack.append((indent, match.group(2)))
        documented = False
    return paths


def test_every_value_is_commented_and_in_the_readme_table() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    inside_value: int | None = None  # indentation of the documented value we are inside of
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        if inside_value is not None and indent > inside_value:
            continue  # part of a documented value (resources.requests.cpu)
        inside_value = None
        previous = next((p.strip() for p in reversed(lines[:i]) if p.strip()), "")
        if not previous.startswith("#"):
            undocumented.append(match.group(2))
        elif previous.startswith("# --") or any(p.strip().startswith("# --") for p in lines[max(0, i - 3) : i]):
            inside_value = indent
    assert undocumented == [], f"values without a comment: {undocumented}"
    readme = (CHART / "README.md").read_text()
    missing = [path for path in documented_values() if f"`{path}`" not in readme]
    assert missing == [], f"values missing from the README's table: {missing}"


# --- NOTES, CRD ----------------------------------------------------------------------------------


def test_notes_tell_the_next_steps_and_the_mode(rendered: dict[str, dict[str, str]]) -> None:
    default = rendered["default-values"][f"{RELEASE}/templates/NOTES.txt"]
    namespaced = rendered["namespaced-values"][f"{RELEASE}/templates/NOTES.txt"]
    assert "cluster-wide" in default and "namespaced" in namespaced
    assert "kubectl -n ml get ftj -w" in namespaced
    for notes in (default, namespaced):
        assert "kubectl apply -f examples/" in notes
        assert f"{NAME}-metrics.{NAMESPACE}.svc:8080/metrics" in notes
        assert f"rollout status deployment/{NAME}" in notes
    example = re.search(r"kubectl apply -f (examples/\S+)", default)
    assert example and (ROOT / example.group(1)).exists()


def test_network_policy_notes_say_what_to_do_without_namespaces(chart: helm_python.Chart) -> None:
    notes = render(chart, {"networkPolicy": {"enabled": True}})[f"{RELEASE}/templates/NOTES.txt"]
    assert "create the trainer policy in each namespace that runs jobs" in notes


def test_chart_crd_is_the_generated_crd() -> None:
    assert (CHART / "crds" / CRD_PATH.name).read_text() == CRD_PATH.read_text() == crd.render_crd()


def test_crd_check_fails_when_the_charts_copy_drifts(tmp_path: Path) -> None:
    assert crd.main(["--root", str(tmp_path)]) == 0
    copy = tmp_path / crd.HELM_CRD_PATH
    assert copy.read_text() == crd.render_crd()
    copy.write_text(copy.read_text().replace("FineTuneJob", "FineTuneJobs", 1))
    assert crd.main(["--root", str(tmp_path), "--check"]) == 1


def test_install_docs_rbac_table_matches_the_rules() -> None:
    """The table a platform team reads before approving the roles lists the same rules, in
    order, with the mode each is granted in."""
    text = (ROOT / "docs" / "install.md").read_text()
    section = text.split("## RBAC modes", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]

    def cells(cell: str) -> tuple[str, ...]:
        return tuple("" if c.strip() == "core" else c.strip().strip("`") for c in cell.split(","))

    table = []
    for row in rows:
        group, resources, verbs, mode, why = (c.strip() for c in row.strip("|").split("|"))
        assert why, f"no reason given: {row}"
        assert mode in {"both", "cluster-wide only"}, row
        table.append(Rule(cells(group), cells(resources), cells(verbs), cluster_scoped=mode != "both"))
    assert table == list(RULES)
