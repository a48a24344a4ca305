"""Fault injection from any thread: crash or OOM-kill a pod, preempt or evict it, lose the node,
or cut a pod's node off for good; each waits until the outcome is written.
"""

from __future__ import annotations

import contextlib
import signal as signals
import subprocess
import time
from typing import Literal

from tests.harness.kubelet.containers import ContainerRunner
from tests.harness.kubelet.runs import DEFAULT_SCHEDULER, Obj, Run, Stop, pod_condition


class FaultInjection(ContainerRunner):
    """What tests do to pods that a cluster would do to them."""

    def kill(
        self,
        namespace: str,
        name: str,
        *,
        signal: int = signals.SIGKILL,
        oom: bool = False,
        timeout: float = 10.0,
    ) -> Obj:
        """Crash a running pod: ``signal`` to its process group, as the OOM killer with ``oom``.

        Waits until the status is written (``Failed``, exit code 128 + signal, reason
        ``OOMKilled`` with ``oom``, else ``Error``) and returns the container's terminated state.
        """
        with self._lock:
            run = self._find(namespace, name)
            if not run.running:
                raise LookupError(f"pod {namespace}/{name} has no running process on {self.node_name}")
            run.stop = Stop("crash", oom=oom)
            self._signal(run, signal)
        self._wake.set()
        self._await(run, timeout)
        assert run.terminated is not None
        return dict(run.terminated)

    def evict(
        self,
        namespace: str,
        name: str,
        *,
        reason: Literal["Preempted", "Evicted"] = "Preempted",
        delete: bool = True,
        message: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Preempt or evict a pod as Kubernetes does, and wait until it is done.

        Adds the ``DisruptionTarget=True`` condition (reason ``PreemptionByScheduler`` or
        ``EvictionByEvictionAPI``), sends SIGTERM, SIGKILL after the grace period
        (``spec.terminationGracePeriodSeconds``, at most ``max_grace_seconds``), writes
        ``phase: Failed`` with ``status.reason`` = ``reason`` and a message, then (``delete``)
        deletes the pod and waits until it is gone.
        """
        if reason not in ("Preempted", "Evicted"):
            raise ValueError(f"reason must be 'Preempted' or 'Evicted', not {reason!r}")
        if reason == "Preempted":
            condition = pod_condition(
                "DisruptionTarget",
                "True",
                "PreemptionByScheduler",
                f"{DEFAULT_SCHEDULER}: preempting to accommodate a higher priority pod",
            )
            message = message or "Preempted to accommodate a higher priority pod"
        else:
            condition = pod_condition("DisruptionTarget", "True", "EvictionByEvictionAPI", "Eviction API: evicting")
            message = message or "Evicted by the Eviction API"
        with self._lock:
            run = self._find(namespace, name)
            if run.finished:
                raise LookupError(f"pod {namespace}/{name} is not active on {self.node_name}")
            self._write_pod_status(namespace, name, run.uid, {}, [condition])
            self._begin_stop(run, Stop("evict", reason=reason, message=message, delete=delete))
        self._wake.set()
        if timeout is None:
            timeout = self.max_grace_seconds + 10
        self._await(run, timeout)
        if delete:
            self._await_gone(run, timeout)

    def lose_node(self, *, delete: bool = False, timeout: float = 10.0) -> list[tuple[str, str]]:
        """The node is lost: every pod on it is SIGKILLed and reported ``Failed``/``NodeLost``.

        Each gets ``DisruptionTarget=True`` (reason ``DeletionByTaintManager``) and a container
        in state ``terminated`` with reason ``ContainerStatusUnknown`` (exit code 137); with
        ``delete`` the pods are then force-deleted, as the pod garbage collector does. The node
        comes back at once (as if replaced): later pods run again. Returns the pods it had.
        """
        with self._lock:
            runs = [run for run in self._runs.values() if not run.finished]
            for run in runs:
                stop = Stop(
                    "node-lost",
                    reason="NodeLost",
                    message=f"Node {self.node_name} which was running pod {run.name} is unresponsive",
                    delete=delete,
                )
                run.stop = stop
                if run.running:
                    self._signal(run, signals.SIGKILL)
                else:
                    self._finish(run, exit_code=None)
        self._wake.set()
        for run in runs:
            self._await(run, timeout)
            if delete:
                self._await_gone(run, timeout)
        return [(run.namespace, run.name) for run in runs]

    def cut_off(self, namespace: str, name: str) -> None:
        """The pod's node stops answering for good: the pod's processes die with it, and nothing
        more is reported about the pod, not even its deletion. Once deleted, the pod stays
        ``Terminating`` (with ``deletionTimestamp``, still ``Running``) until force-deleted, as
        on a real cluster whose node is gone without its Node object being removed."""
        with self._lock:
            run = self._find(namespace, name)
            run.cut_off = True
            run.gpus = 0  # this test node stays usable for other pods
            if run.proc is not None and run.proc.returncode is None:
                self._signal(run, signals.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    run.proc.wait(10)

    def _find(self, namespace: str, name: str) -> Run:
        with self._lock:
            for run in reversed(list(self._runs.values())):
                if run.namespace == namespace and run.name == name:
                    return run
        raise LookupError(f"pod {namespace}/{name} was never admitted to {self.node_name}")

    def _await(self, run: Run, timeout: float) -> None:
        if not run.done.wait(timeout):
            raise TimeoutError(f"pod {run.namespace}/{run.name} did not finish within {timeout}s")

    def _await_gone(self, run: Run, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod = self.api.get("v1", "Pod", run.name, run.namespace)
            if pod is None or pod["metadata"]["uid"] != run.uid:
                return
            time.sleep(self.poll_interval / 2)
        raise TimeoutError(f"pod {run.namespace}/{run.name} was not deleted within {timeout}s")
