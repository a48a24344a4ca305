"""The API emulator behaves like a Kubernetes API server; each test names the behaviour it mirrors.

Everything goes over real HTTP (``requests`` or the official ``kubernetes`` client) unless
a test is about the Python-side helpers. Kopf runs for real in ``test_kopf_operator_full_cycle``.
"""

from __future__ import annotations

import copy
import re
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.k8s import (
    ApiError,
    json_merge_patch,
    match_label_selector,
    parse_api_path,
    parse_label_selector,
    strategic_merge_patch,
)
from tests.harness.k8s_fixtures import K8sApi

pytestmark = pytest.mark.integration

GROUP = "tests.tuneloop.dev"
WIDGETS = f"/apis/{GROUP}/v1/namespaces/default/widgets"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
PODS = "/api/v1/namespaces/default/pods"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wd"],
            "categories": ["tuneloop-tests"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "maximum": 10},
                                    "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                                    "parts": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["name"],
                                            "properties": {
                                                "name": {"type": "string"},
                                                "count": {"type": "integer", "minimum": 0},
                                            },
                                        },
                                    },
                                },
                                "x-kubernetes-validations": [
                                    {"rule": "self.size >= oldSelf.size", "message": "size cannot shrink"}
                                ],
                            },
                            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                        },
                    }
                },
            }
        ],
    },
}

# Cluster-scoped, no status subresource: status is an ordinary field there.
GADGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"gadgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Cluster",
        "names": {"plural": "gadgets", "kind": "Gadget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }
        ],
    },
}


def widget(name: str, size: int = 1, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": {"size": size, **spec}}


def configmap(name: str, namespace: str = "default", **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "data": {"k": "v"},
    }


def pod(name: str, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **metadata},
        "spec": {"containers": [{"name": "main", "image": "busybox:1", "env": [{"name": "A", "value": "1"}]}]},
    }


def owner_ref(owner: dict[str, Any], *, block: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": block,
    }


@pytest.fixture
def crds(k8s_api: K8sApi) -> K8sApi:
    k8s_api.preload_crd(WIDGET_CRD)
    k8s_api.preload_crd(GADGET_CRD)
    return k8s_api


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


# ---- 1. create ---------------------------------------------------------------------------------


def test_create_fills_system_metadata(k8s_api: K8sApi) -> None:
    # POST sets namespace (from the URL), uid, resourceVersion, generation=1, creationTimestamp; 201.
    response = k8s_api.request("POST", CONFIGMAPS, json={"metadata": {"name": "cm"}, "data": {"a": "1"}})
    assert response.status_code == 201
    meta = response.json()["metadata"]
    assert meta["namespace"] == "default"
    assert re.fullmatch(r"[0-9a-f-]{36}", meta["uid"])
    assert int(meta["resourceVersion"]) > 0
    assert meta["generation"] == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert response.json()["apiVersion"] == "v1"
    assert response.json()["kind"] == "ConfigMap"


def test_create_with_generate_name(k8s_api: K8sApi) -> None:
    # metadata.generateName gets a random 5-character suffix.
    first = k8s_api.request("POST", CONFIGMAPS, json={"metadata": {"generateName": "run-"}}).json()
    second = k8s_api.request("POST", CONFIGMAPS, json={"metadata": {"generateName": "run-"}}).json()
    assert re.fullmatch(r"run-[a-z0-9]{5}", first["metadata"]["name"])
    assert first["metadata"]["name"] != second["metadata"]["name"]


def test_create_duplicate_is_409_already_exists(k8s_api: K8sApi) -> None:
    k8s_api.create(configmap("cm"))
    response = k8s_api.request("POST", CONFIGMAPS, json=configmap("cm"))
    assert response.status_code == 409
    assert response.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'configmaps "cm" already exists',
        "reason": "AlreadyExists",
        "code": 409,
        "details": {"name": "cm", "kind": "configmaps"},
    }


def test_create_rejects_what_the_api_server_rejects(k8s_api: K8sApi) -> None:
    # Missing namespace → 404; a terminating one → 403; resourceVersion set → 400;
    # namespace mismatch → 400; bad names/labels → 422; no name at all → 422.
    missing = k8s_api.request("POST", "/api/v1/namespaces/nope/configmaps", json=configmap("cm", "nope"))
    assert (missing.status_code, missing.json()["message"]) == (404, 'namespaces "nope" not found')
    with_rv = k8s_api.request("POST", CONFIGMAPS, json=configmap("cm", resourceVersion="5"))
    assert (with_rv.status_code, with_rv.json()["reason"]) == (400, "BadRequest")
    mismatch = k8s_api.request("POST", CONFIGMAPS, json=configmap("cm", "other"))
    assert mismatch.status_code == 400
    bad_name = k8s_api.request("POST", CONFIGMAPS, json=configmap("Bad_Name"))
    assert bad_name.status_code == 422
    assert bad_name.json()["details"]["causes"][0]["field"] == "metadata.name"
    bad_label = k8s_api.request("POST", CONFIGMAPS, json=configmap("cm", labels={"run": "x" * 64}))
    assert (bad_label.status_code, bad_label.json()["details"]["causes"][0]["field"]) == (422, "metadata.labels")
    nameless = k8s_api.request("POST", CONFIGMAPS, json={"metadata": {}})
    assert nameless.status_code == 422
    k8s_api.create_namespace("going")
    k8s_api.create(configmap("keep", "going", finalizers=["tests/hold"]))
    k8s_api.delete("v1", "Namespace", "going")
    terminating = k8s_api.request("POST", "/api/v1/namespaces/going/configmaps", json=configmap("cm", "going"))
    assert (terminating.status_code, terminating.json()["reason"]) == (403, "Forbidden")


# ---- 2. resourceVersion --------------------------------------------------------------------------


def test_resource_version_is_global_and_bumped_on_every_write(crds: K8sApi) -> None:
    # One counter across all resources, bumped by every write (create, update, delete).
    a = crds.create(configmap("a"))
    b = crds.create(widget("b"))
    a2 = crds.patch("v1", "ConfigMap", "a", {"data": {"k": "v2"}})
    assert rv(a) < rv(b) < rv(a2)
    before = crds.call(lambda: crds.emulator.resource_version)
    crds.delete("v1", "ConfigMap", "a")
    assert crds.call(lambda: crds.emulator.resource_version) == before + 1
    listed = crds.request("GET", CONFIGMAPS).json()
    assert int(listed["metadata"]["resourceVersion"]) == before + 1


def test_noop_update_keeps_the_resource_version_and_emits_nothing(k8s_api: K8sApi) -> None:
    # Writing the same content is a no-op: no new resourceVersion, no watch event.
    cm = k8s_api.create(configmap("cm"))
    same = k8s_api.patch("v1", "ConfigMap", "cm", {"data": {"k": "v"}})
    assert same["metadata"]["resourceVersion"] == cm["metadata"]["resourceVersion"]
    events = k8s_api.watch(CONFIGMAPS, timeout=0.2, resourceVersion=cm["metadata"]["resourceVersion"])
    assert events == []


