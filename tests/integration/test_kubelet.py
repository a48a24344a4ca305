"""The local kubelet runs the emulator's pods as local processes and reports like a kubelet.

Every pod runs ``python -c`` (no trainer, no torch), so each test takes well under a second
or two; grace periods are kept short where a test waits for one.
"""

from __future__ import annotations

import base64
import json
import os
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

from tests.harness.k8s_fixtures import K8sApi
from tests.harness.kubelet import TERMINATION_LOG_ENV, LocalKubelet

pytestmark = pytest.mark.integration

PODS = "/api/v1/namespaces/default/pods"

# A process that reports its SIGTERM in a file (exit 143, like a shell), says it is ready, then waits.
SIGTERM_AWARE = """
import pathlib, signal, sys, time
def on_term(signum, frame):
    pathlib.Path("got-sigterm").write_text("yes")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
pathlib.Path("ready").write_text("yes")
time.sleep(60)
"""


def python_pod(
    name: str,
    code: str,
    *,
    args: list[str] | None = None,
    container: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    main: dict[str, Any] = {
        "name": "main",
        "image": "python:3.11-slim",
        "command": ["python", "-c", textwrap.dedent(code), *(args or [])],
        **(container or {}),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"restartPolicy": "Never", "containers": [main], **(spec or {})},
    }


def container_state(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["status"]["containerStatuses"][0]["state"])


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in pod["status"].get("conditions") or [] if c["type"] == kind), None)


def waiting_reason(k8s_api: K8sApi, name: str) -> str | None:
    pod = k8s_api.get("v1", "Pod", name)
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None


def history(k8s_api: K8sApi, resource_version: str, name: str) -> list[tuple[str, dict[str, Any]]]:
    """Every watch event of that pod after ``resource_version`` (a replay of the event log)."""
    events = k8s_api.watch(PODS, timeout=0.2, resourceVersion=resource_version, fieldSelector=f"metadata.name={name}")
    return [(e["type"], e["object"]) for e in events]


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def wait_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared", pytrace=False)
        time.sleep(0.02)
    return path.read_text()


@pytest.fixture
def graceful_deletion(k8s_api: K8sApi) -> Iterator[None]:
    """The emulator's opt-in: a pod bound to a node stays Terminating until the kubelet deletes it."""
    k8s_api.call(setattr, k8s_api.emulator, "graceful_pod_deletion", True)
    try:
        yield
    finally:
        k8s_api.call(setattr, k8s_api.emulator, "graceful_pod_deletion", False)


# ---- exit codes and termination messages -----------------------------------------------------


