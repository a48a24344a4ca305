"""Rendering a FineTuneJob run into the Kubernetes objects that carry it out.

Pure functions: a validated job in, plain manifest dicts out. No Kopf, no API client, no
I/O, so every rendering is tested against golden files, the Pod Security "restricted"
profile and the Kubernetes OpenAPI schema without a cluster.

One run of a job owns one ConfigMap (the validated job, read by the trainer as
``/etc/tuneloop/job.json``) and, for ``resources.nodes > 1``, one headless Service through
which the pods of a run find pod 0 (``MASTER_ADDR``). Each attempt of a run gets fresh pods,
one per node rank, so a retried attempt never collides with the pods of a failed one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Any, Final

from tuneloop.api import API_VERSION, KIND, FineTuneJob
from tuneloop.contract import TERMINATION_MESSAGE_PATH, Layout
from tuneloop.storage import safe_join

Manifest = dict[str, Any]

#: Kubernetes names used as DNS labels (pod hostnames, Services, label values): 63 characters.
MAX_NAME: Final = 63
#: Label keys; label values are the job name and decimal numbers.
LABEL_JOB: Final = "tuneloop.dev/job"
LABEL_RUN: Final = "tuneloop.dev/run"
LABEL_ATTEMPT: Final = "tuneloop.dev/attempt"
LABEL_NODE_RANK: Final = "tuneloop.dev/node-rank"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
#: Kueue (plain-pod integration): the LocalQueue a job's pods are queued in, copied from the job's
#: own label; a pod group (label + size annotation) for multi-node attempts.
KUEUE_QUEUE_NAME: Final = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_NAME: Final = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_TOTAL_COUNT: Final = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_RETRIABLE_IN_GROUP: Final = "kueue.x-k8s.io/retriable-in-group"
MANAGED_BY: Final = "tuneloop"

CONFIG_DIR: Final = "/etc/tuneloop"
CONFIG_KEY: Final = "job.json"
SCRATCH_DIR: Final = "/scratch"
WORK_DIR: Final = f"{SCRATCH_DIR}/work"
CACHE_DIR: Final = f"{SCRATCH_DIR}/cache"
HF_HOME: Final = f"{SCRATCH_DIR}/hf"
CONTAINER_NAME: Final = "trainer"
#: Port of the trainer's Prometheus endpoint (the default of ``TUNELOOP_TRAINER_METRICS_PORT``).
TRAINER_METRICS_PORT: Final = 9400
#: torch.distributed rendezvous port on pod 0.
MASTER_PORT: Final = 29500
#: UID/GID of the trainer; the image's user (non-root, see trainer_image/Dockerfile).
RUN_AS_USER: Final = 10001
#: Seconds between SIGTERM and SIGKILL: the trainer checkpoints on SIGTERM (exit 143).
TERMINATION_GRACE_SECONDS: Final = 60
#: How long torchrun lets its workers checkpoint after the pod's SIGTERM before it kills them
#: (torchrun's own default is 30 s): the pod's grace period, less a margin for torchrun to exit.
SHUTDOWN_TIMEOUT_SECONDS: Final = TERMINATION_GRACE_SECONDS - 5

#: Secret keys the trainer's environment takes from ``spec.storage.secretRef``: (key, optional).
STORAGE_SECRET_KEYS: Final = (
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("AWS_SESSION_TOKEN", True),
)
#: Secret key taken from ``spec.model.secretRef``.
MODEL_SECRET_KEY: Final = "HF_TOKEN"  # noqa: S105 - a key name, not a value


@dataclass(frozen=True)
class TrainerDefaults:
    """What the platform sets for jobs that leave it out (the operator's ``TUNELOOP_DEFAULT_*``
    and ``TUNELOOP_TRAINER_SERVICE_ACCOUNT`` settings). A job's own field always wins."""

    s3_endpoint: str | None = None
    """S3 endpoint when ``spec.storage.endpoint`` is unset (given to the trainer as ``AWS_ENDPOINT_URL_S3``)."""
    s3_region: str | None = None
    """Region when ``spec.storage.region`` is unset (given to the trainer as ``AWS_REGION``)."""
    storage_secret: str | None = None
    """Secret with the S3 keys when ``spec.storage.secretRef`` is unset."""
    service_account: str | None = None
    """ServiceAccount of the trainer pods (e.g. one annotated for IRSA); unset: the namespace's default."""