def test_json_patch_test_op_on_a_stale_resource_version_is_422(k8s_api: K8sApi) -> None:
    # A JSON patch whose `test` op fails does not apply: the real server answers 422 (not 409),
    # and Kopf relies on exactly that (it catches APIUnprocessableEntityError and retries).
    cm = k8s_api.create(configmap("cm"))
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
    ]
    headers = {"Content-Type": "application/json-patch+json"}
    stale = k8s_api.request("PATCH", f"{CONFIGMAPS}/cm", json=ops, headers=headers)
    assert (stale.status_code, stale.json()["reason"]) == (422, "Invalid")
    ops[0]["value"] = cm["metadata"]["resourceVersion"]
    fresh = k8s_api.request("PATCH", f"{CONFIGMAPS}/cm", json=ops, headers=headers)
    assert fresh.status_code == 200
    assert fresh.json()["metadata"]["finalizers"] == ["x/y"]


def test_resource_version_precondition_in_merge_patch_and_put_is_409_conflict(k8s_api: K8sApi) -> None:
    # metadata.resourceVersion in a merge patch or PUT body is optimistic concurrency: 409 Conflict.
    cm = k8s_api.create(configmap("cm"))
    k8s_api.patch("v1", "ConfigMap", "cm", {"data": {"k": "changed"}})
    patch = {"metadata": {"resourceVersion": cm["metadata"]["resourceVersion"]}, "data": {"k": "mine"}}
    headers = {"Content-Type": "application/merge-patch+json"}
    stale = k8s_api.request("PATCH", f"{CONFIGMAPS}/cm", json=patch, headers=headers)
    assert stale.status_code == 409
    assert stale.json()["reason"] == "Conflict"
    assert stale.json()["message"] == (
        'Operation cannot be fulfilled on configmaps "cm": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    put = k8s_api.request("PUT", f"{CONFIGMAPS}/cm", json={**cm, "data": {"k": "mine"}})
    assert (put.status_code, put.json()["reason"]) == (409, "Conflict")
    with pytest.raises(ApiError) as raised:
        k8s_api.replace({**cm, "data": {"k": "mine"}})
    assert raised.value.code == 409


# ---- 3. generation -------------------------------------------------------------------------------


def test_generation_changes_only_with_the_spec(crds: K8sApi) -> None:
    crds.create(widget("w"))
    labelled = crds.patch(f"{GROUP}/v1", "Widget", "w", {"metadata": {"labels": {"a": "b"}}})
    assert labelled["metadata"]["generation"] == 1
    status = crds.patch(f"{GROUP}/v1", "Widget", "w", {"status": {"phase": "X"}}, subresource="status")
    assert status["metadata"]["generation"] == 1
    respec = crds.patch(f"{GROUP}/v1", "Widget", "w", {"spec": {"size": 2}})
    assert respec["metadata"]["generation"] == 2


def test_generation_of_objects_without_spec_tracks_their_content(k8s_api: K8sApi) -> None:
    # No spec (a ConfigMap): any change outside metadata/status is a new generation.
    k8s_api.create(configmap("cm"))
    assert k8s_api.patch("v1", "ConfigMap", "cm", {"metadata": {"labels": {"a": "b"}}})["metadata"]["generation"] == 1
    assert k8s_api.patch("v1", "ConfigMap", "cm", {"data": {"k": "v2"}})["metadata"]["generation"] == 2


def test_setting_deletion_timestamp_bumps_generation(k8s_api: K8sApi) -> None:
    # The API server bumps metadata.generation when it sets deletionTimestamp.
    k8s_api.create(configmap("cm", finalizers=["tests/hold"]))
    deleting = k8s_api.delete("v1", "ConfigMap", "cm")
    assert deleting["metadata"]["generation"] == 2
    assert deleting["metadata"]["deletionTimestamp"]


# ---- 4. status subresource -----------------------------------------------------------------------


def test_status_subresource_separates_status_from_the_rest(crds: K8sApi) -> None:
    # With `subresources.status`: status is dropped on create, ignored on main-resource writes,
    # and /status writes change only the status.
    created = crds.request("POST", WIDGETS, json={**widget("w"), "status": {"phase": "Forged"}}).json()
    assert "status" not in created
    merge = {"Content-Type": "application/merge-patch+json"}
    main = crds.request("PATCH", f"{WIDGETS}/w", json={"status": {"phase": "Nope"}, "spec": {"size": 2}}, headers=merge)
    assert main.json()["spec"]["size"] == 2
    assert "status" not in main.json()
    sub = crds.request(
        "PATCH",
        f"{WIDGETS}/w/status",
        json={"status": {"phase": "Ready"}, "spec": {"size": 9}, "metadata": {"labels": {"x": "y"}}},
        headers=merge,
    ).json()
    assert sub["status"] == {"phase": "Ready"}
    assert sub["spec"]["size"] == 2
    assert "labels" not in sub["metadata"]
    put = crds.request("PUT", f"{WIDGETS}/w/status", json={**sub, "status": {"phase": "Done"}, "spec": {"size": 5}})
    assert put.json()["status"] == {"phase": "Done"}
    assert put.json()["spec"]["size"] == 2
    assert crds.request("GET", f"{WIDGETS}/w/status").json()["status"] == {"phase": "Done"}


def test_without_status_subresource_status_is_an_ordinary_field(crds: K8sApi) -> None:
    gadgets = f"/apis/{GROUP}/v1/gadgets"
    created = crds.request("POST", gadgets, json={"metadata": {"name": "g"}, "status": {"phase": "A"}}).json()
    assert created["status"] == {"phase": "A"}
    assert crds.request("GET", f"{gadgets}/g/status").status_code == 404


def test_pods_have_a_status_subresource(k8s_api: K8sApi) -> None:
    # A new pod is Pending whatever the client says; the kubelet writes status via /status.
    created = k8s_api.request("POST", PODS, json={**pod("p"), "status": {"phase": "Running"}}).json()
    assert created["status"] == {"phase": "Pending"}
    merge = {"Content-Type": "application/merge-patch+json"}
    running = k8s_api.request("PATCH", f"{PODS}/p/status", json={"status": {"phase": "Running"}}, headers=merge)
    assert running.json()["status"]["phase"] == "Running"
    ignored = k8s_api.request("PATCH", f"{PODS}/p", json={"status": {"phase": "Failed"}}, headers=merge)
    assert ignored.json()["status"]["phase"] == "Running"


def test_pod_spec_is_immutable_except_images(k8s_api: K8sApi) -> None:
    # "pod updates may not change fields other than spec.containers[*].image, ..." → 422.
    k8s_api.create(pod("p"))
    image = {"spec": {"containers": [{"name": "main", "image": "busybox:2"}]}}
    updated = k8s_api.patch("v1", "Pod", "p", image, patch_type="strategic")
    assert updated["spec"]["containers"][0]["image"] == "busybox:2"
    with pytest.raises(ApiError) as raised:
        k8s_api.patch("v1", "Pod", "p", {"spec": {"restartPolicy": "Never"}})
    assert (raised.value.code, raised.value.reason) == (422, "Invalid")


# ---- 5. patch flavours ---------------------------------------------------------------------------


def test_json_merge_patch_follows_rfc_7386(k8s_api: K8sApi) -> None:
    k8s_api.create({**configmap("cm"), "data": {"a": "1", "b": "2"}, "binaryData": {"x": "eA=="}})
    patch = {"data": {"a": None, "c": "3"}, "binaryData": None, "metadata": {"labels": {"l": "v"}}}
    patched = k8s_api.patch("v1", "ConfigMap", "cm", patch)
    assert patched["data"] == {"b": "2", "c": "3"}
    assert "binaryData" not in patched
    assert json_merge_patch({"a": [1, 2], "b": {"c": 1}}, {"a": [3], "b": {"d": 2}}) == {
        "a": [3],
        "b": {"c": 1, "d": 2},
    }


def test_json_patch_follows_rfc_6902(k8s_api: K8sApi) -> None:
    k8s_api.create({**configmap("cm"), "data": {"a": "1", "b": "2"}})
    ops = [
        {"op": "add", "path": "/data/c", "value": "3"},
        {"op": "replace", "path": "/data/a", "value": "10"},
        {"op": "remove", "path": "/data/b"},
        {"op": "copy", "from": "/data/a", "path": "/data/d"},
        {"op": "move", "from": "/data/c", "path": "/data/e"},
        {"op": "test", "path": "/data/e", "value": "3"},
    ]
    patched = k8s_api.patch("v1", "ConfigMap", "cm", ops, patch_type="json")
    assert patched["data"] == {"a": "10", "d": "10", "e": "3"}
    with pytest.raises(ApiError) as raised:
        k8s_api.patch("v1", "ConfigMap", "cm", [{"op": "remove", "path": "/data/nope"}], patch_type="json")
    assert raised.value.code == 422


def test_strategic_merge_patch_merges_keyed_lists(k8s_api: K8sApi) -> None:
    # Containers/env merge by name, finalizers as a set, $patch directives work.
    template = {"spec": pod("p")["spec"]}
    k8s_api.create(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d", "finalizers": ["a/b"]},
            "spec": {"selector": {"matchLabels": {"app": "d"}}, "template": template},
        }
    )
    patch = {
        "metadata": {"finalizers": ["c/d"]},
        "spec": {
            "template": {
                "spec": {"containers": [{"name": "main", "image": "busybox:3", "env": [{"name": "B", "value": "2"}]}]}
            }
        },
    }
    patched = k8s_api.patch("apps/v1", "Deployment", "d", patch, patch_type="strategic")
    assert patched["metadata"]["finalizers"] == ["a/b", "c/d"]
    assert patched["spec"]["template"]["spec"]["containers"] == [
        {"name": "main", "image": "busybox:3", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
    ]
    doc = {"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}, "f": ["1", "2"]}
    assert strategic_merge_patch(doc, {"spec": {"containers": [{"name": "a", "$patch": "delete"}]}})["spec"] == {
        "containers": [{"name": "b", "image": "y"}]
    }
    replaced = strategic_merge_patch(doc, {"spec": {"$patch": "replace", "other": 1}})
    assert replaced["spec"] == {"other": 1}
    assert strategic_merge_patch({"finalizers": ["a", "b"]}, {"$deleteFromPrimitiveList/finalizers": ["a"]}) == {
        "finalizers": ["b"]
    }


def test_strategic_merge_patch_is_unsupported_for_custom_resources(crds: K8sApi) -> None:
    # The real server answers 415 for SMP on custom resources (kubectl uses merge patch there).
    crds.create(widget("w"))
    smp = {"Content-Type": "application/strategic-merge-patch+json"}
    assert crds.request("PATCH", f"{WIDGETS}/w", json={"spec": {"size": 2}}, headers=smp).status_code == 415
    weird = {"Content-Type": "application/x-unknown"}
    assert crds.request("PATCH", f"{WIDGETS}/w", json={}, headers=weird).status_code == 415


def test_server_side_apply_creates_then_merges(crds: K8sApi) -> None:
    # A rough SSA: create when absent, merge the applied configuration when present.
    apply = {"Content-Type": "application/apply-patch+yaml"}
    body = "apiVersion: tests.tuneloop.dev/v1\nkind: Widget\nmetadata: {name: w}\nspec: {size: 2}\n"
    no_manager = crds.request("PATCH", f"{WIDGETS}/w", data=body, headers=apply)
    assert no_manager.status_code == 400
    created = crds.request("PATCH", f"{WIDGETS}/w", data=body, headers=apply, params={"fieldManager": "t"})
    assert created.status_code == 201
    updated = crds.request(
        "PATCH", f"{WIDGETS}/w", data=body.replace("size: 2", "size: 3"), headers=apply, params={"fieldManager": "t"}
    )
    assert (updated.status_code, updated.json()["spec"]["size"]) == (200, 3)


# ---- 6. PUT ------------------------------------------------------------------------------------


def test_put_replaces_the_whole_object(k8s_api: K8sApi) -> None:
    cm = k8s_api.create({**configmap("cm"), "data": {"a": "1", "b": "2"}})
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"c": "3"}}
    put = k8s_api.request("PUT", f"{CONFIGMAPS}/cm", json=body)
    assert put.status_code == 200
    assert put.json()["data"] == {"c": "3"}
    assert put.json()["metadata"]["uid"] == cm["metadata"]["uid"]  # system fields survive
    assert rv(put.json()) > rv(cm)
    wrong_name = k8s_api.request("PUT", f"{CONFIGMAPS}/cm", json={**body, "metadata": {"name": "other"}})
    assert wrong_name.status_code == 400
    assert (
        k8s_api.request("PUT", f"{CONFIGMAPS}/absent", json={**body, "metadata": {"name": "absent"}}).status_code == 404
    )