def test_exit_0_succeeds_with_the_termination_message(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    code = f"""
    import os, pathlib
    print("working")
    pathlib.Path(os.environ["{TERMINATION_LOG_ENV}"]).write_text('{{"result": "ok"}}')
    """
    created = k8s_api.create(python_pod("ok", code, container={"terminationMessagePath": "/dev/termination-log"}))
    pod = local_kubelet.wait_for_phase("default", "ok", "Succeeded")

    terminated = container_state(pod)["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert terminated["message"] == '{"result": "ok"}'
    assert terminated["startedAt"] <= terminated["finishedAt"]
    assert pod["status"]["startTime"]
    assert condition(pod, "PodScheduled") == {"type": "PodScheduled", "status": "True", "lastTransitionTime": ANY}
    assert condition(pod, "Ready")["reason"] == "PodCompleted"  # type: ignore[index]
    assert local_kubelet.logs("default", "ok") == "working\n"
    # On the way: Running, with the container ready and started.
    running = [p for _, p in history(k8s_api, created["metadata"]["resourceVersion"], "ok")]
    running = [p for p in running if p["status"].get("phase") == "Running"]
    assert running, "the pod was never reported Running"
    status = running[0]["status"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "PodScheduled": "True",
        "Initialized": "True",
        "ContainersReady": "True",
        "Ready": "True",
    }
    container = status["containerStatuses"][0]
    assert container["name"] == "main"
    assert container["image"] == "python:3.11-slim"
    assert container["ready"] is True
    assert container["restartCount"] == 0
    assert container["state"]["running"]["startedAt"]


def test_exit_3_fails_with_the_log_tail_as_message(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    code = """
    import sys
    for i in range(100):
        print(f"line {i}")
    sys.stdout.flush()
    print("boom", file=sys.stderr)
    sys.exit(3)
    """
    k8s_api.create(python_pod("bad", code, container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    pod = local_kubelet.wait_for_phase("default", "bad", "Failed")

    terminated = container_state(pod)["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    # The last 80 lines of the log (stdout and stderr together), like the real kubelet.
    assert terminated["message"].splitlines() == [f"line {i}" for i in range(21, 100)] + ["boom"]
    assert "line 0\n" in local_kubelet.logs("default", "bad")


def test_failure_without_fallback_has_no_message(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    k8s_api.create(python_pod("plain", "print('x'); raise SystemExit(1)"))
    pod = local_kubelet.wait_for_phase("default", "plain", "Failed")
    assert "message" not in container_state(pod)["terminated"]


# ---- volumes and env ---------------------------------------------------------------------------


def test_env_from_secret_and_configmap_mount_with_rewritten_paths(
    k8s_api: K8sApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEAKED_FROM_THE_TEST", "1")
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "data": {"token": base64.b64encode(b"s3cr3t").decode()},
        }
    )
    k8s_api.create(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"job.json": '{"lr": 0.1}'}}
    )
    code = f"""
    import json, os, pathlib, sys
    report = {{
        "argv": sys.argv[1:],
        "config": pathlib.Path(sys.argv[1]).read_text(),
        "config_via_env": pathlib.Path(os.environ["CONFIG"]).read_text(),
        "flag": sys.argv[2],
        "token": os.environ["TOKEN"],
        "level": os.environ["LEVEL"],
        "pod": os.environ["POD_NAME"],
        "ns": os.environ["POD_NAMESPACE"],
        "expanded": os.environ["EXPANDED"],
        "scratch_writable": pathlib.Path(os.environ["SCRATCH"]).is_dir(),
        "home": os.environ["HOME"],
        "cwd": os.getcwd(),
        "leaked": "LEAKED_FROM_THE_TEST" in os.environ,
        "override": os.environ.get("OVERRIDDEN"),
        "metrics_port": os.environ.get("TUNELOOP_METRICS_PORT"),
    }}
    pathlib.Path(os.environ["{TERMINATION_LOG_ENV}"]).write_text(json.dumps(report))
    """
    pod = python_pod(
        "env",
        code,
        args=["/etc/app/job.json", "--out=/scratch/out"],
        container={
            "env": [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "job.json"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "EXPANDED", "value": "$(POD_NAME)-x"},
                {"name": "CONFIG", "value": "/etc/app/job.json"},
                {"name": "SCRATCH", "value": "/scratch"},
                {"name": "OVERRIDDEN", "value": "from-pod"},
                {"name": "TUNELOOP_METRICS_PORT", "value": "9400"},
            ],
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/app", "readOnly": True},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        },
        spec={"volumes": [{"name": "config", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}]},
    )
    k8s_api.create(pod)
    overrides = {"OVERRIDDEN": "from-test", "TUNELOOP_METRICS_PORT": ""}
    with LocalKubelet(k8s_api, tmp_path / "kubelet", env_overrides=overrides) as kubelet:
        done = kubelet.wait_for_phase("default", "env", "Succeeded")
        pod_dir = kubelet.pod_dir("default", "env")
    report = json.loads(container_state(done)["terminated"]["message"])

    config_file = str(pod_dir / "volumes" / "config" / "job.json")
    assert pod_dir == tmp_path / "kubelet" / "default" / "env"
    assert report["argv"] == [config_file, f"--out={pod_dir / 'volumes' / 'scratch' / 'out'}"]
    assert report["config"] == report["config_via_env"] == '{"lr": 0.1}'
    assert report["token"] == "s3cr3t"
    assert report["level"] == '{"lr": 0.1}'
    assert (report["pod"], report["ns"], report["expanded"]) == ("env", "default", "env-x")
    assert report["scratch_writable"] is True
    assert report["home"] == report["cwd"] == str(pod_dir)
    assert report["leaked"] is False
    assert report["override"] == "from-test"
    assert report["metrics_port"] == ""


def test_missing_secret_is_a_config_error_until_it_exists(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]
    code = f"import os, pathlib; pathlib.Path(os.environ['{TERMINATION_LOG_ENV}']).write_text(os.environ['TOKEN'])"
    k8s_api.create(python_pod("needs-secret", code, container={"env": env}))

    k8s_api.wait_for(lambda: waiting_reason(k8s_api, "needs-secret") == "CreateContainerConfigError")
    pod = k8s_api.get("v1", "Pod", "needs-secret")
    assert pod is not None
    assert pod["status"]["phase"] == "Pending"
    assert container_state(pod)["waiting"]["message"] == 'secret "creds" not found'
    assert local_kubelet.processes == {}

    k8s_api.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"other": "x"}})
    message = "couldn't find key token in Secret default/creds"
    k8s_api.wait_for(
        lambda: (
            container_state(k8s_api.get("v1", "Pod", "needs-secret") or {}).get("waiting", {}).get("message") == message
        )
    )

    k8s_api.patch("v1", "Secret", "creds", {"data": {"token": base64.b64encode(b"late").decode()}})
    done = local_kubelet.wait_for_phase("default", "needs-secret", "Succeeded")
    assert container_state(done)["terminated"]["message"] == "late"


def test_missing_configmap_volume_keeps_the_pod_creating(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    pod = python_pod(
        "needs-cm",
        "import pathlib, sys; print(pathlib.Path(sys.argv[1]).read_text())",
        args=["/etc/cfg/k"],
        container={"volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]},
        spec={"volumes": [{"name": "cfg", "configMap": {"name": "later"}}]},
    )
    k8s_api.create(pod)
    k8s_api.wait_for(lambda: waiting_reason(k8s_api, "needs-cm") == "ContainerCreating")
    waiting = container_state(k8s_api.get("v1", "Pod", "needs-cm") or {})["waiting"]
    assert waiting["message"] == 'MountVolume.SetUp failed for volume "cfg" : configmap "later" not found'

    k8s_api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "later"}, "data": {"k": "v"}})
    local_kubelet.wait_for_phase("default", "needs-cm", "Succeeded")
    assert local_kubelet.logs("default", "needs-cm") == "v\n"


