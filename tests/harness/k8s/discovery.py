"""Discovery: ``/api``, ``/apis``, the resource lists, ``/version``, health endpoints, and the
minimal OpenAPI v3 documents kubectl needs to validate on the server.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import aiohttp.web
from kmock._internal import rendering

from tests.harness.k8s.errors import (
    json_response,
    no_route,
)
from tests.harness.k8s.resources import Obj, ResourceDef
from tests.harness.k8s.store import ObjectStore

SUBRESOURCE_VERBS = ("get", "patch", "update")


def _version_priority(version: str) -> tuple[int, int, int, str]:
    """Kube-aware version order: v2 > v1 > v1beta2 > v1beta1 > v1alpha1 > anything else."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0, version)
    stage = {None: 0, "beta": 1, "alpha": 2}[match[2]]
    return (stage, -int(match[1]), -int(match[3] or 0), version)


def _openapi_v3_document(defs: Iterable[ResourceDef], server_version: str) -> Obj:
    """A minimal OpenAPI v3 group-version document: PATCH operations, no schemas.

    kubectl (≥ 1.27) validates on the server (``fieldValidation=Strict``) when OpenAPI v3
    shows, for the object's kind, a PATCH operation with a ``fieldValidation`` query
    parameter; without any OpenAPI, ``kubectl apply``/``create`` fail with "failed to
    download openapi" unless ``--validate=false``. kubectl's patch computation needs no
    OpenAPI (built-in kinds: strategic merge from the Go structs; custom resources: a JSON
    merge patch), so no request bodies or schemas are described; ``kubectl explain`` has
    nothing to explain.
    """
    paths: Obj = {}
    for rd in defs:
        if "patch" not in rd.verbs:
            continue
        prefix = f"/apis/{rd.group}/{rd.version}" if rd.group else f"/api/{rd.version}"
        scope = "/namespaces/{namespace}" if rd.namespaced else ""
        paths[f"{prefix}{scope}/{rd.plural}/{{name}}"] = {
            "patch": {
                "operationId": f"patch{rd.kind}",
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                ],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": rd.group, "version": rd.version, "kind": rd.kind},
            }
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (tests.harness.k8s emulator)", "version": server_version},
        "paths": paths,
        "components": {"schemas": {}},
    }


class Discovery(ObjectStore):
    """What kubectl and client libraries read to find the served resources."""

    __slots__ = ()

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = {}
        for rd in self._defs.values():
            groups.setdefault(rd.group, set()).add(rd.version)
        return {group: sorted(versions, key=_version_priority) for group, versions in groups.items()}

    def _api_group(self, group: str, versions: list[str]) -> Obj:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _resource_list(self, group: str, version: str) -> Obj:
        resources: list[Obj] = []
        defs = sorted(
            (rd for rd in self._defs.values() if rd.group == group and rd.version == version), key=lambda r: r.plural
        )
        for rd in defs:
            entry: Obj = {
                "name": rd.plural,
                "singularName": rd.singular,
                "namespaced": rd.namespaced,
                "kind": rd.kind,
                "verbs": list(rd.verbs),
            }
            if rd.short_names:
                entry["shortNames"] = list(rd.short_names)
            if rd.categories:
                entry["categories"] = list(rd.categories)
            resources.append(entry)
            resources.extend(
                {
                    "name": f"{rd.plural}/{sub}",
                    "singularName": "",
                    "namespaced": rd.namespaced,
                    "kind": "Scale" if sub == "scale" else rd.kind,
                    "verbs": list(SUBRESOURCE_VERBS),
                }
                for sub in sorted(rd.subresources)
            )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _discovery(self, path: str, request: rendering.Request) -> aiohttp.web.StreamResponse | None:
        groups = self._groups()
        if path == "/":
            paths = {"/api", "/api/v1", "/apis", "/version", "/healthz", "/livez", "/readyz", "/openapi/v2"}
            for group, versions in groups.items():
                if group:
                    paths.add(f"/apis/{group}")
                    paths.update(f"/apis/{group}/{v}" for v in versions)
            return json_response({"paths": sorted(paths)})
        if path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok")
        if path == "/version":
            major, minor = self.server_version.lstrip("v").split(".")[:2]
            return json_response(
                {
                    "major": major,
                    "minor": minor,
                    "gitVersion": self.server_version,
                    "gitCommit": "0000000000000000000000000000000000000000",
                    "gitTreeState": "clean",
                    "buildDate": "2025-01-01T00:00:00Z",
                    "goVersion": "go1.24",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                }
            )
        if path == "/api":
            host = request.url.host or "127.0.0.1"
            address = f"{host}:{request.url.port}" if request.url.port else host
            return json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
                }
            )
        if path == "/apis":
            named = sorted((g for g in groups if g), key=lambda g: (g.endswith(".k8s.io") is False, g))
            return json_response(
                {"kind": "APIGroupList", "apiVersion": "v1", "groups": [self._api_group(g, groups[g]) for g in named]}
            )
        if match := re.fullmatch(r"/api/([^/]+)", path):
            if match[1] not in groups.get("", []):
                raise no_route()
            return json_response(self._resource_list("", match[1]))
        if match := re.fullmatch(r"/apis/([^/]+)", path):
            if not match[1] or match[1] not in groups:
                raise no_route()
            return json_response(
                {"kind": "APIGroup", "apiVersion": "v1", **self._api_group(match[1], groups[match[1]])}
            )
        if match := re.fullmatch(r"/apis/([^/]+)/([^/]+)", path):
            if match[2] not in groups.get(match[1], []):
                raise no_route()
            return json_response(self._resource_list(match[1], match[2]))
        if path == "/openapi/v3":
            gvs = [f"api/{v}" if not g else f"apis/{g}/{v}" for g, versions in groups.items() for v in versions]
            return json_response(
                {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={self._rv}"} for gv in gvs}}
            )
        if match := re.fullmatch(r"/openapi/v3/(?:api/([^/]+)|apis/([^/]+)/([^/]+))", path):
            group, version = ("", match[1]) if match[1] else (match[2], match[3])
            defs = [rd for rd in self._defs.values() if rd.group == group and rd.version == version]
            if not defs:
                raise no_route()
            return json_response(_openapi_v3_document(defs, self.server_version))
        if path.startswith("/openapi/"):
            raise no_route()  # no OpenAPI v2, no schemas: see tests/README.md
        return None