# ---- 7. deletion, finalizers, garbage collection --------------------------------------------------


def test_delete_without_finalizers_removes_with_a_deleted_event(k8s_api: K8sApi) -> None:
    cm = k8s_api.create(configmap("cm"))
    response = k8s_api.request("DELETE", f"{CONFIGMAPS}/cm")
    assert (response.status_code, response.json()["status"]) == (200, "Success")
    assert k8s_api.request("GET", f"{CONFIGMAPS}/cm").status_code == 404
    events = k8s_api.watch(CONFIGMAPS, resourceVersion=cm["metadata"]["resourceVersion"], timeout=0.2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("DELETED", "cm")]
    assert rv(events[0]["object"]) > rv(cm)


def test_finalizers_hold_the_object_until_removed(k8s_api: K8sApi) -> None:
    # DELETE sets deletionTimestamp; no new finalizers may be added; removing the last one deletes.
    cm = k8s_api.create(configmap("cm", finalizers=["tests/a", "tests/b"]))
    deleting = k8s_api.request("DELETE", f"{CONFIGMAPS}/cm").json()
    assert deleting["metadata"]["deletionTimestamp"]
    assert k8s_api.get("v1", "ConfigMap", "cm") is not None
    with pytest.raises(ApiError) as raised:
        k8s_api.patch("v1", "ConfigMap", "cm", {"metadata": {"finalizers": ["tests/a", "tests/b", "tests/c"]}})
    assert raised.value.code == 422
    k8s_api.patch("v1", "ConfigMap", "cm", {"metadata": {"finalizers": ["tests/b"]}})
    assert k8s_api.get("v1", "ConfigMap", "cm") is not None
    k8s_api.patch("v1", "ConfigMap", "cm", {"metadata": {"finalizers": None}})
    assert k8s_api.get("v1", "ConfigMap", "cm") is None
    events = k8s_api.watch(CONFIGMAPS, resourceVersion=cm["metadata"]["resourceVersion"], timeout=0.2)
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED", "MODIFIED", "DELETED"]


