"""The operator as a real process (``python -m tuneloop_operator``) for integration and e2e tests.

A subprocess, not Kopf's in-process runner: tests can SIGKILL it mid-run and start a fresh
one (what an operator crash and restart is), scan everything it logged, and scrape its
``/metrics`` like Prometheus would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.k8s_fixtures import K8sApi

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "finetunejobs.tuneloop.dev.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """``python -m tuneloop_operator`` against the emulator, with fast timings for tests."""

    def __init__(self, kubeconfig: Path, log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(log_path.parent),
            "KUBECONFIG": str(kubeconfig),
            "TUNELOOP_TRAINER_IMAGE": "ghcr.io/tuneloop/trainer:test",
            "TUNELOOP_METRICS_PORT": str(self.metrics_port),
            "TUNELOOP_HEALTH_PORT": str(self.health_port),
            "TUNELOOP_RECONCILE_INTERVAL": "0.5",
            "TUNELOOP_BACKOFF_BASE_SECONDS": "0.5",
            "TUNELOOP_BACKOFF_MAX_SECONDS": "2",
            # 2 s past the grace period: only a pod deleted with a short grace period gets there.
            "TUNELOOP_STUCK_TERMINATING_SECONDS": "2",
            "TUNELOOP_LOG_LEVEL": "DEBUG",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
        } | dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n=== operator start {self.starts} ===\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tuneloop_operator"],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.process.returncode}:\n{self.logs()[-4000:]}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"the operator did not become healthy in {timeout}s:\n{self.logs()[-4000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                return int(r.status) == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """The value of one sample (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            sample, _, rest = head.partition("{")
            got = ",".join(sorted(filter(None, rest.rstrip("}").split(","))))
            if sample == name and got == want:
                return float(value)
        return 0.0

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye (what a crashed or OOM-killed operator does)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def crd(k8s_api: K8sApi) -> dict[str, Any]:
    """The project's CRD, installed."""
    return k8s_api.preload_crd(yaml.safe_load(CRD_PATH.read_text()))


@pytest.fixture
def operator(k8s_api: K8sApi, k8s_kubeconfig: Path, crd: dict[str, Any], tmp_path: Path) -> Iterator[OperatorProcess]:
    """A running operator (a subprocess) watching the emulator; stopped at teardown. Its log is
    printed when the test fails (pytest shows captured output)."""
    del crd
    proc = OperatorProcess(k8s_kubeconfig, tmp_path / "operator.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        print(proc.logs()[-20000:])
