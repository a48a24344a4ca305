"""The platform's defaults for trainer pods (S3 endpoint, region, credentials Secret,
ServiceAccount): parsed from the operator's environment, applied to the pods and to the
operator's own S3 access where a job leaves the field out, and never over a job's own field."""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes_validate
import pytest

from tests.manifests import minimal_job
from tests.unit.operator.test_render import K8S_VERSION, assert_pod_security_restricted, owner_of
from tuneloop.api import FineTuneJob
from tuneloop.storage import Storage
from tuneloop_operator.outputs import JobStorage, StorageAccessError, effective_storage
from tuneloop_operator.render import NO_DEFAULTS, TrainerDefaults, render_pod, storage_secret_name
from tuneloop_operator.settings import OperatorSettings, SettingsError

pytestmark = pytest.mark.unit

IMAGE = "ghcr.io/tuneloop/trainer:0.1.0"
DEFAULTS = TrainerDefaults(
    s3_endpoint="https://minio.storage.svc:9000",
    s3_region="eu-west-1",
    storage_secret="platform-s3",
    service_account="tuneloop-trainer",
)
KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def job(storage: dict[str, Any] | None = None, output: str = "s3://bucket/jobs/j") -> FineTuneJob:
    m = minimal_job(name="j")
    m["metadata"]["namespace"] = "ml"
    m["spec"]["output"]["uri"] = output
    if storage is not None:
        m["spec"]["storage"] = storage
    return FineTuneJob.from_manifest(m)


def pod(j: FineTuneJob, defaults: TrainerDefaults = NO_DEFAULTS) -> dict[str, Any]:
    return render_pod(j, 1, 1, 0, image=IMAGE, owner=owner_of(j), defaults=defaults)


def env(p: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in p["spec"]["containers"][0]["env"]}


# --- settings --------------------------------------------------------------------------------


def test_settings_parse_the_platform_defaults() -> None:
    s = OperatorSettings.from_env(
        {
            "TUNELOOP_DEFAULT_S3_ENDPOINT": " https://minio.storage.svc:9000 ",
            "TUNELOOP_DEFAULT_S3_REGION": "eu-west-1",
            "TUNELOOP_DEFAULT_STORAGE_SECRET": "platform-s3",
            "TUNELOOP_TRAINER_SERVICE_ACCOUNT": "tuneloop-trainer",
        }
    )
    assert s.trainer_defaults() == DEFAULTS
    assert OperatorSettings.from_env({}).trainer_defaults() == NO_DEFAULTS
    assert OperatorSettings.from_env({"TUNELOOP_DEFAULT_S3_REGION": ""}).default_s3_region is None


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("TUNELOOP_DEFAULT_S3_ENDPOINT", "minio:9000", "not an http(s) URL"),
        ("TUNELOOP_DEFAULT_S3_ENDPOINT", "https://key:secret@minio:9000", "no credentials"),
        ("TUNELOOP_DEFAULT_S3_REGION", "EU West", "not an S3 region"),
        ("TUNELOOP_DEFAULT_STORAGE_SECRET", "S3_Keys", "not a Secret name"),
        ("TUNELOOP_TRAINER_SERVICE_ACCOUNT", "-trainer", "not a ServiceAccount name"),
        ("TUNELOOP_NAMESPACES", "ml,team-*", "patterns are not supported"),
    ],
)
def test_bad_defaults_name_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        OperatorSettings.from_env({name: value})
    assert name in str(info.value) and says in str(info.value)
    assert "secret@" not in str(info.value)  # a credential in the URL is never echoed


# --- trainer pods ----------------------------------------------------------------------------


def test_a_job_without_storage_settings_gets_the_platforms() -> None:
    p = pod(job(), DEFAULTS)
    e = env(p)
    assert e["AWS_ENDPOINT_URL_S3"] == DEFAULTS.s3_endpoint
    assert e["AWS_REGION"] == DEFAULTS.s3_region
    for key in KEYS:
        assert e[key]["secretKeyRef"]["name"] == "platform-s3"
    assert p["spec"]["serviceAccountName"] == "tuneloop-trainer"
    # IRSA / Pod Identity / workload identity bring their own token: the API token stays unmounted.
    assert p["spec"]["automountServiceAccountToken"] is False
    assert_pod_security_restricted(p)
    kubernetes_validate.validate(p, K8S_VERSION, strict=True)