def test_background_deletion_collects_dependents_after_the_owner(crds: K8sApi) -> None:
    # Background (the default): the owner goes first, then the garbage collector deletes
    # dependents whose owners are all gone; a dependent with another live owner only loses the reference.
    owner = crds.create(widget("owner"))
    other = crds.create(widget("other"))
    crds.create(configmap("child", ownerReferences=[owner_ref(owner)]))
    crds.create(configmap("shared", ownerReferences=[owner_ref(owner), {**owner_ref(other), "controller": False}]))
    crds.delete(f"{GROUP}/v1", "Widget", "owner")
    assert crds.get("v1", "ConfigMap", "child") is None
    shared = crds.get("v1", "ConfigMap", "shared")
    assert shared is not None
    assert [ref["name"] for ref in shared["metadata"]["ownerReferences"]] == ["other"]


def test_foreground_deletion_deletes_blocking_dependents_first(crds: K8sApi) -> None:
    # Foreground: the owner gets deletionTimestamp + the foregroundDeletion finalizer and stays
    # until dependents with blockOwnerDeletion=true are gone (here held by a finalizer first).
    owner = crds.create(widget("owner"))
    crds.create(configmap("child", ownerReferences=[owner_ref(owner)], finalizers=["tests/hold"]))
    crds.create(configmap("loose", ownerReferences=[owner_ref(owner, block=False)]))
    response = crds.request("DELETE", f"{WIDGETS}/owner", json={"propagationPolicy": "Foreground"}).json()
    assert response["metadata"]["finalizers"] == ["foregroundDeletion"]
    assert response["metadata"]["deletionTimestamp"]
    child = crds.get("v1", "ConfigMap", "child")
    assert child is not None
    assert child["metadata"]["deletionTimestamp"]  # being deleted, held by its finalizer
    assert crds.get("v1", "ConfigMap", "loose") is None
    assert crds.get(f"{GROUP}/v1", "Widget", "owner") is not None
    crds.patch("v1", "ConfigMap", "child", {"metadata": {"finalizers": None}})
    assert crds.get("v1", "ConfigMap", "child") is None
    assert crds.get(f"{GROUP}/v1", "Widget", "owner") is None


def test_orphan_deletion_leaves_dependents_without_the_reference(crds: K8sApi) -> None:
    # propagationPolicy=Orphan (here as a query parameter): dependents stay, references removed.
    owner = crds.create(widget("owner"))
    crds.create(configmap("child", ownerReferences=[owner_ref(owner)]))
    assert crds.request("DELETE", f"{WIDGETS}/owner", params={"propagationPolicy": "Orphan"}).status_code == 200
    child = crds.get("v1", "ConfigMap", "child")
    assert child is not None
    assert "ownerReferences" not in child["metadata"]


def test_owner_references_across_namespaces_resolve_to_nothing(crds: K8sApi) -> None:
    # The GC looks owners up in the dependent's namespace: a cross-namespace owner counts as absent.
    crds.create_namespace("elsewhere")
    owner = crds.create({**widget("owner"), "metadata": {"name": "owner", "namespace": "elsewhere"}})
    crds.create(configmap("child", ownerReferences=[owner_ref(owner)]))
    assert crds.get("v1", "ConfigMap", "child") is None


def test_delete_preconditions_and_options(k8s_api: K8sApi) -> None:
    cm = k8s_api.create(configmap("cm"))
    bad = {"preconditions": {"resourceVersion": "1"}}
    assert k8s_api.request("DELETE", f"{CONFIGMAPS}/cm", json=bad).status_code == 409
    bad_policy = k8s_api.request("DELETE", f"{CONFIGMAPS}/cm", params={"propagationPolicy": "Sideways"})
    assert bad_policy.status_code == 400
    good = {"preconditions": {"uid": cm["metadata"]["uid"]}, "propagationPolicy": "Background"}
    assert k8s_api.request("DELETE", f"{CONFIGMAPS}/cm", json=good).status_code == 200
    assert k8s_api.request("DELETE", f"{CONFIGMAPS}/cm").status_code == 404


def test_namespace_deletion_empties_then_removes_the_namespace(k8s_api: K8sApi) -> None:
    # Terminating namespaces delete their content (finalizers respected), then disappear.
    k8s_api.create_namespace("ns1")
    k8s_api.create(configmap("a", "ns1"))
    k8s_api.create(configmap("b", "ns1", finalizers=["tests/hold"]))
    k8s_api.delete("v1", "Namespace", "ns1")
    namespace = k8s_api.get("v1", "Namespace", "ns1")
    assert namespace is not None
    assert namespace["status"]["phase"] == "Terminating"
    assert [o["metadata"]["name"] for o in k8s_api.list("v1", "ConfigMap", "ns1")] == ["b"]
    k8s_api.patch("v1", "ConfigMap", "b", {"metadata": {"finalizers": None}}, "ns1")
    assert k8s_api.get("v1", "Namespace", "ns1") is None


def test_pod_binding_assigns_the_node_once(k8s_api: K8sApi) -> None:
    # POST pods/<name>/binding: what the scheduler does; nodeName is otherwise immutable.
    created = k8s_api.create(pod("p"))
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": "p", "uid": created["metadata"]["uid"]},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-a"},
    }
    response = k8s_api.request("POST", f"{PODS}/p/binding", json=binding)
    assert (response.status_code, response.json()["status"]) == (201, "Success")
    bound = k8s_api.get("v1", "Pod", "p") or {}
    assert bound["spec"]["nodeName"] == "node-a"
    assert [c["status"] for c in bound["status"]["conditions"] if c["type"] == "PodScheduled"] == ["True"]
    assert int(bound["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    again = k8s_api.request("POST", f"{PODS}/p/binding", json={**binding, "target": {"kind": "Node", "name": "b"}})
    assert again.status_code == 409 and 'already assigned to node "node-a"' in again.json()["message"]
    stale = k8s_api.request("POST", f"{PODS}/p/binding", json={**binding, "metadata": {"name": "p", "uid": "other"}})
    assert stale.status_code == 409
    assert k8s_api.request("POST", f"{PODS}/p/binding", json={"target": {}}).status_code == 400
    assert k8s_api.request("GET", f"{PODS}/p/binding").status_code == 405
    assert k8s_api.request("POST", f"{PODS}/missing/binding", json=binding).status_code == 404


def test_graceful_pod_deletion_waits_for_the_kubelet(k8s_api: K8sApi) -> None:
    # Opt-in: a scheduled pod stays Terminating until deleted again with gracePeriodSeconds=0.
    k8s_api.call(setattr, k8s_api.emulator, "graceful_pod_deletion", True)
    try:
        k8s_api.create({**pod("p"), "spec": {**pod("p")["spec"], "nodeName": "local"}})
        deleting = k8s_api.request("DELETE", f"{PODS}/p").json()
        assert deleting["metadata"]["deletionGracePeriodSeconds"] == 30
        k8s_api.patch("v1", "Pod", "p", {"status": {"phase": "Failed"}}, subresource="status")
        assert k8s_api.get("v1", "Pod", "p") is not None
        k8s_api.request("DELETE", f"{PODS}/p", params={"gracePeriodSeconds": "0"})
        assert k8s_api.get("v1", "Pod", "p") is None
    finally:
        k8s_api.call(setattr, k8s_api.emulator, "graceful_pod_deletion", False)


# ---- 8. selectors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=trainer", ["a", "b"]),
        ("app==trainer", ["a", "b"]),
        ("app!=trainer", ["c", "d"]),
        ("app in (trainer,eval)", ["a", "b", "c"]),
        ("app notin (trainer)", ["c", "d"]),
        ("run", ["a", "c"]),
        ("!run", ["b", "d"]),
        ("app=trainer,run=1", ["a"]),
        ("app in (trainer, eval),!run", ["b"]),
        ("", ["a", "b", "c", "d"]),
    ],
)
def test_label_selectors_on_list(k8s_api: K8sApi, selector: str, expected: list[str]) -> None:
    labels = {
        "a": {"app": "trainer", "run": "1"},
        "b": {"app": "trainer"},
        "c": {"app": "eval", "run": "2"},
        "d": {},
    }
    for name, value in labels.items():
        k8s_api.create(configmap(name, labels=value))
    items = k8s_api.request("GET", CONFIGMAPS, params={"labelSelector": selector}).json()["items"]
    assert [o["metadata"]["name"] for o in items] == expected


