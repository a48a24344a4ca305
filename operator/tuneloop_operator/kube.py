"""The one module that talks to the Kubernetes API server (besides Kopf itself).

Plain JSON over the official ``kubernetes`` client's connection handling (kubeconfig or
in-cluster service account, token refresh, TLS), without its model classes: objects are
dicts, as the planner and the renderer use them. Blocking calls run in a small thread pool
so the operator's event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote, urlencode

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from tuneloop.api import API_VERSION, GROUP, KIND, PLURAL, VERSION
from tuneloop_operator.planner.types import Event
from tuneloop_operator.render import LABEL_JOB

log = logging.getLogger(__name__)

Obj = dict[str, Any]
COMPONENT: Final = "tuneloop-operator"
#: Worker threads for API calls; the pool of HTTP connections is sized to match.
API_THREADS: Final = 16
_PLURALS: Final = {
    "Pod": "pods",
    "ConfigMap": "configmaps",
    "Service": "services",
    "Secret": "secrets",
    "Event": "events",
}


class ApiError(Exception):
    """The API server answered with an error."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        """Seconds the server asked the client to wait (``Retry-After``, e.g. with a 429)."""


def _retry_after(headers: Any, status: Any) -> float | None:
    """The server's ``Retry-After`` (seconds), from the header or the Status body's details."""
    raw = (headers or {}).get("Retry-After") if hasattr(headers, "get") else None
    if raw is None and isinstance(status, Mapping):
        raw = (status.get("details") or {}).get("retryAfterSeconds")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except (TypeError, ValueError):
        return None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeClient:
    """Async access to the API server, objects as dicts."""

    def __init__(self, api_client: k8s_client.ApiClient, *, threads: int = API_THREADS) -> None:
        self.api_client = api_client
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tuneloop-api")
        self.instance = os.environ.get("HOSTNAME") or socket.gethostname()

    @classmethod
    def from_environment(cls) -> KubeClient:
        """Log in like kubectl: the in-cluster service account, else ``$KUBECONFIG``/~/.kube/config."""
        configuration = k8s_client.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException:
            k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        configuration.connection_pool_maxsize = API_THREADS
        return cls(k8s_client.ApiClient(configuration))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.api_client.close()  # type: ignore[no-untyped-call]

    # -- raw --

    def _request_sync(
        self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None, content_type: str = ""
    ) -> Obj | None:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        resource_path = path + (f"?{urlencode(dict(query))}" if query else "")
        method_, url, header_params, _, _ = self.api_client.param_serialize(
            method, resource_path, header_params=headers, auth_settings=["BearerToken"]
        )
        # The client serialises JSON bodies itself (json content types): hand it the object.
        response = self.api_client.call_api(method_, url, header_params=header_params, body=body)
        data = response.read()  # type: ignore[no-untyped-call]
        if response.status == 404 and method in ("GET", "DELETE"):
            return None
        if response.status >= 400:
            headers = response.getheaders()  # type: ignore[no-untyped-call]
            try:
                status = json.loads(data)
                reason, message = str(status.get("reason", "")), str(status.get("message", ""))
            except (ValueError, AttributeError):
                text = data[:200].decode(errors="replace")
                raise ApiError(response.status, str(response.reason), text, _retry_after(headers, None)) from None
            raise ApiError(response.status, reason, message, _retry_after(headers, status))
        return json.loads(data) if data else {}

    async def request(
        self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None, content_type: str = ""
    ) -> Obj | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._request_sync, method, path, body, query, content_type)

    # -- paths --

    @staticmethod
    def job_path(namespace: str, name: str = "", subresource: str = "") -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{PLURAL}"
        if name:
            path += f"/{quote(name)}"
        if subresource:
            path += f"/{subresource}"
        return path

    @staticmethod
    def core_path(namespace: str, kind: str, name: str = "") -> str:
        path = f"/api/v1/namespaces/{quote(namespace)}/{_PLURALS[kind]}"
        return path + (f"/{quote(name)}" if name else "")

    # -- operations --

    async def get_job(self, namespace: str, name: str) -> Obj | None:
        return await self.request("GET", self.job_path(namespace, name))

    async def list_children(self, namespace: str, job: str, kind: str) -> list[Obj]:
        """Objects of ``kind`` labelled as the job's children."""
        query = {"labelSelector": f"{LABEL_JOB}={job}"}
        result = await self.request("GET", self.core_path(namespace, kind), query=query)
        items = list((result or {}).get("items") or [])
        # Filter again: never trust a server (or emulator) to have applied the selector.
        return [i for i in items if ((i.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB) == job]

    async def create(self, obj: Mapping[str, Any]) -> bool:
        """Create a core object; False when it already exists (deterministic names make creation
        idempotent: a restarted operator finds its children instead of making twins)."""
        meta = obj["metadata"]
        try:
            await self.request("POST", self.core_path(meta["namespace"], obj["kind"]), body=obj)
        except ApiError as exc:
            if exc.status == 409 and exc.reason == "AlreadyExists":
                return False
            raise
        return True

    async def delete(self, namespace: str, kind: str, name: str) -> bool:
        """Delete a core object (background propagation); False when it was already gone."""
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        result = await self.request("DELETE", self.core_path(namespace, kind, name), body=options)
        return result is not None

    async def patch_job_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        await self.request(
            "PATCH",
            self.job_path(namespace, name, "status"),
            body={"status": patch},
            content_type="application/merge-patch+json",
        )

    async def get_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's values, decoded; None when it does not exist. Values are never logged."""
        secret = await self.request("GET", self.core_path(namespace, "Secret", name))
        if secret is None:
            return None
        out = {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.get("data") or {}).items()}
        out.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
        return out

    async def post_event(self, body: Mapping[str, Any], event: Event) -> None:
        """A core/v1 Event about the job (what ``kubectl describe`` shows)."""
        meta = body.get("metadata") or {}
        namespace = str(meta.get("namespace"))
        now = _now()
        manifest = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": body.get("apiVersion", API_VERSION),
                "kind": body.get("kind", KIND),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("POST", self.core_path(namespace, "Event"), body=manifest)
