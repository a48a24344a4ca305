"""A local kubelet for the Kubernetes API emulator: every pod runs as a local subprocess.

There is no cluster in tests, so nothing runs the pods an operator creates. :class:`LocalKubelet`
plays scheduler and kubelet for one emulated node: a background thread polls the emulator
(:mod:`tests.harness.k8s`) for pods, schedules them against the node's labels and GPUs, runs
the first container of each as a process group on this machine and writes the pod status
back as a real kubelet would (phases, conditions, container states, exit codes, termination
messages), so an operator under test sees real pod lifecycles. Tests inject faults from any
thread: :meth:`LocalKubelet.kill` (a crash or an OOM kill), :meth:`LocalKubelet.evict`
(preemption or eviction) and :meth:`LocalKubelet.lose_node`.

Conventions (see tests/README.md, "The local kubelet"):

- An image whose name contains ``does-not-exist`` cannot be pulled (``ErrImagePull``, then
  ``ImagePullBackOff``); any other image "exists", and the container's ``command`` runs on
  this machine, with ``python``/``python3`` as argv[0] replaced by the kubelet's Python.
- Container paths become host paths under ``workdir/<namespace>/<pod>/``: every argv item and
  env value equal to a ``mountPath`` or below one (also as the value of ``--flag=value``) is
  rewritten. The termination message file is a host file whose path the process gets in
  ``TUNELOOP_TERMINATION_LOG`` (the one Tuneloop convention here: the trainer honours it).
- The process starts from a clean environment: ``PATH`` of this machine, ``HOME`` (the pod's
  directory), ``HOSTNAME``, the pod's env, ``TUNELOOP_TERMINATION_LOG``, then ``env_overrides``.

Everything touches the emulator through :class:`tests.harness.k8s_fixtures.K8sApi` (calls that
run briefly on the emulator's loop) or plain HTTP; no call waits on the loop for long.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import copy
import datetime
import logging
import os
import platform
import re
import signal as signals
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import requests

if TYPE_CHECKING:
    from tests.harness.k8s_fixtures import K8sApi

__all__ = [
    "GPU_RESOURCE",
    "MISSING_IMAGE_MARKER",
    "TERMINATION_LOG_ENV",
    "LocalKubelet",
]

logger = logging.getLogger(__name__)

Obj = dict[str, Any]

#: The extended resource the scheduler counts (``resources.limits``, else ``requests``).
GPU_RESOURCE: Final = "nvidia.com/gpu"
#: An image whose name contains this cannot be pulled.
MISSING_IMAGE_MARKER: Final = "does-not-exist"
#: The env variable holding the host path of the container's termination message file.
TERMINATION_LOG_ENV: Final = "TUNELOOP_TERMINATION_LOG"
#: Every process of a pod inherits this variable (the pod's uid): the stand-in for its PID namespace.
POD_MARKER_ENV: Final = "TUNELOOP_LOCAL_KUBELET_POD"
#: What the real kubelet keeps of a termination message file, and of the log as a fallback.
MAX_TERMINATION_MESSAGE_BYTES: Final = 4096
FALLBACK_LOG_LINES: Final = 80
FALLBACK_LOG_BYTES: Final = 2048
#: ``spec.terminationGracePeriodSeconds`` when the pod does not say.
DEFAULT_GRACE_SECONDS: Final = 30
#: How long a missing image shows ``ErrImagePull`` before it settles on ``ImagePullBackOff``.
IMAGE_PULL_BACKOFF_AFTER: Final = 0.1
DEFAULT_SCHEDULER: Final = "default-scheduler"
DEFAULT_TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
#: The pod and host IP every pod gets: processes share this machine's network.
LOCAL_IP: Final = "127.0.0.1"

_PYTHON_NAME = re.compile(r"python(3(\.\d+)?)?")
_VAR_REF = re.compile(r"\$\$|\$\(([^)]*)\)")
_LABEL_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")

StopKind = Literal["delete", "crash", "evict", "node-lost"]


def _now() -> str:
    """RFC 3339 at second precision with a ``Z``, like ``metav1.Time``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _quantity(value: Any) -> int:
    """A whole-number quantity such as ``"2"`` (extended resources like GPUs take no fractions)."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def gpu_request(spec: Mapping[str, Any]) -> int:
    """GPUs a pod needs: the sum over its containers, or the largest init container if more."""

    def amount(container: Mapping[str, Any]) -> int:
        resources = container.get("resources") or {}
        limits = resources.get("limits") or {}
        requests_ = resources.get("requests") or {}
        return _quantity(limits.get(GPU_RESOURCE, requests_.get(GPU_RESOURCE, 0)))

    containers = sum(amount(c) for c in spec.get("containers") or [])
    init = max((amount(c) for c in spec.get("initContainers") or []), default=0)
    return max(containers, init)


def _match_expression(expression: Mapping[str, Any], value: str | None) -> bool:
    operator = expression.get("operator")
    values = [str(v) for v in expression.get("values") or []]
    match operator:
        case "In":
            return value is not None and value in values
        case "NotIn":
            return value is None or value not in values
        case "Exists":
            return value is not None
        case "DoesNotExist":
            return value is None
        case "Gt" | "Lt":
            try:
                number, bound = int(value or ""), int(values[0])
            except (ValueError, IndexError):
                return False
            return number > bound if operator == "Gt" else number < bound
    return False


def node_matches(spec: Mapping[str, Any], node_name: str, labels: Mapping[str, str]) -> bool:
    """``spec.nodeSelector`` and the required node affinity against a node's labels."""
    for key, value in (spec.get("nodeSelector") or {}).items():
        if labels.get(key) != str(value):
            return False
    required = (
        ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
        or {}
    ).get("nodeSelectorTerms")
    if not required:
        return True
    fields = {"metadata.name": node_name}
    for term in required:  # terms are ORed, the requirements of a term ANDed
        expressions = term.get("matchExpressions") or []
        field_expressions = term.get("matchFields") or []
        if not expressions and not field_expressions:
            continue  # an empty term matches nothing
        if all(_match_expression(e, labels.get(e.get("key", ""))) for e in expressions) and all(
            _match_expression(e, fields.get(e.get("key", ""))) for e in field_expressions
        ):
            return True
    return False