def test_label_selector_parsing() -> None:
    requirements = parse_label_selector("a in (x, y),b notin (z),c,!d,e=f,g!=h,n>3")
    assert [(r.key, r.op, r.values) for r in requirements] == [
        ("a", "in", ("x", "y")),
        ("b", "notin", ("z",)),
        ("c", "exists", ()),
        ("d", "!exists", ()),
        ("e", "=", ("f",)),
        ("g", "!=", ("h",)),
        ("n", ">", ("3",)),
    ]
    assert match_label_selector(requirements, {"a": "x", "c": "", "e": "f", "n": "4"})
    with pytest.raises(ValueError, match="unable to parse"):
        parse_label_selector("a in x")


def test_field_selectors_on_list(k8s_api: K8sApi) -> None:
    k8s_api.create_namespace("other")
    k8s_api.create(configmap("a"))
    k8s_api.create(configmap("b"))
    k8s_api.create(configmap("a", "other"))
    k8s_api.create(pod("running"))
    k8s_api.create(pod("pending"))
    k8s_api.patch("v1", "Pod", "running", {"status": {"phase": "Running"}}, subresource="status")

    def names(path: str, selector: str) -> list[str]:
        items = k8s_api.request("GET", path, params={"fieldSelector": selector}).json()["items"]
        return [f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in items]

    assert names("/api/v1/configmaps", "metadata.name=a") == ["default/a", "other/a"]
    assert names("/api/v1/configmaps", "metadata.namespace!=default") == ["other/a"]
    assert names("/api/v1/configmaps", "metadata.name=a,metadata.namespace==default") == ["default/a"]
    assert names(PODS, "status.phase=Running") == ["default/running"]
    assert names(PODS, "status.phase!=Running") == ["default/pending"]
    unsupported = k8s_api.request("GET", CONFIGMAPS, params={"fieldSelector": "data.k=v"})
    assert (unsupported.status_code, unsupported.json()["message"]) == (400, "field label not supported: data.k")


def test_generic_field_selectors_when_not_strict(k8s_api: K8sApi) -> None:
    # Opt-out of the real server's per-resource allow-list: any dotted path, = and !=.
    k8s_api.create({**configmap("a"), "data": {"k": "1"}})
    k8s_api.create({**configmap("b"), "data": {"k": "2"}})
    k8s_api.call(setattr, k8s_api.emulator, "strict_field_selectors", False)
    try:
        items = k8s_api.request("GET", CONFIGMAPS, params={"fieldSelector": "data.k!=1"}).json()["items"]
    finally:
        k8s_api.call(setattr, k8s_api.emulator, "strict_field_selectors", True)
    assert [o["metadata"]["name"] for o in items] == ["b"]


def test_selectors_on_watch_turn_leaving_objects_into_deletions(k8s_api: K8sApi) -> None:
    # A selective watch sees an object entering the selection as ADDED and leaving it as DELETED.
    start = k8s_api.create(configmap("other"))
    k8s_api.create(configmap("cm", labels={"app": "x"}))
    k8s_api.patch("v1", "ConfigMap", "cm", {"metadata": {"labels": {"app": "y"}}})
    k8s_api.patch("v1", "ConfigMap", "cm", {"metadata": {"labels": {"app": "x"}}})
    k8s_api.patch("v1", "ConfigMap", "cm", {"data": {"k": "2"}})
    k8s_api.delete("v1", "ConfigMap", "cm")
    events = k8s_api.watch(
        CONFIGMAPS, timeout=0.2, resourceVersion=start["metadata"]["resourceVersion"], labelSelector="app=x"
    )
    assert [e["type"] for e in events] == ["ADDED", "DELETED", "ADDED", "MODIFIED", "DELETED"]
    by_field = k8s_api.watch(
        CONFIGMAPS, timeout=0.2, resourceVersion=start["metadata"]["resourceVersion"], fieldSelector="metadata.name=cm"
    )
    assert [e["type"] for e in by_field] == ["ADDED", "MODIFIED", "MODIFIED", "MODIFIED", "DELETED"]


def test_list_pagination_with_limit_and_continue(k8s_api: K8sApi) -> None:
    for name in "abcde":
        k8s_api.create(configmap(name))
    first = k8s_api.request("GET", CONFIGMAPS, params={"limit": "2"}).json()
    assert [o["metadata"]["name"] for o in first["items"]] == ["a", "b"]
    assert first["metadata"]["remainingItemCount"] == 3
    rest = k8s_api.request("GET", CONFIGMAPS, params={"limit": "10", "continue": first["metadata"]["continue"]}).json()
    assert [o["metadata"]["name"] for o in rest["items"]] == ["c", "d", "e"]
    assert "continue" not in rest["metadata"]


# ---- 9. watches ----------------------------------------------------------------------------------


def test_watch_from_a_resource_version_replays_only_later_events(k8s_api: K8sApi) -> None:
    k8s_api.create(configmap("before"))
    mark = k8s_api.create(configmap("mark"))
    k8s_api.create(configmap("after"))
    k8s_api.patch("v1", "ConfigMap", "before", {"data": {"k": "2"}})
    events = k8s_api.watch(CONFIGMAPS, timeout=0.2, resourceVersion=mark["metadata"]["resourceVersion"])
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "after"),
        ("MODIFIED", "before"),
    ]


def test_watch_without_a_resource_version_starts_with_the_current_state(k8s_api: K8sApi) -> None:
    # resourceVersion missing or "0": synthetic ADDED for every existing object, then live events.
    k8s_api.create(configmap("a"))
    k8s_api.patch("v1", "ConfigMap", "a", {"data": {"k": "2"}})
    k8s_api.create(configmap("b"))
    received: list[dict[str, Any]] = []

    def consume() -> None:
        received.extend(k8s_api.watch(CONFIGMAPS, timeout=1.0, resourceVersion="0"))

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(0.3)
    k8s_api.create(configmap("live"))
    reader.join()
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in received] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "live"),
    ]
    assert received[0]["object"]["data"] == {"k": "2"}


