"""The emulated API server: :class:`KubernetesApiEmulator`, its kmock integration and HTTP routing.

It is the top of a stack of layers, one per API-server behaviour: :mod:`~tests.harness.k8s.store`
(objects, resourceVersions, event log), :mod:`~tests.harness.k8s.listing`,
:mod:`~tests.harness.k8s.watch`, :mod:`~tests.harness.k8s.discovery`,
:mod:`~tests.harness.k8s.admission`, :mod:`~tests.harness.k8s.deletion` and
:mod:`~tests.harness.k8s.writes`. This module parses URLs into API paths, routes each request
to a layer, and offers the same operations to Python callers (``create_object``...).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import apps, enums, rendering

from tests.harness.k8s.discovery import Discovery
from tests.harness.k8s.errors import (
    ApiError,
    bad_request,
    json_response,
    no_route,
    unsupported_media_type,
)
from tests.harness.k8s.protobuf import decode_protobuf
from tests.harness.k8s.resources import Obj
from tests.harness.k8s.watch import Watch
from tests.harness.k8s.writes import Writes

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True)
class ApiPath:
    """A parsed resource URL: ``/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}[/{sub}]]``."""

    group: str
    version: str
    plural: str
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_api_path(path: str) -> ApiPath | None:
    """Parse a resource URL, including the cluster-scoped ``/api/v1/namespaces[/{name}[/status]]``."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace: str | None = None
    namespace_subresource = group == "" and len(rest) == 3 and rest[2] in ("status", "finalize")
    if rest[0] == "namespaces" and len(rest) >= 3 and not namespace_subresource:
        namespace, rest = rest[1], rest[2:]
    return ApiPath(
        group=group,
        version=version,
        plural=rest[0],
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else None,
        subresource="/".join(rest[2:]) or None,
    )


