"""Running a pod's container as a local process group: volumes as host directories, the
environment (``env``, ``envFrom``, field references), argv rewriting of container paths,
image-pull failures, and stopping (SIGTERM, the grace period, SIGKILL of every process of the pod).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import signal as signals
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from tests.harness.kubelet.runs import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_TERMINATION_MESSAGE_PATH,
    IMAGE_PULL_BACKOFF_AFTER,
    LOCAL_IP,
    MISSING_IMAGE_MARKER,
    POD_MARKER_ENV,
    TERMINATION_LOG_ENV,
    NotReady,
    Obj,
    Run,
    Stop,
    now_rfc3339,
)
from tests.harness.kubelet.status import PodReporter

logger = logging.getLogger(__name__)


_PYTHON_NAME = re.compile(r"python(3(\.\d+)?)?")


_VAR_REF = re.compile(r"\$\$|\$\(([^)]*)\)")


_LABEL_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


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


class ContainerRunner(PodReporter):
    """Starting, watching and stopping a pod's process group."""

    def _try_start(self, run: Run) -> None:
        container = run.container
        try:
            mounts = self._prepare_volumes(run, container)
            image = str(container.get("image") or "")
            if MISSING_IMAGE_MARKER in image:
                self._pull_failed(run, image)
                return
            env = self._container_env(run, container)
            argv = self._argv(container, env, mounts)
        except NotReady as exc:
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
            run.started_at = now_rfc3339()
            run.terminated = {"exitCode": 128, "reason": "StartError", "message": f"failed to start {argv[0]}: {exc}"}
            self._finish(run, exit_code=None)
            return
        run.started_at = now_rfc3339()
        logger.info("local kubelet: started %s/%s as pid %d: %s", run.namespace, run.name, run.proc.pid, argv)

    def _pull_failed(self, run: Run, image: str) -> None:
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
            raise NotReady(reason, f'{kind.lower()} "{name}" not found')
        return self._data(obj)

    def _prepare_volumes(self, run: Run, container: Obj) -> list[tuple[str, Path]]:
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
                except NotReady as exc:
                    raise NotReady(exc.reason, f'MountVolume.SetUp failed for volume "{name}" : {exc}') from None
                host.mkdir(parents=True, exist_ok=True)
                files = {k: k for k in data or {}}
                if data is not None and source.get("items"):
                    files = {}
                    for item in source["items"]:
                        if item["key"] not in data:
                            raise NotReady(
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
                raise NotReady("CreateContainerConfigError", f"volume {mount.get('name')!r} not found")
            if mount.get("subPath"):
                host = host / str(mount["subPath"])
                if not host.exists():
                    host.mkdir(parents=True)
            mounts.append((str(mount["mountPath"]).rstrip("/") or "/", host))
        message_path = str(container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH)
        mounts.append((message_path, run.termination_path))
        mounts = [(path, host) for path, host in mounts if path != "/"]
        return sorted(mounts, key=lambda item: len(item[0]), reverse=True)

    def _container_env(self, run: Run, container: Obj) -> dict[str, str]:
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
                        raise NotReady(
                            error, f"couldn't find key {ref.get('key')} in {kind} {run.namespace}/{ref.get('name')}"
                        )
                    env[name] = data[ref["key"]].decode(errors="replace")
                    break
            else:
                if "fieldRef" in value_from:
                    env[name] = self._field_value(run, str(value_from["fieldRef"].get("fieldPath")))
                else:
                    raise NotReady(
                        error,
                        f"env {name}: the local kubelet supports value, secretKeyRef, configMapKeyRef and fieldRef",
                    )
        return env

    def _field_value(self, run: Run, path: str) -> str:
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
        raise NotReady("CreateContainerConfigError", f"fieldRef {path!r} is not supported by the local kubelet")

    def _argv(self, container: Obj, env: Mapping[str, str], mounts: list[tuple[str, Path]]) -> list[str]:
        command = [str(a) for a in container.get("command") or []]
        if not command:
            raise NotReady(
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
        self, run: Run, container: Obj, env: Mapping[str, str], mounts: list[tuple[str, Path]]
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

    def _grace(self, run: Run) -> float:
        meta, spec = run.pod["metadata"], run.pod.get("spec") or {}
        grace = meta.get("deletionGracePeriodSeconds") if meta.get("deletionTimestamp") else None
        if not grace:  # None, or the 0 the emulator records for a deletion held by finalizers
            grace = spec.get("terminationGracePeriodSeconds")
            if grace is None:
                grace = DEFAULT_GRACE_SECONDS
        return max(0.0, min(float(grace), self.max_grace_seconds))

    def _begin_stop(self, run: Run, stop: Stop) -> None:
        """SIGTERM now and SIGKILL after the grace period; a pod without a process ends at once."""
        run.stop = stop
        if run.running:
            self._signal(run, signals.SIGTERM)
            run.kill_at = time.monotonic() + self._grace(run)
        else:
            self._finish(run, exit_code=None)

    @staticmethod
    def _signal(run: Run, sig: int) -> None:
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

    def _check_process(self, run: Run) -> None:
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
