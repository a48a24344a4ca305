"""Reporting pods to the API server: the pod status a real kubelet writes (phase, conditions,
container states, exit codes, termination messages), finishing a pod, and deleting it.

:class:`PodReporter` is the base of the kubelet's layers and holds all of its state.
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from tests.harness.kubelet.runs import (
    FALLBACK_LOG_BYTES,
    FALLBACK_LOG_LINES,
    LOCAL_IP,
    MAX_TERMINATION_MESSAGE_BYTES,
    Obj,
    Run,
    merge_conditions,
    node_arch,
    now_rfc3339,
    pod_condition,
)

if TYPE_CHECKING:
    from tests.harness.k8s_fixtures import K8sApi

logger = logging.getLogger(__name__)


class PodReporter:
    """The kubelet's state, and what it writes about pods."""

    def __init__(
        self,
        k8s_api: K8sApi,
        workdir: Path,
        *,
        node_name: str = "local-node",
        node_labels: Mapping[str, str] | None = None,
        gpus: int = 8,
        env_overrides: Mapping[str, str] | None = None,
        python: str = sys.executable,
        max_grace_seconds: float = 10.0,
        poll_interval: float = 0.05,
    ) -> None:
        self.api = k8s_api
        self.workdir = Path(workdir)
        self.node_name = node_name
        self.node_labels: dict[str, str] = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": node_arch(),
            **(node_labels or {}),
        }
        self.gpus = gpus
        self.env_overrides = dict(env_overrides or {})
        self.python = python
        self.max_grace_seconds = max_grace_seconds
        self.poll_interval = poll_interval
        #: Unexpected exceptions of the polling thread (formatted); the fixture fails a test on any.
        self.errors: list[str] = []
        self._runs: dict[str, Run] = {}  # by pod uid, in admission order
        self._unschedulable: dict[str, str] = {}  # pod uid -> the message last written
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._binding_supported = True

    def _termination_message(self, run: Run, exit_code: int) -> str:
        try:
            with run.termination_path.open("rb") as file:
                message = file.read(MAX_TERMINATION_MESSAGE_BYTES)
        except OSError:
            message = b""
        policy = run.container.get("terminationMessagePolicy") or "File"
        if not message and policy == "FallbackToLogsOnError" and exit_code != 0:
            try:
                lines = run.log_path.read_bytes().splitlines(keepends=True)
            except OSError:
                lines = []
            message = b"".join(lines[-FALLBACK_LOG_LINES:])[-FALLBACK_LOG_BYTES:]
        return message.decode(errors="replace")

    def _finish(
        self, run: Run, *, exit_code: int | None, reason: str | None = None, message: str | None = None
    ) -> None:
        """Record how the pod ended, write its final status and (if asked) delete it."""
        stop = run.stop
        now = now_rfc3339()
        if stop is not None and stop.kind == "node-lost":
            run.terminated = {
                "exitCode": 137,
                "reason": "ContainerStatusUnknown",
                "message": "The container could not be located when the pod was terminated",
            }
        elif exit_code is not None:
            terminated: Obj = {
                "exitCode": exit_code,
                "reason": "OOMKilled"
                if stop is not None and stop.oom
                else ("Completed" if exit_code == 0 else "Error"),
            }
            text = self._termination_message(run, exit_code)
            if text:
                terminated["message"] = text
            run.terminated = terminated
        elif run.terminated is None and run.proc is None and stop is not None:
            run.terminated = {
                "exitCode": 137,
                "reason": "ContainerStatusUnknown",
                "message": "The container could not be located when the pod was deleted",
            }
        if run.terminated is not None:
            run.terminated.setdefault("startedAt", run.started_at or now)
            run.terminated.setdefault("finishedAt", now)
        if stop is not None and stop.kind in ("evict", "node-lost"):
            run.phase = "Failed"
            run.final = {"reason": stop.reason, "message": stop.message}
        elif reason is not None:
            run.phase = "Failed"
            run.final = {"reason": reason, "message": message}
        else:
            run.phase = "Succeeded" if exit_code == 0 else "Failed"
        run.finished = True
        run.kill_at = None
        logger.info("local kubelet: %s/%s %s (%s)", run.namespace, run.name, run.phase, run.terminated)
        if stop is not None and stop.kind == "node-lost":
            condition = pod_condition(
                "DisruptionTarget", "True", "DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint"
            )
            self._write_pod_status(run.namespace, run.name, run.uid, {}, [condition])
        if not run.gone:
            self._write_run_status(run)
            if stop is not None and stop.kind == "node-lost" and stop.delete:
                self._force_delete(run.namespace, run.name, run.uid)
            elif stop is not None and stop.delete:
                self._delete(run.namespace, run.name, run.uid)
            elif stop is not None and stop.kind == "delete" and not run.pod["metadata"].get("finalizers"):
                self._force_delete(run.namespace, run.name, run.uid)
        run.done.set()

    def _container_status(self, run: Run) -> Obj:
        container = run.container
        status: Obj = {
            "name": run.container_name,
            "image": str(container.get("image") or ""),
            "imageID": "",
            "ready": False,
            "started": False,
            "restartCount": 0,
            "lastState": {},
        }
        if run.proc is not None:
            status["containerID"] = f"local://{run.proc.pid}"
        if run.finished and run.terminated is not None:
            status["state"] = {"terminated": dict(run.terminated)}
        elif run.finished:
            status["state"] = {"waiting": {"reason": "ContainerCreating"}}
        elif run.proc is not None:
            status |= {"ready": True, "started": True, "state": {"running": {"startedAt": run.started_at}}}
        else:
            reason, message = run.waiting
            status["state"] = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        return status

    def _write_run_status(self, run: Run) -> None:
        container = self._container_status(run)
        status: Obj = {
            "hostIP": LOCAL_IP,
            "hostIPs": [{"ip": LOCAL_IP}],
            "podIP": LOCAL_IP,
            "podIPs": [{"ip": LOCAL_IP}],
            "startTime": run.start_time,
            "containerStatuses": [container],
            "reason": None,
            "message": None,
        }
        unready = f"containers with unready status: [{run.container_name}]"
        conditions = [pod_condition("PodScheduled", "True"), pod_condition("Initialized", "True")]
        if run.finished:
            status |= {"phase": run.phase, **run.final}
            conditions += [
                pod_condition("ContainersReady", "False", "PodCompleted"),
                pod_condition("Ready", "False", "PodCompleted"),
            ]
        elif container["ready"]:
            status["phase"] = "Running"
            conditions += [pod_condition("ContainersReady", "True"), pod_condition("Ready", "True")]
        else:
            status["phase"] = "Pending"
            conditions += [
                pod_condition("ContainersReady", "False", "ContainersNotReady", unready),
                pod_condition("Ready", "False", "ContainersNotReady", unready),
            ]
        payload = {"status": status, "conditions": conditions}
        if payload == run.written:
            return
        if self._write_pod_status(run.namespace, run.name, run.uid, status, conditions):
            run.written = copy.deepcopy(payload)

    def _write_pod_status(self, namespace: str, name: str, uid: str, status: Obj, conditions: list[Obj]) -> bool:
        """Merge-patch the status of that pod (that uid) and merge ``conditions`` by type.

        Runs as one step on the emulator's loop, so a concurrent change (another condition, a
        new pod of the same name) is never lost or overwritten. False if the pod is gone.
        """
        emulator = self.api.emulator

        def write() -> bool:
            current = emulator.get_object("v1", "Pod", name, namespace)
            if current is None or current["metadata"]["uid"] != uid:
                return False
            patch = dict(status)
            if conditions:
                existing = (current.get("status") or {}).get("conditions") or []
                patch["conditions"] = merge_conditions(existing, conditions)
            emulator.patch_object("v1", "Pod", name, {"status": patch}, namespace, subresource="status")
            return True

        return self.api.call(write)

    def _pod_url(self, namespace: str, name: str) -> str:
        return f"{self.api.url}/api/v1/namespaces/{namespace}/pods/{name}"

    def _delete(self, namespace: str, name: str, uid: str, grace: int | None = None) -> None:
        """DELETE that pod (that uid only); a pod already gone or replaced is fine."""
        options: Obj = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}
        if grace is not None:
            options["gracePeriodSeconds"] = grace
        response = requests.delete(self._pod_url(namespace, name), json=options, timeout=30)
        if response.status_code not in (200, 202, 404, 409):
            raise RuntimeError(f"deleting pod {namespace}/{name}: {response.status_code} {response.text}")

    def _force_delete(self, namespace: str, name: str, uid: str) -> None:
        """What a kubelet sends once a deleted pod's containers are gone: ``gracePeriodSeconds=0``."""
        self._delete(namespace, name, uid, grace=0)