NO_DEFAULTS: Final = TrainerDefaults()


def storage_secret_name(job: FineTuneJob, defaults: TrainerDefaults = NO_DEFAULTS) -> str | None:
    """The Secret holding the job's S3 keys: ``spec.storage.secretRef``, else the platform's
    default; ``None``: the pod's (or operator's) own identity applies."""
    ref = job.spec.storage.secret_ref
    return ref.name if ref is not None else defaults.storage_secret


_HASH_LEN: Final = 8
_DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _fit(base: str, suffix: str) -> str:
    """``base + suffix`` if it fits a DNS label, else the base cut short and made unique
    again with a hash of the whole base: ``<cut base>-<8 hex>`` + suffix."""
    if len(base) + len(suffix) <= MAX_NAME:
        return base + suffix
    keep = MAX_NAME - len(suffix) - _HASH_LEN - 1
    if keep < 1:
        raise ValueError(f"name suffix {suffix!r} leaves no room for the job name")
    digest = hashlib.sha256(base.encode()).hexdigest()[:_HASH_LEN]
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def _check_numbers(run: int, attempt: int | None = None, node_rank: int | None = None) -> None:
    if run < 1:
        raise ValueError(f"run numbers start at 1, got {run}")
    if attempt is not None and attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {attempt}")
    if node_rank is not None and node_rank < 0:
        raise ValueError(f"node ranks start at 0, got {node_rank}")


@dataclass(frozen=True)
class ChildNames:
    """Names of the objects of one attempt of one run of a job. Every name is a DNS-1123
    label (63 characters at most); the Service name is also a DNS-1035 label (starts with a
    letter), as Services require."""

    job_name: str
    run: int
    attempt: int

    @property
    def config_map(self) -> str:
        """The run's ConfigMap (shared by all its attempts)."""
        return _fit(self.job_name, f"-r{self.run}-config")

    @property
    def service(self) -> str:
        """The run's headless Service (multi-node runs only)."""
        base = self.job_name if self.job_name[0].isalpha() else f"tl-{self.job_name}"
        return _fit(base, f"-r{self.run}")

    def pod(self, node_rank: int) -> str:
        """The pod of ``node_rank`` in this attempt; also its hostname."""
        _check_numbers(self.run, self.attempt, node_rank)
        return _fit(self.job_name, f"-r{self.run}-a{self.attempt}-n{node_rank}")


def names(job_name: str, run: int, attempt: int) -> ChildNames:
    """Deterministic names of the children of ``job_name``'s run ``run``, attempt ``attempt``."""
    if not _DNS_LABEL.match(job_name) or len(job_name) > MAX_NAME:
        raise ValueError(f"{job_name!r} is not a valid FineTuneJob name (a DNS label of at most 63 characters)")
    _check_numbers(run, attempt)
    return ChildNames(job_name=job_name, run=run, attempt=attempt)


# --- metadata --------------------------------------------------------------------------


def _namespace(job: FineTuneJob) -> str:
    if job.metadata.namespace is None:
        raise ValueError(f"FineTuneJob {job.metadata.name!r} has no namespace; children are namespaced")
    return job.metadata.namespace


