"""What the local kubelet keeps of each pod (:class:`Run`, why it is stopping: :class:`Stop`),
its conventions (constants), and the pure scheduling rules: GPU requests, node selectors
and node affinity, pod conditions.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

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


StopKind = Literal["delete", "crash", "evict", "node-lost"]


def now_rfc3339() -> str:
    """RFC 3339 at second precision with a ``Z``, like ``metav1.Time``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_arch() -> str:
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


class NotReady(Exception):
    """The container cannot start yet: its waiting ``reason`` and ``message``; retried each poll."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message


@dataclass(eq=False)
class Stop:
    """Why the kubelet is ending a pod's process, and what to report when it is gone."""

    kind: StopKind
    reason: str | None = None  # status.reason (evict, node-lost)
    message: str | None = None  # status.message
    oom: bool = False
    delete: bool = False  # delete the pod afterwards (evict, node-lost)


@dataclass(eq=False)
class Run:
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
    stop: Stop | None = None
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


def pod_condition(kind: str, status: str, reason: str | None = None, message: str | None = None) -> Obj:
    condition: Obj = {"type": kind, "status": status}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def merge_conditions(existing: list[Obj], desired: list[Obj]) -> list[Obj]:
    """``existing`` with ``desired`` merged in by type; ``lastTransitionTime`` moves only on a flip."""
    now = now_rfc3339()
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