def test_watch_with_send_initial_events_ends_the_initial_list_with_a_bookmark(k8s_api: K8sApi) -> None:
    k8s_api.create(configmap("a"))
    events = k8s_api.watch(CONFIGMAPS, timeout=0.2, sendInitialEvents="true", resourceVersionMatch="NotOlderThan")
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_from_a_compacted_resource_version_is_410_gone(k8s_api: K8sApi) -> None:
    # Like etcd compaction: history before the compacted revision is gone.
    old = k8s_api.create(configmap("a"))
    k8s_api.create(configmap("b"))
    k8s_api.call(k8s_api.emulator.compact)
    events = k8s_api.watch(CONFIGMAPS, timeout=0.5, resourceVersion=old["metadata"]["resourceVersion"])
    assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in events] == [("ERROR", 410, "Expired")]


def test_watch_honours_timeout_seconds(k8s_api: K8sApi) -> None:
    started = time.monotonic()
    assert (
        k8s_api.watch(
            CONFIGMAPS, timeout=0.5, resourceVersion=str(k8s_api.call(lambda: k8s_api.emulator.resource_version))
        )
        == []
    )
    assert 0.4 < time.monotonic() - started < 3


def test_watch_of_a_single_object(k8s_api: K8sApi) -> None:
    start = k8s_api.create(configmap("a"))
    k8s_api.create(configmap("b"))
    k8s_api.patch("v1", "ConfigMap", "a", {"data": {"k": "2"}})
    events = k8s_api.watch(f"{CONFIGMAPS}/a", timeout=0.2, resourceVersion=start["metadata"]["resourceVersion"])
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("MODIFIED", "a")]


# ---- 10. discovery and lists ---------------------------------------------------------------------


def test_core_discovery_reports_group_version_v1(k8s_api: K8sApi) -> None:
    assert k8s_api.request("GET", "/api").json()["versions"] == ["v1"]
    core = k8s_api.request("GET", "/api/v1").json()
    assert core["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["pods"]["kind"] == "Pod"
    assert by_name["pods"]["namespaced"] is True
    assert by_name["namespaces"]["namespaced"] is False
    assert by_name["pods/status"]["verbs"] == ["get", "patch", "update"]
    for name in ("configmaps", "secrets", "events", "services", "namespaces"):
        assert name in by_name


def test_group_discovery_lists_builtin_groups_and_crds(crds: K8sApi) -> None:
    groups = {g["name"]: g for g in crds.request("GET", "/apis").json()["groups"]}
    for name in ("apiextensions.k8s.io", "events.k8s.io", "coordination.k8s.io", "apps", "batch", GROUP):
        assert name in groups
    assert groups[GROUP]["preferredVersion"] == {"groupVersion": f"{GROUP}/v1", "version": "v1"}
    assert crds.request("GET", f"/apis/{GROUP}").json()["kind"] == "APIGroup"
    resources = {r["name"]: r for r in crds.request("GET", f"/apis/{GROUP}/v1").json()["resources"]}
    assert resources["widgets"] == {
        "name": "widgets",
        "singularName": "widget",
        "namespaced": True,
        "kind": "Widget",
        "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        "shortNames": ["wd"],
        "categories": ["tuneloop-tests"],
    }
    assert "widgets/status" in resources
    assert resources["gadgets"]["namespaced"] is False
    assert "gadgets/status" not in resources
    assert crds.request("GET", "/apis/nonexistent.example.com/v1").status_code == 404


def test_lists_carry_kind_api_version_and_resource_version(crds: K8sApi) -> None:
    crds.create(configmap("a"))
    core = crds.request("GET", CONFIGMAPS).json()
    assert (core["apiVersion"], core["kind"]) == ("v1", "ConfigMapList")
    assert int(core["metadata"]["resourceVersion"]) >= rv(core["items"][0])
    custom = crds.request("GET", WIDGETS).json()
    assert (custom["apiVersion"], custom["kind"], custom["items"]) == (f"{GROUP}/v1", "WidgetList", [])


def test_namespaces_are_listed_and_fetched(k8s_api: K8sApi) -> None:
    listed = k8s_api.request("GET", "/api/v1/namespaces").json()
    assert listed["kind"] == "NamespaceList"
    assert [n["metadata"]["name"] for n in listed["items"]] == [
        "default",
        "kube-node-lease",
        "kube-public",
        "kube-system",
    ]
    default = k8s_api.request("GET", "/api/v1/namespaces/default").json()
    assert (default["kind"], default["status"]["phase"]) == ("Namespace", "Active")
    assert k8s_api.request("GET", "/api/v1/namespaces/default/status").json()["metadata"]["name"] == "default"
    assert parse_api_path("/api/v1/namespaces/x/status") == parse_api_path("/api/v1/namespaces/x/status")
    parsed = parse_api_path("/api/v1/namespaces/ns/pods/p/status")
    assert parsed is not None
    assert (parsed.namespace, parsed.plural, parsed.name, parsed.subresource) == ("ns", "pods", "p", "status")


# ---- 11. CRDs ------------------------------------------------------------------------------------


def test_creating_a_crd_registers_its_resource(k8s_api: K8sApi) -> None:
    # A CRD POSTed over HTTP is Established and its resource is servable and discoverable.
    assert k8s_api.request("GET", WIDGETS).status_code == 404
    created = k8s_api.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=WIDGET_CRD)
    assert created.status_code == 201
    conditions = {c["type"]: c["status"] for c in created.json()["status"]["conditions"]}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}
    assert created.json()["status"]["acceptedNames"]["kind"] == "Widget"
    assert k8s_api.request("POST", WIDGETS, json=widget("w")).status_code == 201
    assert k8s_api.get(f"{GROUP}/v1", "widgets", "w") is not None


def test_deleting_a_crd_deletes_its_objects_and_unregisters_it(crds: K8sApi) -> None:
    crds.create(widget("w"))
    crds.create({**widget("held"), "metadata": {"name": "held", "finalizers": ["tests/hold"]}})
    crds.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", f"widgets.{GROUP}")
    assert [o["metadata"]["name"] for o in crds.list(f"{GROUP}/v1", "Widget")] == ["held"]
    crds.patch(f"{GROUP}/v1", "Widget", "held", {"metadata": {"finalizers": None}})
    assert crds.request("GET", WIDGETS).status_code == 404