# ---- scheduling and images -------------------------------------------------------------------


def test_unschedulable_pods_stay_pending(k8s_api: K8sApi, tmp_path: Path) -> None:
    selector = python_pod("wrong-node", "pass", spec={"nodeSelector": {"accelerator": "h100"}})
    greedy = python_pod("greedy", "pass", container={"resources": {"limits": {"nvidia.com/gpu": "3"}}})
    fits = python_pod("fits", "pass", container={"resources": {"limits": {"nvidia.com/gpu": "2"}}})
    for pod in (selector, greedy, fits):
        k8s_api.create(pod)
    with LocalKubelet(k8s_api, tmp_path, node_labels={"accelerator": "a100"}, gpus=2) as kubelet:
        kubelet.wait_for_phase("default", "fits", "Succeeded")
        for name, problem in [
            ("wrong-node", "1 node(s) didn't match Pod's node affinity/selector."),
            ("greedy", "1 Insufficient nvidia.com/gpu."),
        ]:
            pod = k8s_api.wait_for(
                lambda name=name: condition(k8s_api.get("v1", "Pod", name) or {"status": {}}, "PodScheduled")
            )
            assert pod == {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": f"0/1 nodes are available: {problem}",
                "lastTransitionTime": ANY,
            }
            assert (k8s_api.get("v1", "Pod", name) or {})["status"]["phase"] == "Pending"
        # The pod that fits was bound to the node through pods/binding, as a scheduler does.
        fits_pod = k8s_api.get("v1", "Pod", "fits") or {}
        assert fits_pod["spec"]["nodeName"] == "local-node"
        assert (condition(fits_pod, "PodScheduled") or {}).get("status") == "True"
        for name in ("wrong-node", "greedy"):
            assert "nodeName" not in (k8s_api.get("v1", "Pod", name) or {})["spec"]