def owner_references(owner: dict[str, Any]) -> list[Manifest]:
    """``ownerReferences`` naming ``owner`` (the FineTuneJob object) as controller, so that
    deleting the job deletes its children and Kopf/kubectl see who manages them."""
    missing = [k for k in ("apiVersion", "kind", "name", "uid") if not owner.get(k)]
    if missing:
        raise ValueError(f"owner lacks {', '.join(missing)}")
    return [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["name"],
            "uid": owner["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def run_labels(job_name: str, run: int) -> dict[str, str]:
    """Labels every child of a run carries (the Service selects pods by these)."""
    return {LABEL_JOB: job_name, LABEL_RUN: str(run), LABEL_MANAGED_BY: MANAGED_BY}


def kueue_metadata(job: FineTuneJob, run: int, attempt: int) -> tuple[dict[str, str], dict[str, str]]:
    """Labels and annotations that hand an attempt's pods to Kueue (its plain-pod integration),
    when the job names a queue (``metadata.labels[kueue.x-k8s.io/queue-name]``); none otherwise.

    The pods carry the queue's name. The pods of a multi-node attempt form one pod group (named
    after the attempt, with its size), so Kueue admits them together or not at all; the group is
    not retriable in place (a failed or preempted attempt is replaced by the operator with a new
    attempt, which is a new group), so Kueue releases the quota once its pods have ended."""
    queue = job.metadata.labels.get(KUEUE_QUEUE_NAME)
    if not queue:
        return {}, {}
    labels = {KUEUE_QUEUE_NAME: queue}
    annotations: dict[str, str] = {}
    nodes = job.spec.resources.nodes
    if nodes > 1:
        labels[KUEUE_POD_GROUP_NAME] = _fit(job.metadata.name, f"-r{run}-a{attempt}")
        annotations[KUEUE_POD_GROUP_TOTAL_COUNT] = str(nodes)
        annotations[KUEUE_RETRIABLE_IN_GROUP] = "false"
    return labels, annotations


def _metadata(name: str, job: FineTuneJob, labels: dict[str, str], owner: dict[str, Any]) -> Manifest:
    return {
        "name": name,
        "namespace": _namespace(job),
        "labels": labels,
        "ownerReferences": owner_references(owner),
    }


# --- ConfigMap -------------------------------------------------------------------------


def job_config(job: FineTuneJob) -> Manifest:
    """The job as the trainer reads it: apiVersion, kind, name, namespace and spec; no
    status, no other metadata (labels and annotations may change without a new run)."""
    metadata: Manifest = {"name": job.metadata.name}
    if job.metadata.namespace is not None:
        metadata["namespace"] = job.metadata.namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": job.spec.to_wire()}


def render_config_map(job: FineTuneJob, run: int, owner: dict[str, Any]) -> Manifest:
    """The run's ConfigMap holding the validated job under ``job.json``."""
    _check_numbers(run)
    child = names(job.metadata.name, run, 1)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(child.config_map, job, run_labels(job.metadata.name, run), owner),
        "immutable": True,
        "data": {CONFIG_KEY: json.dumps(job_config(job), sort_keys=True, indent=2) + "\n"},
    }


# --- Service ---------------------------------------------------------------------------


def render_service(job: FineTuneJob, run: int, owner: dict[str, Any]) -> Manifest:
    """The run's headless Service: gives each pod the DNS name
    ``<pod>.<service>.<namespace>.svc`` so that every rank reaches pod 0. Not-ready pods are
    published, since the trainer has no readiness probe and rendezvous happens at start."""
    _check_numbers(run)
    child = names(job.metadata.name, run, 1)
    selector = {LABEL_JOB: job.metadata.name, LABEL_RUN: str(run)}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(child.service, job, run_labels(job.metadata.name, run), owner),
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "publishNotReadyAddresses": True,
            "ports": [{"name": "dist", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }


# --- Pod -------------------------------------------------------------------------------


def _env(name: str, value: str) -> Manifest:
    return {"name": name, "value": value}


def _secret_env(name: str, secret: str, key: str, *, optional: bool) -> Manifest:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}


def master_addr(job: FineTuneJob, run: int, attempt: int) -> str:
    """DNS name of pod 0 of an attempt, through the run's headless Service."""
    child = names(job.metadata.name, run, attempt)
    return f"{child.pod(0)}.{child.service}.{_namespace(job)}.svc"


def _pod_env(
    job: FineTuneJob,
    run: int,
    attempt: int,
    node_rank: int,
    *,
    metrics_port: int,
    job_uid: str,
    defaults: TrainerDefaults = NO_DEFAULTS,
) -> list[Manifest]:
    spec = job.spec
    env = [
        _env("TUNELOOP_JOB_NAME", job.metadata.name),
        # Who the trainer writes as: it checks the output's owner and run claim against it,
        # records it in checkpoints and heartbeats (see tuneloop.ownership).
        _env("TUNELOOP_JOB_UID", job_uid),
        _env("TUNELOOP_RUN", str(run)),
        # A later attempt takes the run's S3 writer lease over from an earlier attempt's pod still
        # running (a zombie on a partitioned node), which then stops before its next commit.
        _env("TUNELOOP_ATTEMPT", str(attempt)),
        _env("TUNELOOP_OUTPUT_URI", spec.output.uri),
        # Where this run writes (checkpoints, heartbeat, model): for people and tools reading the pod.
        _env("TUNELOOP_RUN_URI", safe_join(spec.output.uri, Layout.run(run))),
        _env("TUNELOOP_WORK_DIR", WORK_DIR),
        _env("TUNELOOP_CACHE_DIR", CACHE_DIR),
        _env("TUNELOOP_METRICS_PORT", str(metrics_port)),
        _env("HF_HOME", HF_HOME),
        # The root filesystem is read-only: libraries that write under $HOME write to /tmp.
        _env("HOME", "/tmp"),  # noqa: S108 - an emptyDir of its own, not a shared /tmp
    ]
    nodes = spec.resources.nodes
    if nodes > 1:
        env += [
            _env("MASTER_ADDR", master_addr(job, run, attempt)),
            _env("MASTER_PORT", str(MASTER_PORT)),
            _env("WORLD_SIZE", str(nodes)),
            _env("NODE_RANK", str(node_rank)),
        ]
    # The platform's S3 defaults, for what the job leaves out (the trainer reads spec.storage first).
    if spec.storage.endpoint is None and defaults.s3_endpoint:
        env.append(_env("AWS_ENDPOINT_URL_S3", defaults.s3_endpoint))
    if spec.storage.region is None and defaults.s3_region:
        env.append(_env("AWS_REGION", defaults.s3_region))
    # Credentials only ever by reference: the Secret's value never appears in a manifest.
    secret = storage_secret_name(job, defaults)
    if secret is not None:
        env += [_secret_env(key, secret, key, optional=optional) for key, optional in STORAGE_SECRET_KEYS]
    if spec.model.secret_ref is not None:
        env.append(_secret_env(MODEL_SECRET_KEY, spec.model.secret_ref.name, MODEL_SECRET_KEY, optional=False))
    return env


def trainer_command(job: FineTuneJob, run: int, attempt: int, node_rank: int) -> list[str]:
    """The trainer's command line. One process per pod for one GPU (or the CPU); otherwise
    torchrun (through ``tuneloop_trainer.launch``, which keeps the exit-code contract) with one
    process per GPU, ranks spread over the nodes, rendezvous at pod 0. The arguments are
    literal (no ``$(VAR)`` expansion to go wrong); the same values are in the environment."""
    trainer = ["-m", "tuneloop_trainer", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"]
    res = job.spec.resources
    if res.nodes == 1 and res.gpus <= 1:
        return ["python", *trainer]
    master = master_addr(job, run, attempt) if res.nodes > 1 else "127.0.0.1"
    return [
        "python",
        "-m",
        "tuneloop_trainer.launch",
        f"--nnodes={res.nodes}",
        f"--nproc-per-node={max(1, res.gpus)}",
        f"--node-rank={node_rank}",
        f"--master-addr={master}",
        f"--master-port={MASTER_PORT}",
        "--max-restarts=0",  # retries are the operator's: it resumes from the checkpoint
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT_SECONDS}",
        *trainer,
    ]


def _resources(job: FineTuneJob) -> Manifest:
    res = job.spec.resources
    amounts: dict[str, str] = {}
    if res.cpu is not None:
        amounts["cpu"] = str(res.cpu)
    if res.memory is not None:
        amounts["memory"] = str(res.memory)
    limits = dict(amounts)
    if res.gpus > 0:
        limits["nvidia.com/gpu"] = str(res.gpus)
    out: Manifest = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return out


def render_pod(
    job: FineTuneJob,
    run: int,
    attempt: int,
    node_rank: int,
    *,
    image: str,
    owner: dict[str, Any],
    metrics_port: int = TRAINER_METRICS_PORT,
    defaults: TrainerDefaults = NO_DEFAULTS,
) -> Manifest:
    """The trainer pod of ``node_rank`` for an attempt of a run.

    ``image`` is the operator's default trainer image, used unless ``spec.resources.image``
    names one; ``defaults`` the platform's other defaults (S3, ServiceAccount). The pod passes
    the Pod Security "restricted" profile, never restarts in place (the operator decides about
    retries from the exit code, see :mod:`tuneloop.contract`) and writes only to its emptyDir
    volumes.
    """
    _check_numbers(run, attempt, node_rank)
    nodes = job.spec.resources.nodes
    if node_rank >= nodes:
        raise ValueError(f"node rank {node_rank} out of range for {nodes} node(s)")
    child = names(job.metadata.name, run, attempt)
    pod_name = child.pod(node_rank)
    res = job.spec.resources
    labels = run_labels(job.metadata.name, run) | {LABEL_ATTEMPT: str(attempt), LABEL_NODE_RANK: str(node_rank)}
    queue_labels, queue_annotations = kueue_metadata(job, run, attempt)
    metadata = _metadata(pod_name, job, labels | queue_labels, owner)
    ports: list[Manifest] = []
    # Only the rank-0 process serves metrics (the other ranks report to a null sink): only the
    # node-rank 0 pod is announced for scraping and names the port, so no target is ever down.
    if node_rank == 0:
        metadata["annotations"] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(metrics_port),
            "prometheus.io/path": "/metrics",
        }
        ports.append({"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"})
    if queue_annotations:
        metadata["annotations"] = {**metadata.get("annotations", {}), **queue_annotations}
    if nodes > 1:
        ports.append({"name": "dist", "containerPort": MASTER_PORT, "protocol": "TCP"})
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": res.image or image,
        "command": trainer_command(job, run, attempt, node_rank),
        "env": _pod_env(
            job,
            run,
            attempt,
            node_rank,
            metrics_port=metrics_port,
            job_uid=str(owner_references(owner)[0]["uid"]),
            defaults=defaults,
        ),
        "ports": ports,
        "resources": _resources(job),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
            {"name": "dshm", "mountPath": "/dev/shm"},  # noqa: S108 - a memory emptyDir for NCCL/dataloaders
        ],
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    spec: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": child.config_map}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if nodes > 1:
        spec["hostname"] = pod_name
        spec["subdomain"] = child.service
    if defaults.service_account:
        # The token stays unmounted: IRSA, EKS Pod Identity and Azure workload identity inject
        # their own projected token, GKE workload identity answers on the metadata server.
        spec["serviceAccountName"] = defaults.service_account
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        spec["tolerations"] = [t.to_wire() for t in res.tolerations]
    if res.priority_class_name is not None:
        spec["priorityClassName"] = res.priority_class_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def render_attempt(
    job: FineTuneJob,
    run: int,
    attempt: int,
    *,
    image: str,
    owner: dict[str, Any],
    metrics_port: int = TRAINER_METRICS_PORT,
    defaults: TrainerDefaults = NO_DEFAULTS,
    existing: Container[tuple[str, str]] = (),
) -> list[Manifest]:
    """Every object of an attempt, in creation order: the run's ConfigMap, its Service
    (multi-node), the attempt's pods. The run's objects named in ``existing`` (``(kind, name)``:
    made for an earlier attempt) are left out."""
    child = names(job.metadata.name, run, attempt)
    objects: list[Manifest] = []
    if ("ConfigMap", child.config_map) not in existing:
        objects.append(render_config_map(job, run, owner))
    if job.spec.resources.nodes > 1 and ("Service", child.service) not in existing:
        objects.append(render_service(job, run, owner))
    objects += [
        render_pod(job, run, attempt, rank, image=image, owner=owner, metrics_port=metrics_port, defaults=defaults)
        for rank in range(job.spec.resources.nodes)
    ]
    return objects