def test_crd_versions_share_one_storage(k8s_api: K8sApi) -> None:
    # Several served versions, one storage version; conversion "None" only rewrites apiVersion.
    crd = copy.deepcopy(WIDGET_CRD)
    v1 = crd["spec"]["versions"][0]
    crd["spec"]["versions"] = [{**copy.deepcopy(v1), "name": "v1beta1", "storage": False}, v1]
    k8s_api.preload_crd(crd)
    groups = {g["name"]: g for g in k8s_api.request("GET", "/apis").json()["groups"]}
    assert groups[GROUP]["preferredVersion"]["version"] == "v1"
    beta = f"/apis/{GROUP}/v1beta1/namespaces/default/widgets"
    created = k8s_api.request("POST", beta, json={**widget("w"), "apiVersion": f"{GROUP}/v1beta1"})
    assert created.json()["apiVersion"] == f"{GROUP}/v1beta1"
    assert k8s_api.request("GET", f"{WIDGETS}/w").json()["apiVersion"] == f"{GROUP}/v1"
    merge = {"Content-Type": "application/merge-patch+json"}
    patched = k8s_api.request("PATCH", f"{beta}/w", json={"spec": {"size": 2}}, headers=merge)
    assert (patched.status_code, patched.json()["apiVersion"]) == (200, f"{GROUP}/v1beta1")
    stored = k8s_api.call(lambda: k8s_api.emulator.objects[f"{GROUP}/v1/widgets", "default", "w"].raw)
    assert stored["apiVersion"] == f"{GROUP}/v1"


def test_delete_collection_and_dry_run(k8s_api: K8sApi) -> None:
    # DELETE on a collection deletes what the selector matches; dryRun=All changes nothing.
    for name, app in (("a", "x"), ("b", "x"), ("c", "y")):
        k8s_api.create(configmap(name, labels={"app": app}))
    dry = k8s_api.request("POST", CONFIGMAPS, json=configmap("d"), params={"dryRun": "All"})
    assert dry.status_code == 201
    assert k8s_api.get("v1", "ConfigMap", "d") is None
    assert k8s_api.request("DELETE", f"{CONFIGMAPS}/a", params={"dryRun": "All"}).status_code == 200
    deleted = k8s_api.request("DELETE", CONFIGMAPS, params={"labelSelector": "app=x"}).json()
    assert [o["metadata"]["name"] for o in deleted["items"]] == ["a", "b"]
    assert [o["metadata"]["name"] for o in k8s_api.list("v1", "ConfigMap", "default")] == ["c"]


def test_invalid_crds_are_rejected(k8s_api: K8sApi) -> None:
    broken = copy.deepcopy(WIDGET_CRD)
    broken["metadata"]["name"] = "wrong.name.dev"
    schema = broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["properties"]["spec"]["x-kubernetes-validations"] = [{"rule": "self.size >"}]
    response = k8s_api.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=broken)
    assert response.status_code == 422
    assert [c["field"] for c in response.json()["details"]["causes"]] == [
        "metadata.name",
        "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule",
    ]


def test_crd_updates_take_effect(crds: K8sApi) -> None:
    crd = crds.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", f"widgets.{GROUP}")
    assert crd is not None
    crd["spec"]["names"]["shortNames"] = ["wd", "wdg"]
    crds.replace(crd)
    resources = {r["name"]: r for r in crds.request("GET", f"/apis/{GROUP}/v1").json()["resources"]}
    assert resources["widgets"]["shortNames"] == ["wd", "wdg"]


# ---- 12. validation of custom objects ------------------------------------------------------------


def test_invalid_custom_objects_are_422_with_causes(crds: K8sApi) -> None:
    body = widget("w", size=20, color="green", parts=[{"name": "a"}, {"count": -1}])
    response = crds.request("POST", WIDGETS, json=body)
    assert response.status_code == 422
    status = response.json()
    assert status["reason"] == "Invalid"
    assert status["details"]["kind"] == "Widget"
    assert status["details"]["group"] == GROUP
    causes = [(c["field"], c["reason"]) for c in status["details"]["causes"]]
    assert causes == [
        ("spec.size", "FieldValueInvalid"),
        ("spec.color", "FieldValueNotSupported"),
        ("spec.parts[1].name", "FieldValueRequired"),
        ("spec.parts[1].count", "FieldValueInvalid"),
    ]
    assert status["message"].startswith(f'Widget.{GROUP} "w" is invalid: [spec.size: Invalid value: 20: ')
    assert "spec.size: Invalid value: 20: spec.size in body should be less than or equal to 10" in status["message"]


def test_unknown_fields_follow_field_validation(crds: K8sApi) -> None:
    # fieldValidation=Strict → 400 strict decoding error; Warn (default) → pruned + Warning header;
    # Ignore → pruned silently. Unknown metadata fields are treated the same way.
    body = widget("w", sizee=2)
    strict = crds.request("POST", WIDGETS, json=body, params={"fieldValidation": "Strict"})
    assert strict.status_code == 400
    assert strict.json()["message"] == (
        'Widget in version "v1" cannot be handled as a Widget: strict decoding error: unknown field "spec.sizee"'
    )
    warned = crds.request("POST", WIDGETS, json=body)
    assert warned.status_code == 201
    assert "sizee" not in warned.json()["spec"]
    assert warned.headers["Warning"] == '299 - "unknown field \\"spec.sizee\\""'
    ignored = crds.request("POST", WIDGETS, json={**widget("w2", sizee=2)}, params={"fieldValidation": "Ignore"})
    assert (ignored.status_code, "Warning" in ignored.headers) == (201, False)
    meta = crds.request("POST", CONFIGMAPS, json=configmap("cm", bogus="x"), params={"fieldValidation": "Strict"})
    assert meta.json()["message"].endswith('unknown field "metadata.bogus"')


def test_defaults_are_applied_on_create_and_update(crds: K8sApi) -> None:
    created = crds.create(widget("w"))
    assert created["spec"]["color"] == "red"
    updated = crds.patch(f"{GROUP}/v1", "Widget", "w", {"spec": {"color": None}})
    assert updated["spec"]["color"] == "red"


def test_transition_rules_apply_on_update(crds: K8sApi) -> None:
    crds.create(widget("w", size=5))
    with pytest.raises(ApiError) as raised:
        crds.patch(f"{GROUP}/v1", "Widget", "w", {"spec": {"size": 4}})
    assert raised.value.code == 422
    assert raised.value.message == f'Widget.{GROUP} "w" is invalid: spec: Invalid value: "object": size cannot shrink'


# ---- 13. the resources an operator touches -------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/namespaces/default/events", {"involvedObject": {"kind": "Pod", "name": "p"}, "reason": "R"}),
        ("/apis/events.k8s.io/v1/namespaces/default/events", {"eventTime": "2025-01-01T00:00:00.000000Z"}),
        ("/api/v1/namespaces/default/secrets", {"type": "Opaque", "data": {"k": "dg=="}}),
        ("/api/v1/namespaces/default/configmaps", {"data": {"k": "v"}}),
        ("/api/v1/namespaces/default/pods", {"spec": {"containers": [{"name": "c", "image": "i"}]}}),
        ("/api/v1/namespaces/default/services", {"spec": {"clusterIP": "None", "ports": [{"port": 29500}]}}),
        ("/api/v1/namespaces", {}),
        ("/apis/coordination.k8s.io/v1/namespaces/default/leases", {"spec": {"holderIdentity": "me"}}),
        ("/apis/batch/v1/namespaces/default/jobs", {"spec": {"template": {}}}),
    ],
)
def test_operator_resources_are_servable(k8s_api: K8sApi, path: str, body: dict[str, Any]) -> None:
    created = k8s_api.request("POST", path, json={"metadata": {"name": "obj-1"}, **body})
    assert created.status_code == 201, created.text
    assert k8s_api.request("GET", f"{path}/obj-1").json()["metadata"]["uid"] == created.json()["metadata"]["uid"]
    assert [o["metadata"]["name"] for o in k8s_api.request("GET", path).json()["items"]].count("obj-1") == 1
    assert k8s_api.request("DELETE", f"{path}/obj-1").status_code == 200