@attrs.define(kw_only=True)
class KubernetesApiEmulator(Writes, Watch, Discovery):
    """kmock's ``KubernetesEmulator`` with the semantics of a real API server (see module docs).

    Knobs: ``require_namespaces`` (creating in a missing namespace is a 404, as for real),
    ``strict_field_selectors`` (only the fields the real server indexes are selectable),
    ``graceful_pod_deletion`` (a scheduled pod stays Terminating until deleted with
    ``gracePeriodSeconds=0``, as a kubelet does), ``max_events`` (watch history kept before
    a watch from an older resourceVersion gets ``410 Gone``).
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # The stock fallback reactions (kmock's simplistic API) are replaced by _serve_api().
        # User reactions added later (emu['get /x'] << ...) still take precedence over it.
        self._payloads.clear()
        self._load_builtins()

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve one HTTP request; like kmock's, but with a URL parser that knows namespaces."""
        await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            if self.limit is not None and len(self._requests) >= self.limit:
                raise apps.KMockError("Too many requests have been served so far.")
            request = await self._parse_request(raw_request, request_id=len(self._requests))
            self._requests.append(request)
            try:
                return await self._handle(request)
            except rendering.StreamingError as exc:  # a user reaction failed mid-stream
                raw_response = exc.args[0]
                raise exc.__cause__ or exc from None
        except Exception as exc:
            if not self._errors:
                raise
            self._errors[-1].append(exc)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _parse_request(self, raw: aiohttp.web.BaseRequest, *, request_id: int) -> rendering.Request:
        body = await raw.read()
        data: Any = None
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
        api_path = parse_api_path(raw.path)
        params = dict(raw.query)
        action: enums.action | None = None
        if api_path is not None:
            method = raw.method.upper()
            if method == "GET":
                is_watch = params.get("watch") in ("true", "1")
                action = enums.action.WATCH if is_watch else enums.action.FETCH if api_path.name else enums.action.LIST
            elif method == "POST" and not api_path.name:
                action = enums.action.CREATE
            elif method in ("PATCH", "PUT") and api_path.name:
                action = enums.action.UPDATE
            elif method == "DELETE":
                action = enums.action.DELETE
        return rendering.Request(
            id=request_id,
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=params,
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=body.decode("utf-8", "replace"),
            data=data,
            action=action,
            resource=None if api_path is None else kmock.resource(api_path.group, api_path.version, api_path.plural),
            namespace=None if api_path is None else api_path.namespace,
            name=None if api_path is None else api_path.name,
            subresource=None if api_path is None else api_path.subresource,
        )

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if self._payloads:  # user-defined reactions first, as in kmock
            with contextlib.suppress(NotImplementedError):
                return await apps.RawHandler._handle(self, request)
        return await self._serve_api(request)

    def reset(self) -> None:
        """Forget all objects, CRDs, watch history, requests and user reactions; end open watches.

        The resourceVersion counter keeps growing (as on a real server, RVs never go back).
        """
        self.close_watches()
        self._objects.clear()
        self._log.clear()
        self._log_rvs.clear()
        self._compacted_rv = self._rv
        self._payloads.clear()
        self._requests.clear()
        for errors in self._errors:
            errors.clear()
        self._load_builtins()
        for name in DEFAULT_NAMESPACES:
            self.create_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    async def _serve_api(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        try:
            return await self._route(request)
        except ApiError as exc:
            return json_response(exc.status(), exc.code)

    async def _route(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        path = "/" + request.url.path.strip("/")
        method = str(request.method.value).upper()
        if method == "GET":
            discovery = self._discovery(path, request)
            if discovery is not None:
                return discovery
        api_path = parse_api_path(path)
        if api_path is None:
            raise no_route()
        rd = self._defs.get((api_path.group, api_path.version, api_path.plural))
        if rd is None or (api_path.namespace is not None and not rd.namespaced):
            raise no_route()
        params = dict(request.params)
        namespace = api_path.namespace
        name = api_path.name
        sub = api_path.subresource
        if sub == "binding" and rd.group == "" and rd.plural == "pods" and name is not None:
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on pods/binding")
            return json_response(self._bind_pod(rd, namespace, name, self._body(request)), 201)
        if sub is not None and (sub != "status" or not rd.has_status):
            raise no_route()  # only /status and pods/binding are served (no scale, log, exec, eviction)
        match method, name:
            case "GET", _ if params.get("watch") in ("true", "1"):
                return await self._serve_watch_stream(request, rd, namespace, name, params)
            case "GET", None:
                return json_response(self._list_response(rd, namespace, params, request.headers.get("Accept", "")))
            case "GET", str():
                obj = self._get_or_404(rd, namespace, name)
                return json_response(self._maybe_table(rd, [obj], request.headers.get("Accept", "")))
            case "POST", None:
                body = self._body(request)
                created, warnings = self._create(rd, namespace, body, params)
                return json_response(self._present(rd, created), 201, warnings)
            case "PUT", str():
                body = self._body(request)
                updated, warnings = self._replace(rd, namespace, name, body, subresource=sub, params=params)
                return json_response(self._present(rd, updated), 200, warnings)
            case "PATCH", str():
                content_type = request.headers.get("Content-Type", "")
                patched, warnings, was_created = self._patch(
                    rd, namespace, name, subresource=sub, content_type=content_type, body=request.body, params=params
                )
                return json_response(self._present(rd, patched), 201 if was_created else 200, warnings)
            case "DELETE", str():
                return json_response(self._delete_request(rd, namespace, name, self._delete_options(request)))
            case "DELETE", None:
                return json_response(self._delete_collection(rd, namespace, params, self._delete_options(request)))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    @staticmethod
    def _body(request: rendering.Request) -> Obj:
        content_type = request.headers.get("Content-Type", "application/json").split(";", maxsplit=1)[0].strip()
        if "protobuf" in content_type:
            return decode_protobuf(request.body)
        if "cbor" in content_type:
            raise unsupported_media_type(content_type)
        try:
            data = yaml.safe_load(request.body) if "yaml" in content_type else json.loads(request.body or b"null")
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"the request body could not be decoded: {exc}") from exc
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object")
        return data

    @staticmethod
    def _delete_options(request: rendering.Request) -> Obj:
        options: Obj = {}
        if request.body.strip():
            try:
                loaded = json.loads(request.body)
            except ValueError as exc:
                raise bad_request(f"the DeleteOptions body could not be decoded: {exc}") from exc
            if isinstance(loaded, dict):
                options.update(loaded)
        for key in ("propagationPolicy", "gracePeriodSeconds", "orphanDependents", "dryRun"):
            if key in request.params:
                value: Any = request.params[key]
                if key == "gracePeriodSeconds":
                    value = int(value)
                elif key == "orphanDependents":
                    value = value == "true"
                options[key] = value
        return options

    def create_object(self, obj: Mapping[str, Any], *, field_validation: str = "Strict") -> Obj:
        """Create an object as ``POST`` would (namespace from ``metadata.namespace``)."""
        rd = self.resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        namespace = (obj.get("metadata") or {}).get("namespace") or ("default" if rd.namespaced else None)
        created, _ = self._create(rd, namespace, copy.deepcopy(dict(obj)), {"fieldValidation": field_validation})
        return self._present(rd, created)

    def get_object(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        """The current object, or ``None`` (namespaced kinds default to the ``default`` namespace)."""
        rd = self.resource_for(api_version, kind)
        obj = self._load(rd, namespace or ("default" if rd.namespaced else None), name)
        return None if obj is None else self._present(rd, obj)

    def list_objects(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[Obj]:
        """Live objects (all namespaces when ``namespace`` is None), filtered like a LIST."""
        rd = self.resource_for(api_version, kind)
        params = {"labelSelector": label_selector, "fieldSelector": field_selector}
        return [self._present(rd, obj) for obj in self._select(rd, namespace, self._selector(rd, params))]

    def replace_object(self, obj: Mapping[str, Any], *, subresource: str | None = None) -> Obj:
        """``PUT`` the object (``metadata.resourceVersion``, if set, is a precondition)."""
        rd = self.resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or ("default" if rd.namespaced else None)
        updated, _ = self._replace(
            rd,
            namespace,
            str(meta.get("name")),
            copy.deepcopy(dict(obj)),
            subresource=subresource,
            params={"fieldValidation": "Strict"},
        )
        return self._present(rd, updated)

    def put_object(self, obj: Mapping[str, Any]) -> Obj:
        """Create, or replace unconditionally (status included, where it has a subresource)."""
        rd = self.resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        meta = dict(obj.get("metadata") or {})
        namespace = meta.get("namespace") or ("default" if rd.namespaced else None)
        if self._load(rd, namespace, str(meta.get("name"))) is None:
            created = self.create_object(obj)
            if rd.has_status and "status" in obj:
                return self.replace_object({**created, "status": obj["status"]}, subresource="status")
            return created
        body = copy.deepcopy(dict(obj))
        body.setdefault("metadata", {}).pop("resourceVersion", None)
        updated = self.replace_object(body)
        if rd.has_status and "status" in obj:
            return self.replace_object({**updated, "status": obj["status"]}, subresource="status")
        return updated

    def patch_object(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> Obj:
        """``PATCH`` with ``patch_type`` ``merge``, ``json`` or ``strategic``."""
        rd = self.resource_for(api_version, kind)
        media = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }[patch_type]
        namespace = namespace or ("default" if rd.namespaced else None)
        body = json.dumps(patch).encode()
        patched, _, _ = self._patch(
            rd,
            namespace,
            name,
            subresource=subresource,
            content_type=media,
            body=body,
            params={"fieldValidation": "Strict"},
        )
        return self._present(rd, patched)

    def delete_object(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        *,
        propagation_policy: str | None = None,
    ) -> Obj:
        """``DELETE`` (returns what the server returns: the object, or a ``Status``)."""
        rd = self.resource_for(api_version, kind)
        namespace = namespace or ("default" if rd.namespaced else None)
        options = {"propagationPolicy": propagation_policy} if propagation_policy else {}
        return self._delete_request(rd, namespace, name, options)

    def preload_crd(self, crd: Mapping[str, Any]) -> Obj:
        """Create (or replace) a CustomResourceDefinition; its resources are served right away."""
        existing = self.get_object("apiextensions.k8s.io/v1", "CustomResourceDefinition", crd["metadata"]["name"])
        if existing is None:
            return self.create_object(crd)
        body = copy.deepcopy(dict(crd))
        body["metadata"] = {**existing["metadata"], **body.get("metadata", {})}
        body["metadata"].pop("resourceVersion", None)
        return self.replace_object(body)
