"""Prometheus for tests: the real server (Debian's ``prometheus`` package, 2.42) on 127.0.0.1,
scraping a small exporter that runs in the test process.

The server is the ``prometheus`` binary itself, started with a temporary configuration and
database; nothing is installed as a service. It scrapes the exporter every second, so a gauge a
test sets is queryable about a second later (poll with :meth:`PrometheusHarness.wait_for`). A
label named ``job`` on an exported metric would be renamed ``exported_job`` on scrape: name
labels ``finetunejob`` or similar.

Fixtures
    ``prometheus`` (session) — a :class:`PrometheusHarness`: the server's ``url`` and the
    exporter's gauges. Skipped with the reason :data:`SKIP_REASON` where the binary is absent;
    failed instead when ``TUNELOOP_REQUIRE_PROMETHEUS=1`` (``.ci/run`` sets it once the package is
    installed, so CI never skips these tests silently).

The binary is looked up on ``PATH`` (``TUNELOOP_PROMETHEUS`` overrides it).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import ProxyHandler, build_opener

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

SKIP_REASON = "prometheus not installed (apt-get install prometheus)"
BINARY_ENV = "TUNELOOP_PROMETHEUS"
REQUIRE_ENV = "TUNELOOP_REQUIRE_PROMETHEUS"
SCRAPE_JOB = "tuneloop-test-exporter"
#: Seconds the server may take to start and have its first sample queryable.
START_TIMEOUT = 60.0

_opener = build_opener(ProxyHandler({}))  # a proxy for the real environment must never see 127.0.0.1


def prometheus_binary() -> str | None:
    """The ``prometheus`` executable, or ``None`` when it is not installed."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        return explicit if Path(explicit).is_file() and os.access(explicit, os.X_OK) else None
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Exporter:
    """A ``/metrics`` endpoint in the test process, with its own registry."""

    registry: CollectorRegistry
    server: Any
    thread: Any
    gauges: dict[str, Gauge] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls) -> Exporter:
        registry = CollectorRegistry()
        server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        return cls(registry=registry, server=server, thread=thread)

    def gauge(self, name: str, labelnames: Sequence[str] = ()) -> Gauge:
        """The gauge ``name`` (made on first use; the same object afterwards)."""
        if name not in self.gauges:
            self.gauges[name] = Gauge(name, f"test gauge {name}", list(labelnames), registry=self.registry)
        return self.gauges[name]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@dataclass
class PrometheusServer:
    """A running ``prometheus`` process."""

    process: subprocess.Popen[bytes]
    port: int
    directory: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "prometheus.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @classmethod
    def start(cls, binary: str, target: str, directory: Path, *, scrape_interval: str = "1s") -> PrometheusServer:
        """Prometheus scraping one target as job :data:`SCRAPE_JOB`."""
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [{"job_name": SCRAPE_JOB, "static_configs": [{"targets": [target]}]}],
        }
        return cls.launch(binary, config, directory)

    @classmethod
    def launch(cls, binary: str, config: dict[str, Any], directory: Path) -> PrometheusServer:
        """Prometheus with ``config`` (a ``prometheus.yml`` as a dict), its data and log in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "prometheus.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        port = free_port()
        with (directory / "prometheus.log").open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={path}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=directory,
            )
        return cls(process=process, port=port, directory=directory)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def get_json(url: str, *, timeout: float = 5.0) -> Any:
    """GET ``url`` and parse the JSON answer (error answers too: Prometheus explains them in JSON)."""
    try:
        with _opener.open(url, timeout=timeout) as response:
            return json.loads(response.read())
    except HTTPError as exc:
        return json.loads(exc.read())


@dataclass
class PrometheusHarness:
    """What the ``prometheus`` fixture yields."""

    server: PrometheusServer
    exporter: Exporter

    @property
    def url(self) -> str:
        """The server's base URL, ``http://127.0.0.1:<port>``."""
        return self.server.url

    def gauge(self, name: str, labelnames: Sequence[str] = ()) -> Gauge:
        """A gauge the server scrapes (every second)."""
        return self.exporter.gauge(name, labelnames)

    def query(self, promql: str) -> Any:
        """The raw API answer to an instant query."""
        return get_json(f"{self.url}/api/v1/query?{urlencode({'query': promql})}")

    def wait_for(self, promql: str, check: Callable[[list[Any]], bool], *, timeout: float = 30.0) -> list[Any]:
        """Poll the instant query until ``check(result)`` holds (result: the vector's samples)."""
        deadline = time.monotonic() + timeout
        answer: Any = None
        while time.monotonic() < deadline:
            if self.server.process.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.server.process.returncode}):\n{self.server.log_tail()}")
            try:
                answer = self.query(promql)
            except (URLError, OSError, ValueError):
                answer = None
            if isinstance(answer, dict) and answer.get("status") == "success":
                result = answer["data"]["result"]
                if check(result):
                    return list(result)
            time.sleep(0.2)
        raise TimeoutError(f"{promql!r} did not reach the expected result in {timeout:g} s; last answer: {answer}")

    def wait_for_value(self, promql: str, value: float, *, timeout: float = 30.0) -> None:
        """Poll until the query returns exactly one sample equal to ``value``."""
        self.wait_for(promql, lambda r: len(r) == 1 and float(r[0]["value"][1]) == value, timeout=timeout)


def _wait_ready(server: PrometheusServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"prometheus exited ({server.process.returncode}) on start:\n{server.log_tail()}")
        try:
            with _opener.open(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"prometheus was not ready within {timeout:g} s:\n{server.log_tail()}")


def start_prometheus(binary: str, directory: Path) -> PrometheusHarness:
    """The server and exporter, once the first scraped sample is queryable."""
    exporter = Exporter.start()
    server: PrometheusServer | None = None
    try:
        for attempt in range(3):  # the free port may be taken by someone else before the server binds it
            server = PrometheusServer.start(binary, f"127.0.0.1:{exporter.port}", directory / f"try-{attempt}")
            try:
                _wait_ready(server, START_TIMEOUT)
                break
            except RuntimeError:
                server.stop()
                if attempt == 2 or "address already in use" not in server.log_tail():
                    raise
        assert server is not None
        harness = PrometheusHarness(server=server, exporter=exporter)
        # The first scrape happens about one interval after the start; until then nothing is queryable.
        harness.wait_for(
            f'up{{job="{SCRAPE_JOB}"}}',
            lambda r: len(r) == 1 and r[0]["value"][1] == "1",
            timeout=START_TIMEOUT,
        )
        return harness
    except BaseException:
        if server is not None:
            server.stop()
        exporter.stop()
        raise


@pytest.fixture(scope="session")
def prometheus() -> Iterator[PrometheusHarness]:
    binary = prometheus_binary()
    if binary is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {SKIP_REASON}")
        pytest.skip(SKIP_REASON)
    with tempfile.TemporaryDirectory(prefix="tuneloop-prometheus-") as scratch:
        harness = start_prometheus(binary, Path(scratch))
        try:
            yield harness
        finally:
            harness.server.stop()
            harness.exporter.stop()