def test_gpus_are_freed_when_a_pod_ends(k8s_api: K8sApi, tmp_path: Path) -> None:
    gpus = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    k8s_api.create(python_pod("first", "import time; time.sleep(0.5)", container=gpus))
    with LocalKubelet(k8s_api, tmp_path, gpus=1) as kubelet:
        kubelet.wait_for_phase("default", "first", "Running")
        k8s_api.create(python_pod("second", "pass", container=gpus))
        k8s_api.wait_for(lambda: condition(k8s_api.get("v1", "Pod", "second") or {"status": {}}, "PodScheduled"))
        scheduled = condition(k8s_api.get("v1", "Pod", "second") or {}, "PodScheduled")
        assert scheduled is not None
        assert scheduled["reason"] == "Unschedulable"
        kubelet.wait_for_phase("default", "second", "Succeeded")
        assert condition(k8s_api.get("v1", "Pod", "second") or {}, "PodScheduled")["status"] == "True"  # type: ignore[index]


def test_a_missing_image_backs_off(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    created = k8s_api.create(python_pod("no-image", "pass", container={"image": "registry.local/does-not-exist:1"}))
    k8s_api.wait_for(lambda: waiting_reason(k8s_api, "no-image") == "ImagePullBackOff")
    pod = k8s_api.get("v1", "Pod", "no-image")
    assert pod is not None
    assert pod["status"]["phase"] == "Pending"
    assert container_state(pod)["waiting"]["message"] == 'Back-off pulling image "registry.local/does-not-exist:1"'
    reasons = [
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
        for _, p in history(k8s_api, created["metadata"]["resourceVersion"], "no-image")
        if p["status"].get("containerStatuses")
    ]
    assert reasons == ["ErrImagePull", "ImagePullBackOff"]
    assert local_kubelet.processes == {}


def test_pods_of_other_nodes_are_left_alone(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    k8s_api.create(python_pod("elsewhere", "pass", spec={"nodeName": "other-node"}))
    k8s_api.create(python_pod("here", "pass", spec={"nodeName": "local-node"}))
    local_kubelet.wait_for_phase("default", "here", "Succeeded")
    assert k8s_api.get("v1", "Pod", "elsewhere")["status"] == {"phase": "Pending"}  # type: ignore[index]


def test_a_pod_bound_to_the_node_that_does_not_match_is_rejected(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    k8s_api.create(python_pod("rejected", "pass", spec={"nodeName": "local-node", "nodeSelector": {"x": "y"}}))
    pod = local_kubelet.wait_for_phase("default", "rejected", "Failed")
    assert pod["status"]["reason"] == "NodeAffinity"
    assert local_kubelet.processes == {}


# ---- fault injection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "condition_reason"), [("Evicted", "EvictionByEvictionAPI"), ("Preempted", "PreemptionByScheduler")]
)
def test_evict_terminates_gracefully_and_deletes(
    k8s_api: K8sApi, local_kubelet: LocalKubelet, reason: str, condition_reason: str
) -> None:
    created = k8s_api.create(python_pod("victim", SIGTERM_AWARE))
    local_kubelet.wait_for_phase("default", "victim", "Running")
    pod_dir = local_kubelet.pod_dir("default", "victim")
    wait_file(pod_dir / "ready")

    local_kubelet.evict("default", "victim", reason=reason)  # type: ignore[arg-type]

    assert k8s_api.get("v1", "Pod", "victim") is None
    assert (pod_dir / "got-sigterm").read_text() == "yes"
    assert local_kubelet.processes == {}
    events = history(k8s_api, created["metadata"]["resourceVersion"], "victim")
    assert events[-1][0] == "DELETED"
    failed = next(p for _, p in events if p["status"].get("phase") == "Failed")
    assert failed["status"]["reason"] == reason
    assert failed["status"]["message"]
    assert container_state(failed)["terminated"]["exitCode"] == 143
    disruption = condition(failed, "DisruptionTarget")
    assert disruption is not None
    assert (disruption["status"], disruption["reason"]) == ("True", condition_reason)


def test_evict_without_delete_keeps_the_failed_pod(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    k8s_api.create(python_pod("kept", "import time; time.sleep(60)", spec={"terminationGracePeriodSeconds": 1}))
    local_kubelet.wait_for_phase("default", "kept", "Running")
    started = time.monotonic()
    local_kubelet.evict("default", "kept", reason="Evicted", delete=False)
    pod = k8s_api.get("v1", "Pod", "kept")
    assert pod is not None
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] == "Evicted"
    # Python's default SIGTERM action ends it at once: 128 + 15.
    assert container_state(pod)["terminated"]["exitCode"] == 143
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(("oom", "reason"), [(False, "Error"), (True, "OOMKilled")])
def test_kill_crashes_the_pod(k8s_api: K8sApi, local_kubelet: LocalKubelet, oom: bool, reason: str) -> None:
    k8s_api.create(python_pod("crash", "import time; time.sleep(60)"))
    local_kubelet.wait_for_phase("default", "crash", "Running")
    pid = local_kubelet.processes["default", "crash"]

    terminated = local_kubelet.kill("default", "crash", oom=oom)

    assert (terminated["exitCode"], terminated["reason"]) == (137, reason)
    pod = k8s_api.get("v1", "Pod", "crash")
    assert pod is not None
    assert pod["status"]["phase"] == "Failed"
    assert container_state(pod)["terminated"]["exitCode"] == 137
    assert not alive(pid)


def test_lose_node_fails_every_pod(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    for name in ("a", "b"):
        k8s_api.create(python_pod(name, "import time; time.sleep(60)"))
        local_kubelet.wait_for_phase("default", name, "Running")
    pids = list(local_kubelet.processes.values())

    assert sorted(local_kubelet.lose_node()) == [("default", "a"), ("default", "b")]

    for name in ("a", "b"):
        pod = k8s_api.get("v1", "Pod", name)
        assert pod is not None
        assert (pod["status"]["phase"], pod["status"]["reason"]) == ("Failed", "NodeLost")
        assert container_state(pod)["terminated"]["reason"] == "ContainerStatusUnknown"
        assert condition(pod, "DisruptionTarget")["status"] == "True"  # type: ignore[index]
    assert not any(alive(pid) for pid in pids)
    # The node is back at once: new pods run.
    k8s_api.create(python_pod("after", "pass"))
    local_kubelet.wait_for_phase("default", "after", "Succeeded")
    local_kubelet.lose_node(delete=True)  # nothing left to lose


def test_lose_node_with_delete_removes_the_pods(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    k8s_api.create(python_pod("gone", "import time; time.sleep(60)"))
    local_kubelet.wait_for_phase("default", "gone", "Running")
    local_kubelet.lose_node(delete=True)
    assert k8s_api.get("v1", "Pod", "gone") is None


# ---- deletion ----------------------------------------------------------------------------------


def test_deleting_a_running_pod_stops_its_process(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    k8s_api.create(python_pod("doomed", SIGTERM_AWARE))
    local_kubelet.wait_for_phase("default", "doomed", "Running")
    pod_dir = local_kubelet.pod_dir("default", "doomed")
    wait_file(pod_dir / "ready")

    k8s_api.delete("v1", "Pod", "doomed")  # the emulator removes it at once (no graceful deletion)

    assert wait_file(pod_dir / "got-sigterm") == "yes"
    k8s_api.wait_for(lambda: not local_kubelet.processes)


def test_sigkill_after_the_grace_period(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    code = """
    import pathlib, signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pathlib.Path("ready").write_text("yes")
    time.sleep(60)
    """
    k8s_api.create(python_pod("stubborn", code, spec={"terminationGracePeriodSeconds": 1}))
    local_kubelet.wait_for_phase("default", "stubborn", "Running")
    wait_file(local_kubelet.pod_dir("default", "stubborn") / "ready")
    pid = local_kubelet.processes["default", "stubborn"]
    started = time.monotonic()
    k8s_api.delete("v1", "Pod", "stubborn")
    k8s_api.wait_for(lambda: not alive(pid), timeout=5)
    assert 0.9 < time.monotonic() - started < 3


@pytest.mark.usefixtures("graceful_deletion")
def test_graceful_pod_deletion_reports_then_deletes(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    # Only a pod bound to a node is deleted gracefully by the emulator: the kubelet binds it.
    k8s_api.create(python_pod("graceful", SIGTERM_AWARE))
    local_kubelet.wait_for_phase("default", "graceful", "Running")
    pod_dir = local_kubelet.pod_dir("default", "graceful")
    wait_file(pod_dir / "ready")

    deleting = k8s_api.delete("v1", "Pod", "graceful")
    # Terminating until the kubelet is done; the timestamp is when the grace period ends.
    deadline = datetime.fromisoformat(deleting["metadata"]["deletionTimestamp"].replace("Z", "+00:00"))
    grace = deleting["metadata"]["deletionGracePeriodSeconds"]
    assert grace > 0 and abs((deadline - datetime.now(UTC)).total_seconds() - grace) < 3

    k8s_api.wait_for(lambda: k8s_api.get("v1", "Pod", "graceful") is None)
    assert (pod_dir / "got-sigterm").read_text() == "yes"
    events = history(k8s_api, deleting["metadata"]["resourceVersion"], "graceful")
    assert [kind for kind, _ in events][-1] == "DELETED"
    final = events[-1][1]
    assert final["status"]["phase"] == "Failed"
    assert container_state(final)["terminated"]["exitCode"] == 143


# ---- stopping ----------------------------------------------------------------------------------


def test_stop_leaves_no_process_alive(k8s_api: K8sApi, tmp_path: Path) -> None:
    code = """
    import pathlib, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pathlib.Path("child.pid").write_text(str(child.pid))
    time.sleep(60)
    """
    k8s_api.create(python_pod("parent", code))
    kubelet = LocalKubelet(k8s_api, tmp_path).start()
    try:
        kubelet.wait_for_phase("default", "parent", "Running")
        child = int(wait_file(kubelet.pod_dir("default", "parent") / "child.pid"))
        parent = kubelet.processes["default", "parent"]
        assert alive(parent)
        assert alive(child)
    finally:
        kubelet.stop()
    assert kubelet.processes == {}
    assert not alive(parent)
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:  # SIGKILLed; reaped by init
        time.sleep(0.02)
    assert not alive(child)
    assert kubelet.errors == []


# torchrun starts each worker with a session of its own; in a container they still die with it.
@pytest.mark.parametrize("own_session", [False, True], ids=["same-group", "own-session"])
def test_leftover_children_die_with_the_main_process(
    k8s_api: K8sApi, local_kubelet: LocalKubelet, own_session: bool
) -> None:
    code = f"""
    import pathlib, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session={own_session})
    pathlib.Path("child.pid").write_text(str(child.pid))
    """
    k8s_api.create(python_pod("orphaner", code))
    local_kubelet.wait_for_phase("default", "orphaner", "Succeeded")
    child = int((local_kubelet.pod_dir("default", "orphaner") / "child.pid").read_text())
    k8s_api.wait_for(lambda: not alive(child), timeout=5)


def test_a_killed_pod_takes_its_own_session_children_along(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    code = """
    import pathlib, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    pathlib.Path("child.pid").write_text(str(child.pid))
    time.sleep(60)
    """
    k8s_api.create(python_pod("worker", code))
    local_kubelet.wait_for_phase("default", "worker", "Running")
    child = int(wait_file(local_kubelet.pod_dir("default", "worker") / "child.pid"))
    assert alive(child)

    local_kubelet.kill("default", "worker")

    k8s_api.wait_for(lambda: not alive(child), timeout=5)


def test_termination_log_env_points_at_the_message_file(k8s_api: K8sApi, local_kubelet: LocalKubelet) -> None:
    code = f"import os; print(os.environ['{TERMINATION_LOG_ENV}'])"
    k8s_api.create(python_pod("where", code))
    local_kubelet.wait_for_phase("default", "where", "Succeeded")
    path = Path(local_kubelet.logs("default", "where").strip())
    assert path.parent == local_kubelet.pod_dir("default", "where")
    assert os.path.isfile(path)


def test_the_node_is_registered(k8s_api: K8sApi, tmp_path: Path) -> None:
    with LocalKubelet(k8s_api, tmp_path, node_name="gpu-1", node_labels={"pool": "a100"}, gpus=4):
        node = k8s_api.get("v1", "Node", "gpu-1")
    assert node is not None
    assert node["metadata"]["labels"]["pool"] == "a100"
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == "gpu-1"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert condition(node, "Ready")["status"] == "True"  # type: ignore[index]


def test_cluster_dns_names_resolve_to_this_host() -> None:
    from tests.harness.kubelet import resolve_cluster_dns

    assert resolve_cluster_dns("job-r1-a1-n0.job-r1.ml.svc") == "127.0.0.1"
    assert resolve_cluster_dns("--master-addr=job-r1-a1-n0.job-r1.ml.svc.cluster.local") == "--master-addr=127.0.0.1"
    assert resolve_cluster_dns("s3.amazonaws.com") == "s3.amazonaws.com"
    assert resolve_cluster_dns("--x=/etc/svc") == "--x=/etc/svc"