def test_a_jobs_own_storage_fields_win() -> None:
    own = job({"endpoint": "https://s3.team.example:9000", "region": "us-west-2", "secretRef": {"name": "mine"}})
    e = env(pod(own, DEFAULTS))
    assert "AWS_ENDPOINT_URL_S3" not in e and "AWS_REGION" not in e  # the trainer reads spec.storage first
    assert {e[key]["secretKeyRef"]["name"] for key in KEYS} == {"mine"}
    assert storage_secret_name(own, DEFAULTS) == "mine"


def test_without_defaults_the_pod_is_as_before() -> None:
    j = job()
    assert pod(j) == pod(j, NO_DEFAULTS)
    p = pod(j)
    assert "serviceAccountName" not in p["spec"]  # the namespace's default ServiceAccount
    assert not KEYS & set(env(p)) and "AWS_ENDPOINT_URL_S3" not in env(p)
    assert storage_secret_name(j) is None  # the pod's own identity (IRSA...)


def test_a_service_account_alone_means_cloud_identity_without_a_secret() -> None:
    p = pod(job(), TrainerDefaults(service_account="tuneloop-trainer"))
    assert p["spec"]["serviceAccountName"] == "tuneloop-trainer"
    assert not KEYS & set(env(p))


# --- the operator's own S3 access ---------------------------------------------------------------


class FakeKube:
    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]]) -> None:
        self.secrets = secrets
        self.read: list[tuple[str, str]] = []

    async def get_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        self.read.append((namespace, name))
        return self.secrets.get((namespace, name))


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any]]:
    """Every storage client the operator makes: (uri, settings, credentials env)."""
    calls: list[tuple[str, Any, Any]] = []

    def fake_for_uri(uri: str, settings: Any = None, *, env: Any = None) -> object:
        calls.append((uri, settings, env))
        return object()

    monkeypatch.setattr(Storage, "for_uri", staticmethod(fake_for_uri))
    return calls


SECRET = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "unrelated": "x"}


def test_operator_reads_s3_with_the_default_secret_endpoint_and_region(made: list[tuple[str, Any, Any]]) -> None:
    kube = FakeKube({("ml", "platform-s3"): SECRET})
    asyncio.run(JobStorage(kube, DEFAULTS).for_job(job()))  # type: ignore[arg-type]
    assert kube.read == [("ml", "platform-s3")]
    ((uri, settings, creds),) = made
    assert uri == "s3://bucket/jobs/j"
    assert (settings.endpoint, settings.region) == (DEFAULTS.s3_endpoint, DEFAULTS.s3_region)
    assert creds == {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}


def test_operator_uses_the_jobs_own_secret_and_settings_first(made: list[tuple[str, Any, Any]]) -> None:
    kube = FakeKube({("ml", "mine"): SECRET})
    own = job({"endpoint": "https://s3.team.example:9000", "secretRef": {"name": "mine"}})
    asyncio.run(JobStorage(kube, DEFAULTS).for_job(own))  # type: ignore[arg-type]
    assert kube.read == [("ml", "mine")]
    ((_, settings, _),) = made
    assert settings.endpoint == "https://s3.team.example:9000"
    assert settings.region == DEFAULTS.s3_region  # only what the job leaves out
    assert effective_storage(own, NO_DEFAULTS) is own.spec.storage


def test_operator_falls_back_to_its_own_identity_without_any_secret(made: list[tuple[str, Any, Any]]) -> None:
    kube = FakeKube({})
    asyncio.run(JobStorage(kube, TrainerDefaults(s3_region="eu-west-1")).for_job(job()))  # type: ignore[arg-type]
    assert kube.read == []
    ((_, settings, creds),) = made
    assert creds is None  # botocore's chain: IRSA, Pod Identity, instance profile
    assert settings.region == "eu-west-1"


def test_a_missing_default_secret_is_reported_by_its_setting(made: list[tuple[str, Any, Any]]) -> None:
    kube = FakeKube({})
    with pytest.raises(StorageAccessError, match=r"ml/platform-s3.*TUNELOOP_DEFAULT_STORAGE_SECRET"):
        asyncio.run(JobStorage(kube, DEFAULTS).for_job(job()))  # type: ignore[arg-type]
    assert made == []