# ---- clients, kmock and the Python helpers ----------------------------------------------------


def test_the_official_kubernetes_client_works(crds: K8sApi) -> None:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    configuration.host = crds.url
    with kubernetes.client.ApiClient(configuration) as client:
        core = kubernetes.client.CoreV1Api(client)
        metadata = kubernetes.client.V1ObjectMeta(name="cm")
        core.create_namespaced_config_map("default", kubernetes.client.V1ConfigMap(metadata=metadata, data={"a": "1"}))
        core.patch_namespaced_config_map("cm", "default", {"data": {"a": "2"}})
        assert core.read_namespaced_config_map("cm", "default").data == {"a": "2"}
        assert [n.metadata.name for n in core.list_namespace().items if n.metadata][:1] == ["default"]
        custom = kubernetes.client.CustomObjectsApi(client)
        custom.create_namespaced_custom_object(GROUP, "v1", "default", "widgets", widget("w"))
        custom.patch_namespaced_custom_object_status(GROUP, "v1", "default", "widgets", "w", {"status": {"ok": 1}})
        fetched: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, "v1", "default", "widgets", "w")  # type: ignore[assignment]
        assert fetched["status"] == {"ok": 1}
        with pytest.raises(kubernetes.client.ApiException) as raised:
            custom.create_namespaced_custom_object(GROUP, "v1", "default", "widgets", widget("bad", size=0))
        assert raised.value.status == 422
        watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        events = list(watch.stream(core.list_namespaced_config_map, "default", timeout_seconds=1))  # type: ignore[no-untyped-call]
        assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "cm")]


def test_kmock_reactions_still_override_the_api(k8s_api: K8sApi) -> None:
    # kmock's DSL stays usable for fault injection: a reaction wins over the emulated API.
    def inject() -> None:
        k8s_api.emulator["get", "/api/v1/namespaces/default/configmaps/flaky"] << 503

    k8s_api.call(inject)
    assert k8s_api.request("GET", f"{CONFIGMAPS}/flaky").status_code == 503
    assert k8s_api.request("GET", f"{CONFIGMAPS}/other").status_code == 404
    history = k8s_api.call(lambda: [r.url.path for r in k8s_api.emulator][-2:])
    assert history == [f"{CONFIGMAPS}/flaky", f"{CONFIGMAPS}/other"]


def test_python_helpers_and_kmock_object_history(crds: K8sApi) -> None:
    crds.put({**widget("w"), "status": {"phase": "Seeded"}})
    assert crds.get(f"{GROUP}/v1", "Widget", "w")["status"] == {"phase": "Seeded"}  # type: ignore[index]
    crds.put({**widget("w", size=3)})
    versions = crds.call(
        lambda: [
            dict(v)["spec"]["size"]
            for v in crds.emulator.objects[f"{GROUP}/v1/widgets", "default", "w"].history
            if v is not None
        ]
    )
    assert versions == [1, 1, 3]
    assert crds.list(f"{GROUP}/v1", "widgets", label_selector="nope") == []


# ---- Kopf ------------------------------------------------------------------------------------------

OPERATOR = textwrap.dedent(
    """
    import kopf
    import kubernetes

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_):
        settings.watching.server_timeout = 10
        settings.posting.level = 10

    @kopf.on.create("tests.tuneloop.dev", "v1", "widgets")
    def create_fn(spec, name, namespace, body, patch, **_):
        child = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-child"},
            "data": {"size": str(spec["size"])},
        }
        kopf.adopt(child, owner=body)
        kubernetes.config.load_kube_config()
        with kubernetes.client.ApiClient() as client:
            kubernetes.client.CoreV1Api(client).create_namespaced_config_map(namespace, child)
        patch.status["phase"] = "Created"
        kopf.info(body, reason="ChildCreated", message=child["metadata"]["name"])
        return {"child": child["metadata"]["name"]}

    @kopf.on.update("tests.tuneloop.dev", "v1", "widgets", field="spec.size")
    def resize_fn(new, patch, **_):
        patch.status["phase"] = f"Resized to {new}"

    @kopf.on.delete("tests.tuneloop.dev", "v1", "widgets")
    def delete_fn(logger, **_):
        logger.info("goodbye")
    """
)


@pytest.fixture
def own_kopf_registry() -> Iterator[Any]:
    """A fresh Kopf registry, the default one restored afterwards: a test module that imported
    ``tuneloop_operator.handlers`` has put Tuneloop's handlers (and finalizer) in the default one."""
    import kopf

    default = kopf.get_default_registry()
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)  # what the default registry has built in
    kopf.set_default_registry(registry)
    yield registry
    kopf.set_default_registry(default)


def test_kopf_operator_full_cycle(crds: K8sApi, k8s_kubeconfig: Path, tmp_path: Path, own_kopf_registry: Any) -> None:
    # Real Kopf: create → finalizer → status (subresource) → child with owner reference →
    # update → delete → finalizer removed → object gone → child garbage-collected.
    from kopf.testing import KopfRunner

    operator = tmp_path / "widget_operator.py"  # not operator.py: Kopf puts its folder on sys.path
    operator.write_text(OPERATOR, encoding="utf-8")
    path = f"{GROUP}/v1"
    with KopfRunner(
        ["run", "--standalone", "--verbose", "-A", str(operator)], timeout=30, registry=own_kopf_registry
    ) as runner:
        created = crds.create(widget("w", size=2))

        def handled() -> dict[str, Any]:
            obj = crds.get(path, "Widget", "w") or {}
            return obj if (obj.get("status") or {}).get("phase") == "Created" else {}

        obj = crds.wait_for(handled, message="the create handler")
        assert obj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        assert obj["status"]["create_fn"] == {"child": "w-child"}
        assert obj["metadata"]["generation"] == 1
        child = crds.get("v1", "ConfigMap", "w-child")
        assert child is not None
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": path,
                "kind": "Widget",
                "name": "w",
                "uid": created["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        crds.patch(path, "Widget", "w", {"spec": {"size": 3}})
        crds.wait_for(
            lambda: (crds.get(path, "Widget", "w") or {}).get("status", {}).get("phase") == "Resized to 3",
            message="the update handler",
        )
        crds.delete(path, "Widget", "w")
        crds.wait_for(lambda: crds.get(path, "Widget", "w") is None, message="the finalizer's removal")
        assert crds.get("v1", "ConfigMap", "w-child") is None
        events = crds.wait_for(lambda: crds.list("v1", "Event", "default"), message="Kopf's event")
        assert [(e["reason"], e["message"], e["involvedObject"]["name"]) for e in events] == [
            ("ChildCreated", "w-child", "w")
        ]
    assert runner.exit_code == 0
    assert runner.exception is None
    assert "Handler 'delete_fn' succeeded" in runner.output
    for problem in ("Traceback", "inconsistencies", "[ERROR"):
        assert problem not in runner.output
