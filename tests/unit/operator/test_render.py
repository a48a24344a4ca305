"""Rendering a run into Kubernetes objects: golden files, Pod Security "restricted", the
Kubernetes schema, names, and credentials that only ever travel by Secret reference."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.manifests import minimal_job
from tuneloop.api import FineTuneJob
from tuneloop_operator.render import (
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_NODE_RANK,
    LABEL_RUN,
    MASTER_PORT,
    names,
    render_attempt,
    render_config_map,
    render_pod,
    render_service,
)

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = "1.37.0"
IMAGE = "ghcr.io/tuneloop/trainer:0.1.0"
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}


def owner_of(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": "tuneloop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": job.metadata.name,
        "uid": "0b7f6c1e-5d2a-4c1b-9e3f-1a2b3c4d5e6f",
    }


def single_node_job() -> FineTuneJob:
    m = minimal_job(name="review-sentiment")
    m["metadata"]["namespace"] = "ml"
    m["spec"]["storage"] = {"region": "eu-west-1", "secretRef": {"name": "s3-credentials"}}
    m["spec"]["model"]["secretRef"] = {"name": "hf-token"}
    m["spec"]["resources"] = {"gpus": 1, "cpu": 4, "memory": "16Gi"}
    return FineTuneJob.from_manifest(m)


def two_node_job() -> FineTuneJob:
    m = minimal_job(task="causal-lm", name="assistant-chat")
    m["metadata"]["namespace"] = "ml"
    m["spec"]["storage"] = {"secretRef": {"name": "s3-credentials"}}
    m["spec"]["resources"] = {
        "gpus": 8,
        "nodes": 2,
        "cpu": "96",
        "memory": "900Gi",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "training-high",
        "image": "registry.example.com/tuneloop/trainer:custom",
    }
    return FineTuneJob.from_manifest(m)


def cpu_job() -> FineTuneJob:
    m = minimal_job(name="cpu-job")
    m["spec"]["resources"] = {"gpus": 0}
    return FineTuneJob.from_manifest(m)


# --- golden files ------------------------------------------------------------------------


class GoldenDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's job.json) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


GoldenDumper.add_representer(str, _str)


@pytest.mark.parametrize(
    ("golden", "job_factory"), [("single-node.yaml", single_node_job), ("two-node.yaml", two_node_job)]
)
def test_rendering_matches_golden_file(golden: str, job_factory: Any) -> None:
    job = job_factory()
    objects = render_attempt(job, run=3, attempt=2, image=IMAGE, owner=owner_of(job))
    text = yaml.dump_all(objects, Dumper=GoldenDumper, sort_keys=True, default_flow_style=False)
    assert list(yaml.safe_load_all(text)) == objects
    path = GOLDEN / golden
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"{golden} differs from the rendering; review, then UPDATE_GOLDEN=1"


# --- Pod Security "restricted" -------------------------------------------------------------

# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (restricted, latest)
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
ALLOWED_SECCOMP = {"RuntimeDefault", "Localhost"}
ALLOWED_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def assert_pod_security_restricted(pod: dict[str, Any]) -> None:
    """Each rule of the restricted profile (which includes baseline), on pod and containers."""
    spec = pod["spec"]
    psc = spec.get("securityContext", {})
    # baseline: host namespaces, host ports, hostPath, privileged, capabilities, sysctls, procMount
    for host_field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(host_field, False), host_field
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert len(kinds) == 1, volume
        assert kinds <= RESTRICTED_VOLUME_TYPES, f"volume type {kinds} not allowed"
        assert "hostPath" not in volume
    for sysctl in psc.get("sysctls", []):
        assert sysctl["name"] in ALLOWED_SYSCTLS, sysctl
    assert psc.get("seLinuxOptions", {}).get("type", "") in {"", "container_t", "container_init_t", "container_kvm_t"}
    assert psc.get("appArmorProfile", {}).get("type", "RuntimeDefault") in {"RuntimeDefault", "Localhost"}
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    pod_non_root = psc.get("runAsNonRoot")
    assert psc.get("runAsUser", 1) != 0, "runAsUser 0"
    containers = spec.get("initContainers", []) + spec["containers"] + spec.get("ephemeralContainers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        name = c["name"]
        assert not sc.get("privileged", False), f"{name}: privileged"
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation must be false"
        caps = sc.get("capabilities", {})
        assert "ALL" in caps.get("drop", []), f"{name}: must drop ALL capabilities"
        assert set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{name}: adds capabilities"
        assert sc.get("procMount", "Default") == "Default", f"{name}: procMount"
        assert sc.get("runAsNonRoot", pod_non_root) is True, f"{name}: runAsNonRoot"
        assert sc.get("runAsUser", 1) != 0, f"{name}: runAsUser 0"
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        assert seccomp in ALLOWED_SECCOMP, f"{name}: seccomp {seccomp}"
        for port in c.get("ports", []):
            assert not port.get("hostPort"), f"{name}: hostPort"
        assert sc.get("windowsOptions", {}).get("hostProcess") is not True


def test_pod_security_check_catches_violations() -> None:
    job = single_node_job()
    good = render_pod(job, 1, 1, 0, image=IMAGE, owner=owner_of(job))
    assert_pod_security_restricted(good)
    breakages = [
        lambda p: p["spec"].update(hostNetwork=True),
        lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        lambda p: p["spec"]["containers"][0]["securityContext"].update(privileged=True),
        lambda p: p["spec"]["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda p: p["spec"]["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
        lambda p: p["spec"]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        lambda p: p["spec"]["securityContext"].update(runAsUser=0),
        lambda p: (
            p["spec"]["securityContext"].pop("runAsNonRoot"),
            p["spec"]["containers"][0]["securityContext"].pop("runAsNonRoot"),
        ),
    ]
    for breakage in breakages:
        bad = json.loads(json.dumps(good))
        breakage(bad)
        with pytest.raises(AssertionError):
            assert_pod_security_restricted(bad)


@pytest.mark.parametrize("job_factory", [single_node_job, two_node_job, cpu_job])
def test_pods_pass_pod_security_restricted_and_the_schema(job_factory: Any) -> None:
    job = job_factory()
    for obj in render_attempt(job, run=1, attempt=1, image=IMAGE, owner=owner_of(job)):
        if obj["kind"] == "Pod":
            assert_pod_security_restricted(obj)
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_rendering_without_a_namespace_is_refused() -> None:
    job = cpu_job()
    with pytest.raises(ValueError, match="namespace"):
        render_pod(
            job.model_copy(update={"metadata": job.metadata.model_copy(update={"namespace": None})}),
            1,
            1,
            0,
            image=IMAGE,
            owner=owner_of(job),
        )


# --- the pod's contract with the trainer ---------------------------------------------------


def env_of(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_single_node_pod_runs_the_trainer_with_its_contract() -> None:
    job = single_node_job()
    pod = render_pod(job, 3, 2, 0, image=IMAGE, owner=owner_of(job), metrics_port=9500)
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert c["name"] == "trainer"
    assert c["image"] == IMAGE
    assert c["command"] == ["python", "-m", "tuneloop_trainer", "--config", "/etc/tuneloop/job.json"]
    env = env_of(pod)
    assert env["TUNELOOP_RUN"]["value"] == "3"
    assert env["TUNELOOP_OUTPUT_URI"]["value"] == "s3://model-bucket/out/"
    assert env["TUNELOOP_RUN_URI"]["value"] == "s3://model-bucket/out/runs/3"  # the run's own prefix
    assert env["TUNELOOP_WORK_DIR"]["value"] == "/scratch/work"
    assert env["TUNELOOP_CACHE_DIR"]["value"] == "/scratch/cache"
    assert env["HF_HOME"]["value"] == "/scratch/hf"
    assert env["TUNELOOP_METRICS_PORT"]["value"] == "9500"
    assert env["TUNELOOP_JOB_NAME"]["value"] == "review-sentiment"
    assert {"MASTER_ADDR", "WORLD_SIZE", "NODE_RANK"}.isdisjoint(env)
    assert "hostname" not in spec and "subdomain" not in spec
    assert c["ports"][0] == {"name": "metrics", "containerPort": 9500, "protocol": "TCP"}
    assert c["resources"] == {
        "requests": {"cpu": "4", "memory": "16Gi"},
        "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
    }
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["terminationGracePeriodSeconds"] == 60
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/tuneloop", "readOnly": True}
    assert volumes["config"]["configMap"]["name"] == names("review-sentiment", 3, 2).config_map
    assert volumes["scratch"] == {"name": "scratch", "emptyDir": {}} and mounts["scratch"]["mountPath"] == "/scratch"
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"} and mounts["dshm"]["mountPath"] == "/dev/shm"
    labels = pod["metadata"]["labels"]
    assert labels[LABEL_JOB] == "review-sentiment"
    assert (labels[LABEL_RUN], labels[LABEL_ATTEMPT], labels[LABEL_NODE_RANK]) == ("3", "2", "0")
    assert labels["app.kubernetes.io/managed-by"] == "tuneloop"
    (ref,) = pod["metadata"]["ownerReferences"]
    assert ref["controller"] is True and ref["blockOwnerDeletion"] is True and ref["uid"] == owner_of(job)["uid"]


def test_a_cpu_job_asks_for_no_gpu_and_sets_no_resources() -> None:
    job = cpu_job()
    pod = render_pod(job, 1, 1, 0, image=IMAGE, owner=owner_of(job))
    assert pod["spec"]["containers"][0]["resources"] == {}
    assert not {"AWS_ACCESS_KEY_ID", "HF_TOKEN"} & set(env_of(pod))  # no Secret named: pod identity


def test_two_node_pods_find_pod_zero_through_the_headless_service() -> None:
    job = two_node_job()
    run, attempt = 4, 1
    child = names(job.metadata.name, run, attempt)
    service = render_service(job, run, owner_of(job))
    assert service["metadata"]["name"] == child.service
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"][0]["port"] == MASTER_PORT
    pods = [render_pod(job, run, attempt, rank, image=IMAGE, owner=owner_of(job)) for rank in range(2)]
    pod0 = pods[0]
    expected_master = f"{pod0['spec']['hostname']}.{pod0['spec']['subdomain']}.ml.svc"
    for rank, pod in enumerate(pods):
        env = env_of(pod)
        assert env["MASTER_ADDR"]["value"] == expected_master
        assert env["MASTER_PORT"]["value"] == "29500"
        assert env["WORLD_SIZE"]["value"] == "2"
        assert env["NODE_RANK"]["value"] == str(rank)
        assert pod["spec"]["subdomain"] == service["metadata"]["name"]
        assert pod["spec"]["hostname"] == pod["metadata"]["name"]
        # the Service selects every pod of the run
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        spec = pod["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
        assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert spec["priorityClassName"] == "training-high"
        assert spec["containers"][0]["image"] == "registry.example.com/tuneloop/trainer:custom"
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    with pytest.raises(ValueError, match="out of range"):
        render_pod(job, run, attempt, 2, image=IMAGE, owner=owner_of(job))


def test_distributed_pods_start_one_trainer_per_gpu_through_the_launcher() -> None:
    job = two_node_job()  # 2 nodes x 8 GPUs
    pods = [render_pod(job, 4, 1, rank, image=IMAGE, owner=owner_of(job)) for rank in range(2)]
    master = env_of(pods[0])["MASTER_ADDR"]["value"]
    for rank, pod in enumerate(pods):
        assert pod["spec"]["containers"][0]["command"] == [
            "python",
            "-m",
            "tuneloop_trainer.launch",
            "--nnodes=2",
            "--nproc-per-node=8",
            f"--node-rank={rank}",
            f"--master-addr={master}",
            "--master-port=29500",
            "--max-restarts=0",
            "--shutdown-timeout=55",
            "-m",
            "tuneloop_trainer",
            "--config",
            "/etc/tuneloop/job.json",
        ]
    one_node_four_gpus = FineTuneJob.model_validate(
        single_node_job().model_dump(by_alias=True)
        | {"spec": single_node_job().spec.to_wire() | {"resources": {"gpus": 4}}}
    )
    command = render_pod(one_node_four_gpus, 1, 1, 0, image=IMAGE, owner=owner_of(job))["spec"]["containers"][0][
        "command"
    ]
    assert command[2] == "tuneloop_trainer.launch" and "--nproc-per-node=4" in command
    assert "--master-addr=127.0.0.1" in command


def test_config_map_holds_the_validated_job_and_nothing_else() -> None:
    manifest = minimal_job(name="review-sentiment")
    manifest["metadata"] |= {"labels": {"team": "ml"}, "uid": "abc", "resourceVersion": "7"}
    manifest["status"] = {"observedGeneration": 1}
    job = FineTuneJob.from_manifest(manifest)
    cm = render_config_map(job, 2, owner_of(job))
    assert cm["metadata"]["name"] == names("review-sentiment", 2, 1).config_map
    assert cm["metadata"]["labels"] == {
        LABEL_JOB: "review-sentiment",
        LABEL_RUN: "2",
        "app.kubernetes.io/managed-by": "tuneloop",
    }
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    config = json.loads(cm["data"]["job.json"])
    assert set(config) == {"apiVersion", "kind", "metadata", "spec"}
    assert config["metadata"] == {"name": "review-sentiment", "namespace": "default"}
    reparsed = FineTuneJob.from_manifest(config)
    assert reparsed.spec == job.spec
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)


def test_owner_without_uid_is_refused() -> None:
    job = single_node_job()
    owner = owner_of(job)
    del owner["uid"]
    with pytest.raises(ValueError, match="uid"):
        render_config_map(job, 1, owner)


# --- credentials -----------------------------------------------------------------------------


def test_canary_credentials_only_travel_by_secret_reference() -> None:
    """A job naming both Secrets: every credential variable is a secretKeyRef to the named
    Secret, none has a literal value, and no rendered object mentions a credential value."""
    job = single_node_job()
    for obj in render_attempt(job, run=1, attempt=1, image=IMAGE, owner=owner_of(job)):
        if obj["kind"] != "Pod":
            continue
        env = env_of(obj)
        assert set(env) >= CREDENTIAL_ENV
        for name in CREDENTIAL_ENV:
            assert "value" not in env[name], f"{name} has a literal value"
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["key"] == name
            assert ref["name"] == ("hf-token" if name == "HF_TOKEN" else "s3-credentials")
        assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["optional"] is False
        literal_names = {e["name"] for e in obj["spec"]["containers"][0]["env"] if "value" in e}
        assert not {n for n in literal_names if "TOKEN" in n or "SECRET" in n or "KEY" in n}


# --- names ---------------------------------------------------------------------------------


def test_names_are_short_unique_dns_labels_for_the_longest_job_names() -> None:
    dns1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    dns1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    long_a = "a" * 62 + "b"
    long_b = "a" * 62 + "c"  # same first 62 characters: only the hash tells them apart
    digit_first = "7" + "x" * 62
    seen: set[str] = set()
    for job_name in (long_a, long_b, digit_first, "j"):
        assert len(job_name) <= 63
        for run in (1, 2, 12345):
            for attempt in (1, 2, 10):
                child = names(job_name, run, attempt)
                pods = [child.pod(rank) for rank in (0, 1, 255)]
                for name in [child.config_map, child.service, *pods]:
                    assert len(name) <= 63, name
                    assert dns1123.match(name), name
                assert dns1035.match(child.service), child.service
                seen.update(pods)
                # shared by the attempts of a run
                assert child.config_map == names(job_name, run, 1).config_map
                assert child.service == names(job_name, run, 1).service
    assert len(seen) == 4 * 3 * 3 * 3  # every pod name distinct
    cms = {names(j, r, 1).config_map for j in (long_a, long_b, digit_first, "j") for r in (1, 2, 12345)}
    assert len(cms) == 4 * 3
    assert names("review-sentiment", 3, 2).pod(1) == names("review-sentiment", 3, 2).pod(1)  # deterministic


@pytest.mark.parametrize(("job_name", "run", "attempt"), [("Bad_Name", 1, 1), ("ok", 0, 1), ("ok", 1, 0)])
def test_names_refuse_bad_input(job_name: str, run: int, attempt: int) -> None:
    with pytest.raises(ValueError):
        names(job_name, run, attempt)