def expand_var_refs(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known variables are replaced, ``$$`` is a literal ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(replace, value)


def rewrite_path(value: str, mounts: list[tuple[str, Path]]) -> str:
    """``value`` with a container path (a mount or below one) made a host path.

    ``mounts`` is (mountPath, host path), longest mountPath first. ``--flag=/mount/x`` is
    rewritten in its value part.
    """
    for container_path, host_path in mounts:
        if value == container_path:
            return str(host_path)
        if value.startswith(container_path + "/"):
            return str(host_path) + value[len(container_path) :]
    key, sep, rest = value.partition("=")
    if sep and rest.startswith("/"):
        rewritten = rewrite_path(rest, mounts)
        if rewritten != rest:
            return f"{key}={rewritten}"
    return value


def pod_processes(uid: str) -> list[int]:
    """PIDs of the live processes that inherited the pod's marker (``/proc/<pid>/environ``)."""
    marker = f"{POD_MARKER_ENV}={uid}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


#: A cluster DNS name of a Service or of a pod behind a headless Service (``a.b.ns.svc``).
_CLUSTER_DNS = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?\.?$")


def resolve_cluster_dns(value: str) -> str:
    """``value`` with a cluster DNS name (whole, or after ``--flag=``) replaced by 127.0.0.1.

    Every pod of this node runs on this host, so every Service and pod name resolves here: the
    local kubelet's stand-in for cluster DNS (it does not check that the Service exists).
    """
    if _CLUSTER_DNS.match(value):
        return "127.0.0.1"
    key, sep, rest = value.partition("=")
    if sep and _CLUSTER_DNS.match(rest):
        return f"{key}=127.0.0.1"
    return value


class _NotReady(Exception):
    """The container cannot start yet: its waiting ``reason`` and ``message``; retried each poll."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message


@dataclass(eq=False)
class _Stop:
    """Why the kubelet is ending a pod's process, and what to report when it is gone."""

    kind: StopKind
    reason: str | None = None  # status.reason (evict, node-lost)
    message: str | None = None  # status.message
    oom: bool = False
    delete: bool = False  # delete the pod afterwards (evict, node-lost)


@dataclass(eq=False)
class _Run:
    """One pod (one uid) admitted to this node, from scheduling to its final status."""

    namespace: str
    name: str
    uid: str
    pod: Obj  # as last seen
    gpus: int
    directory: Path
    start_time: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    waiting: tuple[str, str | None] = ("ContainerCreating", None)
    pull_failed_at: float | None = None
    stop: _Stop | None = None
    kill_at: float | None = None  # time.monotonic() at which the group gets SIGKILL
    finished: bool = False
    phase: str = "Pending"
    final: Obj = field(default_factory=dict)  # status.reason/message of a finished pod
    terminated: Obj | None = None  # the container's terminated state
    gone: bool = False  # the pod object is deleted
    cut_off: bool = False  # its node no longer answers: nothing is reported about it any more
    written: Obj | None = None  # the last status written
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def container(self) -> Obj:
        containers = (self.pod.get("spec") or {}).get("containers") or [{}]
        return dict(containers[0])

    @property
    def container_name(self) -> str:
        return str(self.container.get("name") or "container")

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.container_name}.log"

    @property
    def termination_path(self) -> Path:
        return self.directory / f"{self.container_name}.termination-log"

    @property
    def running(self) -> bool:
        return self.proc is not None and not self.finished


