""":class:`LocalKubelet`: the node itself — its lifecycle, the polling loop that schedules
(binds) and admits pods and syncs each one, the Node object, and introspection for tests.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal as signals
import subprocess
import threading
import time
import traceback
import weakref
from pathlib import Path

import requests

from tests.harness.kubelet.faults import FaultInjection
from tests.harness.kubelet.runs import (
    DEFAULT_SCHEDULER,
    GPU_RESOURCE,
    LOCAL_IP,
    Obj,
    Run,
    Stop,
    gpu_request,
    node_arch,
    node_matches,
    now_rfc3339,
    pod_condition,
)

logger = logging.getLogger(__name__)


_LIVE_KUBELETS: weakref.WeakSet[LocalKubelet] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - a safety net for interpreters that exit mid-test
    for kubelet in list(_LIVE_KUBELETS):
        kubelet._kill_all()


class LocalKubelet(FaultInjection):
    """Scheduler plus kubelet for one emulated node, running pods as local process groups.

    Start it with :meth:`start` (or ``with LocalKubelet(...) as kubelet:``) and stop it with
    :meth:`stop`, which SIGKILLs every process group it started. ``workdir`` receives one
    directory per pod (``<namespace>/<pod>/``; a later pod of the same name gets ``<pod>.2``...)
    with its volumes, log and termination message file.
    """

    def start(self) -> LocalKubelet:
        """Register the Node and start polling; returns ``self``."""
        if self._thread is not None:
            raise RuntimeError("the kubelet is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._register_node()
        _LIVE_KUBELETS.add(self)
        self._thread = threading.Thread(target=self._loop, name=f"local-kubelet-{self.node_name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling, SIGKILL every process group this kubelet started and reap them.

        Pod statuses are left as they were (a stopped kubelet reports nothing more).
        """
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._kill_all()
        _LIVE_KUBELETS.discard(self)

    def __enter__(self) -> LocalKubelet:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _kill_all(self) -> None:
        # Without the lock if the polling thread hangs with it: killing is more important.
        locked = self._lock.acquire(timeout=5)
        try:
            for run in list(self._runs.values()):
                if run.proc is not None and run.proc.returncode is None:
                    self._signal(run, signals.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        run.proc.wait(10)
        finally:
            if locked:
                self._lock.release()

    @property
    def processes(self) -> dict[tuple[str, str], int]:
        """PIDs (= process group ids) of the running pods, by (namespace, name)."""
        with self._lock:
            return {
                (run.namespace, run.name): run.proc.pid
                for run in self._runs.values()
                if run.proc is not None and run.proc.returncode is None
            }

    def pod_dir(self, namespace: str, name: str) -> Path:
        """The host directory of the latest pod of that name (its working directory)."""
        return self._find(namespace, name).directory

    def logs(self, namespace: str, name: str) -> str:
        """stdout and stderr of the latest pod of that name (empty until it started)."""
        path = self._find(namespace, name).log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tails(self, chars: int = 3000) -> dict[str, str]:
        """The last ``chars`` of every pod's log, keyed ``namespace/name#uid-prefix`` (for failure reports)."""
        with self._lock:
            runs = list(self._runs.values())
        tails = {}
        for run in runs:
            path = run.log_path
            text = path.read_text(errors="replace")[-chars:] if path.exists() else ""
            tails[f"{run.namespace}/{run.name}#{run.uid[:8]}"] = text
        return tails

    def wait_for_phase(self, namespace: str, name: str, phase: str, timeout: float = 10.0) -> Obj:
        """Poll the API until the pod has ``status.phase == phase``; returns the pod.

        Raises ``TimeoutError`` with the pod's status and log tail otherwise.
        """
        deadline = time.monotonic() + timeout
        pod: Obj | None = None
        while time.monotonic() < deadline:
            pod = self.api.get("v1", "Pod", name, namespace)
            if pod is not None and (pod.get("status") or {}).get("phase") == phase:
                return pod
            time.sleep(self.poll_interval / 2)
        status = None if pod is None else pod.get("status")
        try:
            tail = self.logs(namespace, name)[-2000:]
        except LookupError:
            tail = "(never admitted by the kubelet)"
        raise TimeoutError(f"pod {namespace}/{name} not {phase} after {timeout}s; status: {status}\nlog tail:\n{tail}")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                with self._lock:
                    if not self._stopping.is_set():
                        self._tick()
            except Exception:
                formatted = traceback.format_exc()
                logger.error("local kubelet: %s", formatted)
                if len(self.errors) < 100 and formatted not in self.errors:
                    self.errors.append(formatted)
            self._wake.wait(self.poll_interval)

    def _tick(self) -> None:
        seen: set[str] = set()
        for pod in self.api.list("v1", "Pod"):
            meta, spec = pod["metadata"], pod.get("spec") or {}
            node = spec.get("nodeName")
            if node and node != self.node_name:
                continue  # another node's pod
            if not node and spec.get("schedulerName", DEFAULT_SCHEDULER) != DEFAULT_SCHEDULER:
                continue  # another scheduler's pod
            uid = meta["uid"]
            seen.add(uid)
            run = self._runs.get(uid)
            if run is not None and run.cut_off:
                continue
            if run is None:
                run = self._admit(pod)
                if run is None:
                    continue
            run.pod = pod
            self._sync(run)
        for uid, run in list(self._runs.items()):
            if uid not in seen and not run.gone and not run.cut_off:
                self._pod_gone(run)
        self._unschedulable = {uid: m for uid, m in self._unschedulable.items() if uid in seen}
        for run in list(self._runs.values()):
            if run.running and not run.cut_off:
                self._check_process(run)

    def _free_gpus(self) -> int:
        return self.gpus - sum(run.gpus for run in self._runs.values() if not run.finished)

    def _admit(self, pod: Obj) -> Run | None:
        """Schedule (or, for a pod bound to this node, admit) a new pod; ``None`` if not now."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        namespace, name, uid = meta.get("namespace", "default"), meta["name"], meta["uid"]
        bound = spec.get("nodeName") == self.node_name
        if meta.get("deletionTimestamp"):
            if bound and not meta.get("finalizers"):
                self._force_delete(namespace, name, uid)  # never ran here: nothing to stop
            return None
        if ((pod.get("status") or {}).get("phase") or "Pending") != "Pending":
            return None
        gpus = gpu_request(spec)
        matches = node_matches(spec, self.node_name, self.node_labels)
        fits = gpus <= self._free_gpus()
        if not bound and not (matches and fits):
            problem = (
                "1 node(s) didn't match Pod's node affinity/selector."
                if not matches
                else f"1 Insufficient {GPU_RESOURCE}."
            )
            message = f"0/1 nodes are available: {problem}"
            if self._unschedulable.get(uid) != message:
                condition = pod_condition("PodScheduled", "False", "Unschedulable", message)
                if self._write_pod_status(namespace, name, uid, {"phase": "Pending"}, [condition]):
                    self._unschedulable[uid] = message
            return None
        run = Run(namespace, name, uid, pod, gpus, self._new_pod_dir(namespace, name), now_rfc3339())
        self._runs[uid] = run
        self._unschedulable.pop(uid, None)
        if not bound:
            self._bind(run)
        elif not matches:  # what a kubelet does with a pod bound to it that it must not run
            run.gpus = 0
            self._finish(
                run,
                exit_code=None,
                reason="NodeAffinity",
                message="Pod was rejected: Predicate NodeAffinity failed: node(s) didn't match Pod's node "
                "affinity/selector",
            )
        elif not fits:
            used = self.gpus - self._free_gpus() - gpus
            run.gpus = 0
            self._finish(
                run,
                exit_code=None,
                reason=f"OutOf{GPU_RESOURCE}",
                message=f"Pod was rejected: Node didn't have enough resource: {GPU_RESOURCE}, requested: {gpus}, "
                f"used: {used}, capacity: {self.gpus}",
            )
        return run

    def _bind(self, run: Run) -> None:
        """``POST pods/<name>/binding`` to set ``spec.nodeName``, as a scheduler does.

        On a server without the subresource (404 without a name) the binding lives in the
        kubelet (and in ``PodScheduled=True``) only, and is not tried again.
        """
        if not self._binding_supported:
            return
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": run.name, "namespace": run.namespace, "uid": run.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        response = requests.post(f"{self._pod_url(run.namespace, run.name)}/binding", json=body, timeout=30)
        if response.status_code == 404 and not (response.json().get("details") or {}).get("name"):
            self._binding_supported = False  # no such subresource (the pod itself would be named)

    def _new_pod_dir(self, namespace: str, name: str) -> Path:
        base = self.workdir / namespace / name
        taken = {run.directory for run in self._runs.values()}
        candidate, n = base, 1
        while candidate in taken or candidate.exists():
            n += 1
            candidate = base.with_name(f"{name}.{n}")
        candidate.mkdir(parents=True)
        return candidate

    def _sync(self, run: Run) -> None:
        meta = run.pod["metadata"]
        if run.finished:
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                self._force_delete(run.namespace, run.name, run.uid)
            return
        if meta.get("deletionTimestamp") and (run.stop is None or run.stop.kind == "crash"):
            self._begin_stop(run, Stop("delete"))
            if run.finished:
                return
        if run.stop is None and run.proc is None:
            self._try_start(run)
        self._write_run_status(run)

    def _pod_gone(self, run: Run) -> None:
        """The pod object disappeared: stop its process (nothing left to report to)."""
        run.gone = True
        if not run.finished and (run.stop is None or run.stop.kind == "crash"):
            self._begin_stop(run, Stop("delete"))

    def _register_node(self) -> None:
        capacity = {"cpu": str(os.cpu_count() or 1), "pods": "110", GPU_RESOURCE: str(self.gpus)}
        now = now_rfc3339()
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": dict(self.node_labels)},
            "spec": {},
            "status": {
                "capacity": capacity,
                "allocatable": dict(capacity),
                "addresses": [
                    {"type": "InternalIP", "address": LOCAL_IP},
                    {"type": "Hostname", "address": self.node_name},
                ],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "nodeInfo": {"kubeletVersion": "local", "operatingSystem": "linux", "architecture": node_arch()},
            },
        }
        self.api.put(node)
