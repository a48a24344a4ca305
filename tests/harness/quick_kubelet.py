"""A kubelet without processes, for operator tests where the trainer's work does not matter.

:class:`tests.harness.kubelet.LocalKubelet` runs each pod's command, which for a trainer pod is a
real (if tiny) training run: seconds of CPU per pod. :class:`QuickKubelet` only writes pod
status, as a kubelet would report a trainer that ran and exited 0: every pod of the watched
namespace goes ``Running`` at once and ``Succeeded`` ``run_seconds`` later, with a trainer
summary (metrics, model URI) as its termination message. It writes inside the emulator
(``K8sApi.patch``), so API faults injected for HTTP clients (:mod:`tests.harness.faults_k8s`)
never hit it.

It also records what a duplicate-detector needs: every pod uid it saw started, by pod name.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from tests.harness.k8s import ApiError

if TYPE_CHECKING:
    from tests.harness.k8s_fixtures import K8sApi

__all__ = ["QuickKubelet"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class QuickKubelet:
    """Pods go Running at once and Succeeded ``run_seconds`` later (a context manager)."""

    def __init__(
        self,
        k8s_api: K8sApi,
        namespace: str = "default",
        *,
        run_seconds: float = 0.3,
        interval: float = 0.05,
        summary: dict[str, Any] | None = None,
    ) -> None:
        self.k8s_api = k8s_api
        self.namespace = namespace
        self.run_seconds = run_seconds
        self.interval = interval
        self.summary = summary if summary is not None else {"metrics": {"eval_loss": 0.25, "eval_accuracy": 0.9}}
        #: pod name -> uids of the pods of that name this kubelet started (two: a pod made twice).
        self.started: defaultdict[str, list[str]] = defaultdict(list)
        self._running_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def __enter__(self) -> QuickKubelet:
        self._thread = threading.Thread(target=self._loop, name="quick-kubelet", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except Exception as exc:  # reported by the test, never swallowed silently
                self.errors.append(repr(exc))

    def _tick(self) -> None:
        for pod in self.k8s_api.list("v1", "Pod", self.namespace):
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            name, uid = str(meta["name"]), str(meta["uid"])
            phase = (pod.get("status") or {}).get("phase") or "Pending"
            container = str(((pod.get("spec") or {}).get("containers") or [{}])[0].get("name") or "trainer")
            if phase == "Pending":
                self._write(name, self._running(container))
                self.started[name].append(uid)
                self._running_since[uid] = time.monotonic()
            elif phase == "Running" and time.monotonic() - self._running_since.get(uid, 0.0) >= self.run_seconds:
                self._write(name, self._succeeded(container))

    def _write(self, name: str, status: dict[str, Any]) -> None:
        with contextlib.suppress(ApiError):  # deleted meanwhile
            self.k8s_api.patch("v1", "Pod", name, {"status": status}, self.namespace, subresource="status")

    @staticmethod
    def _running(container: str) -> dict[str, Any]:
        return {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {"name": container, "ready": True, "restartCount": 0, "state": {"running": {"startedAt": _now()}}}
            ],
        }

    def _succeeded(self, container: str) -> dict[str, Any]:
        terminated = {
            "exitCode": 0,
            "reason": "Completed",
            "message": json.dumps(self.summary),
            "finishedAt": _now(),
        }
        return {
            "phase": "Succeeded",
            "containerStatuses": [
                {"name": container, "ready": False, "restartCount": 0, "state": {"terminated": terminated}}
            ],
        }