_LIVE_KUBELETS: weakref.WeakSet[LocalKubelet] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - a safety net for interpreters that exit mid-test
    for kubelet in list(_LIVE_KUBELETS):
        kubelet._kill_all()


class LocalKubelet:
    """Scheduler plus kubelet for one emulated node, running pods as local process groups.

    Start it with :meth:`start` (or ``with LocalKubelet(...) as kubelet:``) and stop it with
    :meth:`stop`, which SIGKILLs every process group it started. ``workdir`` receives one
    directory per pod (``<namespace>/<pod>/``; a later pod of the same name gets ``<pod>.2``...)
    with its volumes, log and termination message file.
    """

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
            "kubernetes.io/arch": _arch(),
            **(node_labels or {}),
        }
        self.gpus = gpus
        self.env_overrides = dict(env_overrides or {})
        self.python = python
        self.max_grace_seconds = max_grace_seconds
        self.poll_interval = poll_interval
        #: Unexpected exceptions of the polling thread (formatted); the fixture fails a test on any.
        self.errors: list[str] = []
        self._runs: dict[str, _Run] = {}  # by pod uid, in admission order
        self._unschedulable: dict[str, str] = {}  # pod uid -> the message last written
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._binding_supported = True

    # ---- lifecycle ---------------------------------------------------------------------------

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

    # ---- introspection -----------------------------------------------------------------------

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

    # ---- fault injection ---------------------------------------------------------------------

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
            run.stop = _Stop("crash", oom=oom)
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
            condition = _condition(
                "DisruptionTarget",
                "True",
                "PreemptionByScheduler",
                f"{DEFAULT_SCHEDULER}: preempting to accommodate a higher priority pod",
            )
            message = message or "Preempted to accommodate a higher priority pod"
        else:
            condition = _condition("DisruptionTarget", "True", "EvictionByEvictionAPI", "Eviction API: evicting")
            message = message or "Evicted by the Eviction API"
        with self._lock:
            run = self._find(namespace, name)
            if run.finished:
                raise LookupError(f"pod {namespace}/{name} is not active on {self.node_name}")
            self._write_pod_status(namespace, name, run.uid, {}, [condition])
            self._begin_stop(run, _Stop("evict", reason=reason, message=message, delete=delete))
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
                stop = _Stop(
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

    def _find(self, namespace: str, name: str) -> _Run:
        with self._lock:
            for run in reversed(list(self._runs.values())):
                if run.namespace == namespace and run.name == name:
                    return run
        raise LookupError(f"pod {namespace}/{name} was never admitted to {self.node_name}")

    def _await(self, run: _Run, timeout: float) -> None:
        if not run.done.wait(timeout):
            raise TimeoutError(f"pod {run.namespace}/{run.name} did not finish within {timeout}s")

    def _await_gone(self, run: _Run, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod = self.api.get("v1", "Pod", run.name, run.namespace)
            if pod is None or pod["metadata"]["uid"] != run.uid:
                return
            time.sleep(self.poll_interval / 2)
        raise TimeoutError(f"pod {run.namespace}/{run.name} was not deleted within {timeout}s")

    # ---- the polling loop --------------------------------------------------------------------

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

    # ---- scheduling and admission ------------------------------------------------------------

    def _free_gpus(self) -> int:
        return self.gpus - sum(run.gpus for run in self._runs.values() if not run.finished)

    def _admit(self, pod: Obj) -> _Run | None:
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
                condition = _condition("PodScheduled", "False", "Unschedulable", message)
                if self._write_pod_status(namespace, name, uid, {"phase": "Pending"}, [condition]):
                    self._unschedulable[uid] = message
            return None
        run = _Run(namespace, name, uid, pod, gpus, self._new_pod_dir(namespace, name), _now())
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

    def _bind(self, run: _Run) -> None:
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

    # ---- syncing one pod ---------------------------------------------------------------------

    def _sync(self, run: _Run) -> None:
        meta = run.pod["metadata"]
        if run.finished:
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                self._force_delete(run.namespace, run.name, run.uid)
            return
        if meta.get("deletionTimestamp") and (run.stop is None or run.stop.kind == "crash"):
            self._begin_stop(run, _Stop("delete"))
            if run.finished:
                return
        if run.stop is None and run.proc is None:
            self._try_start(run)
        self._write_run_status(run)

    def _pod_gone(self, run: _Run) -> None:
        """The pod object disappeared: stop its process (nothing left to report to)."""
        run.gone = True
        if not run.finished and (run.stop is None or run.stop.kind == "crash"):
            self._begin_stop(run, _Stop("delete"))

    def _grace(self, run: _Run) -> float:
        meta, spec = run.pod["metadata"], run.pod.get("spec") or {}
        grace = meta.get("deletionGracePeriodSeconds") if meta.get("deletionTimestamp") else None
        if not grace:  # None, or the 0 the emulator records for a deletion held by finalizers
            grace = spec.get("terminationGracePeriodSeconds")
            if grace is None:
                grace = DEFAULT_GRACE_SECONDS
        return max(0.0, min(float(grace), self.max_grace_seconds))

    def _begin_stop(self, run: _Run, stop: _Stop) -> None:
        """SIGTERM now and SIGKILL after the grace period; a pod without a process ends at once."""
        run.stop = stop
        if run.running:
            self._signal(run, signals.SIGTERM)
            run.kill_at = time.monotonic() + self._grace(run)
        else:
            self._finish(run, exit_code=None)

    @staticmethod
    def _signal(run: _Run, sig: int) -> None:
        """Signal the pod's process group; SIGKILL also reaches every process the pod started.

        A container's processes live in its PID namespace, and a SIGKILL of the container (or the
        end of its main process) ends all of them, including those that started a session of
        their own (torchrun runs each worker with ``start_new_session``). Here the pod's
        processes are found by the marker every one of them inherits in its environment.
        SIGTERM goes to the group only, as the runtime sends it to the main process alone.
        """
        assert run.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.proc.pid, sig)
        if sig == signals.SIGKILL:
            for pid in pod_processes(run.uid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signals.SIGKILL)

    def _check_process(self, run: _Run) -> None:
        assert run.proc is not None
        try:
            exited = os.waitid(os.P_PID, run.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:  # reaped elsewhere
            exited = run.proc.poll() is not None
        if not exited:
            if run.kill_at is not None and time.monotonic() >= run.kill_at:
                self._signal(run, signals.SIGKILL)
                run.kill_at = None
            return
        # The main process is gone (still a zombie, so its pid is still the group's id): the
        # container stops, and whatever it left behind in the group goes with it.
        self._signal(run, signals.SIGKILL)
        code = run.proc.wait()
        self._finish(run, exit_code=128 - code if code < 0 else code)

    # ---- starting a container ----------------------------------------------------------------

    def _try_start(self, run: _Run) -> None:
        container = run.container
        try:
            mounts = self._prepare_volumes(run, container)
            image = str(container.get("image") or "")
            if MISSING_IMAGE_MARKER in image:
                self._pull_failed(run, image)
                return
            env = self._container_env(run, container)
            argv = self._argv(container, env, mounts)
        except _NotReady as exc:
            run.waiting = (exc.reason, exc.message)
            return
        run.termination_path.write_bytes(b"")
        full_env = self._process_env(run, container, env, mounts)
        working_dir = rewrite_path(str(container.get("workingDir") or ""), mounts)
        cwd = Path(working_dir) if working_dir.startswith(str(run.directory)) else run.directory
        cwd.mkdir(parents=True, exist_ok=True)
        try:
            with run.log_path.open("ab") as log:
                run.proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:  # e.g. no such executable: the runtime's StartError
            run.started_at = _now()
            run.terminated = {"exitCode": 128, "reason": "StartError", "message": f"failed to start {argv[0]}: {exc}"}
            self._finish(run, exit_code=None)
            return
        run.started_at = _now()
        logger.info("local kubelet: started %s/%s as pid %d: %s", run.namespace, run.name, run.proc.pid, argv)

    def _pull_failed(self, run: _Run, image: str) -> None:
        now = time.monotonic()
        if run.pull_failed_at is None:
            run.pull_failed_at = now
        if now - run.pull_failed_at < IMAGE_PULL_BACKOFF_AFTER:
            run.waiting = (
                "ErrImagePull",
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to resolve '
                f'reference "{image}": {image}: not found',
            )
        else:
            run.waiting = ("ImagePullBackOff", f'Back-off pulling image "{image}"')

    def _get(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self.api.get("v1", kind, name, namespace)

    @staticmethod
    def _data(obj: Obj) -> dict[str, bytes]:
        """The contents of a ConfigMap (``data``, ``binaryData``) or Secret (``data``, ``stringData``)."""
        if obj.get("kind") == "Secret":
            values = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            values |= {k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()}
            return values
        values = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        values |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
        return values

    def _source(self, kind: str, namespace: str, name: str, *, optional: bool, reason: str) -> dict[str, bytes] | None:
        obj = self._get(kind, namespace, name)
        if obj is None:
            if optional:
                return None
            raise _NotReady(reason, f'{kind.lower()} "{name}" not found')
        return self._data(obj)

    def _prepare_volumes(self, run: _Run, container: Obj) -> list[tuple[str, Path]]:
        """Make each volume's host directory; return (container path, host path), longest first."""
        hosts: dict[str, Path] = {}
        for volume in (run.pod.get("spec") or {}).get("volumes") or []:
            name = str(volume["name"])
            host = run.directory / "volumes" / name
            if "configMap" in volume or "secret" in volume:
                source = volume.get("configMap") or volume.get("secret") or {}
                kind = "ConfigMap" if "configMap" in volume else "Secret"
                ref = str(source.get("name") if kind == "ConfigMap" else source.get("secretName"))
                try:
                    data = self._source(
                        kind, run.namespace, ref, optional=bool(source.get("optional")), reason="ContainerCreating"
                    )
                except _NotReady as exc:
                    raise _NotReady(exc.reason, f'MountVolume.SetUp failed for volume "{name}" : {exc}') from None
                host.mkdir(parents=True, exist_ok=True)
                files = {k: k for k in data or {}}
                if data is not None and source.get("items"):
                    files = {}
                    for item in source["items"]:
                        if item["key"] not in data:
                            raise _NotReady(
                                "ContainerCreating",
                                f'MountVolume.SetUp failed for volume "{name}" : configmap references non-existent '
                                f"config key: {item['key']}",
                            )
                        files[item["key"]] = item["path"]
                for key, relative in files.items():
                    target = host / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes((data or {})[key])
            elif "persistentVolumeClaim" in volume:  # shared by every pod of the claim
                host = self.workdir / ".pvc" / run.namespace / str(volume["persistentVolumeClaim"]["claimName"])
                host.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in volume:  # the node's filesystem, kept inside the workdir
                host = self.workdir / ".host" / str(volume["hostPath"]["path"]).lstrip("/")
                host.mkdir(parents=True, exist_ok=True)
            else:  # emptyDir, and any other kind: an empty directory
                host.mkdir(parents=True, exist_ok=True)
            hosts[name] = host
        mounts: list[tuple[str, Path]] = []
        for mount in container.get("volumeMounts") or []:
            host = hosts.get(str(mount.get("name")))
            if host is None:
                raise _NotReady("CreateContainerConfigError", f"volume {mount.get('name')!r} not found")
            if mount.get("subPath"):
                host = host / str(mount["subPath"])
                if not host.exists():
                    host.mkdir(parents=True)
            mounts.append((str(mount["mountPath"]).rstrip("/") or "/", host))
        message_path = str(container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH)
        mounts.append((message_path, run.termination_path))
        mounts = [(path, host) for path, host in mounts if path != "/"]
        return sorted(mounts, key=lambda item: len(item[0]), reverse=True)

    def _container_env(self, run: _Run, container: Obj) -> dict[str, str]:
        """The container's env as Kubernetes resolves it (``envFrom``, then ``env`` in order)."""
        env: dict[str, str] = {}
        error = "CreateContainerConfigError"
        for source in container.get("envFrom") or []:
            kind, ref = (
                ("ConfigMap", source["configMapRef"])
                if "configMapRef" in source
                else ("Secret", source.get("secretRef") or {})
            )
            data = self._source(
                kind, run.namespace, str(ref.get("name")), optional=bool(ref.get("optional")), reason=error
            )
            for key, value in (data or {}).items():
                env[str(source.get("prefix") or "") + key] = value.decode(errors="replace")
        for var in container.get("env") or []:
            name = str(var["name"])
            if "valueFrom" not in var:
                env[name] = expand_var_refs(str(var.get("value") or ""), env)
                continue
            value_from = var["valueFrom"]
            for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if key in value_from:
                    ref = value_from[key]
                    optional = bool(ref.get("optional"))
                    data = self._source(kind, run.namespace, str(ref.get("name")), optional=optional, reason=error)
                    if data is None:
                        break
                    if ref.get("key") not in data:
                        if optional:
                            break
                        raise _NotReady(
                            error, f"couldn't find key {ref.get('key')} in {kind} {run.namespace}/{ref.get('name')}"
                        )
                    env[name] = data[ref["key"]].decode(errors="replace")
                    break
            else:
                if "fieldRef" in value_from:
                    env[name] = self._field_value(run, str(value_from["fieldRef"].get("fieldPath")))
                else:
                    raise _NotReady(
                        error,
                        f"env {name}: the local kubelet supports value, secretKeyRef, configMapKeyRef and fieldRef",
                    )
        return env

    def _field_value(self, run: _Run, path: str) -> str:
        meta, spec = run.pod["metadata"], run.pod.get("spec") or {}
        simple = {
            "metadata.name": run.name,
            "metadata.namespace": run.namespace,
            "metadata.uid": run.uid,
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": str(spec.get("serviceAccountName") or "default"),
            "status.podIP": LOCAL_IP,
            "status.podIPs": LOCAL_IP,
            "status.hostIP": LOCAL_IP,
            "status.hostIPs": LOCAL_IP,
        }
        if path in simple:
            return simple[path]
        match = _LABEL_FIELD.fullmatch(path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        raise _NotReady("CreateContainerConfigError", f"fieldRef {path!r} is not supported by the local kubelet")

    def _argv(self, container: Obj, env: Mapping[str, str], mounts: list[tuple[str, Path]]) -> list[str]:
        command = [str(a) for a in container.get("command") or []]
        if not command:
            raise _NotReady(
                "CreateContainerError",
                "the container has no command (the local kubelet cannot run an image's entrypoint)",
            )
        argv = [
            resolve_cluster_dns(rewrite_path(expand_var_refs(a, env), mounts))
            for a in [*command, *(container.get("args") or [])]
        ]
        if _PYTHON_NAME.fullmatch(Path(argv[0]).name):
            argv[0] = self.python
        return argv

    def _process_env(
        self, run: _Run, container: Obj, env: Mapping[str, str], mounts: list[tuple[str, Path]]
    ) -> dict[str, str]:
        spec = run.pod.get("spec") or {}
        full = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(run.directory),
            "HOSTNAME": str(spec.get("hostname") or run.name),
        }
        full |= {key: resolve_cluster_dns(rewrite_path(value, mounts)) for key, value in env.items()}
        tmp = dict(mounts).get("/tmp")
        if tmp is not None and "TMPDIR" not in env:
            full["TMPDIR"] = str(tmp)
        full[TERMINATION_LOG_ENV] = str(run.termination_path)
        full |= self.env_overrides
        full[POD_MARKER_ENV] = run.uid
        return full

    # ---- finishing ---------------------------------------------------------------------------

    def _termination_message(self, run: _Run, exit_code: int) -> str:
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
        self, run: _Run, *, exit_code: int | None, reason: str | None = None, message: str | None = None
    ) -> None:
        """Record how the pod ended, write its final status and (if asked) delete it."""
        stop = run.stop
        now = _now()
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
            condition = _condition(
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

    # ---- writing status ----------------------------------------------------------------------

    def _container_status(self, run: _Run) -> Obj:
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

    def _write_run_status(self, run: _Run) -> None:
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
        conditions = [_condition("PodScheduled", "True"), _condition("Initialized", "True")]
        if run.finished:
            status |= {"phase": run.phase, **run.final}
            conditions += [
                _condition("ContainersReady", "False", "PodCompleted"),
                _condition("Ready", "False", "PodCompleted"),
            ]
        elif container["ready"]:
            status["phase"] = "Running"
            conditions += [_condition("ContainersReady", "True"), _condition("Ready", "True")]
        else:
            status["phase"] = "Pending"
            conditions += [
                _condition("ContainersReady", "False", "ContainersNotReady", unready),
                _condition("Ready", "False", "ContainersNotReady", unready),
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
                patch["conditions"] = _merge_conditions(existing, conditions)
            emulator.patch_object("v1", "Pod", name, {"status": patch}, namespace, subresource="status")
            return True

        return self.api.call(write)

    # ---- deleting ----------------------------------------------------------------------------

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

    # ---- the Node object ---------------------------------------------------------------------

    def _register_node(self) -> None:
        capacity = {"cpu": str(os.cpu_count() or 1), "pods": "110", GPU_RESOURCE: str(self.gpus)}
        now = _now()
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
                "nodeInfo": {"kubeletVersion": "local", "operatingSystem": "linux", "architecture": _arch()},
            },
        }
        self.api.put(node)


def _condition(kind: str, status: str, reason: str | None = None, message: str | None = None) -> Obj:
    condition: Obj = {"type": kind, "status": status}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def _merge_conditions(existing: list[Obj], desired: list[Obj]) -> list[Obj]:
    """``existing`` with ``desired`` merged in by type; ``lastTransitionTime`` moves only on a flip."""
    now = _now()
    merged = [dict(c) for c in existing]
    for condition in desired:
        index = next((i for i, c in enumerate(merged) if c.get("type") == condition["type"]), None)
        old = merged[index] if index is not None else None
        new = dict(condition)
        keep = old is not None and old.get("status") == condition["status"] and old.get("lastTransitionTime")
        new["lastTransitionTime"] = old["lastTransitionTime"] if keep and old is not None else now
        if index is None:
            merged.append(new)
        else:
            merged[index] = new
    return merged
