"""The operator's API access (tuneloop_operator.kube) and heartbeat reader against real servers."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness.k8s_fixtures import K8sApi
from tests.harness.s3 import S3Harness
from tests.manifests import minimal_job
from tuneloop.api import FineTuneJob
from tuneloop.contract import Heartbeat, Layout
from tuneloop_operator.heartbeat import HeartbeatError, HeartbeatReader
from tuneloop_operator.kube import ApiError, KubeClient
from tuneloop_operator.planner import Event

pytestmark = pytest.mark.integration


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def kube(k8s_kubeconfig: Path) -> KubeClient:
    del k8s_kubeconfig
    return KubeClient.from_environment()


def configmap(name: str, job: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default", "labels": {"tuneloop.dev/job": job}},
        "data": {"k": "v"},
    }


def test_create_is_idempotent_and_delete_tolerates_absence(k8s_api: K8sApi, kube: KubeClient) -> None:
    assert run(kube.create(configmap("a", "j"))) is True
    assert run(kube.create(configmap("a", "j"))) is False  # exists: found, not duplicated
    assert run(kube.delete("default", "ConfigMap", "a")) is True
    assert run(kube.delete("default", "ConfigMap", "a")) is False
    assert k8s_api.get("v1", "ConfigMap", "a") is None


def test_children_are_listed_by_label_and_filtered_again(k8s_api: K8sApi, kube: KubeClient) -> None:
    for name, job in (("a", "j"), ("b", "j"), ("c", "other")):
        k8s_api.create(configmap(name, job))
    names = [o["metadata"]["name"] for o in run(kube.list_children("default", "j", "ConfigMap"))]
    assert sorted(names) == ["a", "b"]


def test_errors_carry_the_servers_reason(k8s_api: K8sApi, kube: KubeClient) -> None:
    bad = configmap("Not_A_Name", "j")
    with pytest.raises(ApiError) as info:
        run(kube.create(bad))
    assert info.value.status == 422 and info.value.reason == "Invalid"
    assert run(kube.get_job("default", "absent")) is None


def test_events_point_at_the_job_and_secrets_decode(k8s_api: K8sApi, kube: KubeClient) -> None:
    body = {
        "apiVersion": "tuneloop.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "default", "uid": "u-1"},
    }
    run(kube.post_event(body, Event("Warning", "Retrying", "run 1 retries")))
    (event,) = k8s_api.list("v1", "Event", "default")
    assert event["involvedObject"]["name"] == "j" and event["involvedObject"]["uid"] == "u-1"
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "Retrying", "run 1 retries")
    assert event["source"]["component"] == "tuneloop-operator"
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s", "namespace": "default"},
            "stringData": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "sécret"},
        }
    )
    assert run(kube.get_secret_data("default", "s")) == {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "sécret"}
    assert run(kube.get_secret_data("default", "missing")) is None


def create_credentials(k8s_api: K8sApi) -> None:
    """The Secret ``creds`` with the moto server's (any) key pair."""
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds", "namespace": "default"},
            "stringData": {"AWS_ACCESS_KEY_ID": "tuneloop-test", "AWS_SECRET_ACCESS_KEY": "x"},
        }
    )


def job_on(s3: S3Harness, secret: str | None) -> FineTuneJob:
    m = minimal_job(name="hb")
    m["spec"]["output"] = {"uri": s3.uri("jobs/hb/")}
    m["spec"]["storage"] = {"endpoint": s3.endpoint_url, "region": "us-east-1"}
    if secret:
        m["spec"]["storage"]["secretRef"] = {"name": secret}
    return FineTuneJob.model_validate(m)


def test_the_heartbeat_is_read_with_the_jobs_secret(
    k8s_api: K8sApi, kube: KubeClient, s3_no_ambient_credentials: S3Harness
) -> None:
    s3 = s3_no_ambient_credentials
    create_credentials(k8s_api)
    reader = HeartbeatReader(kube)
    job = job_on(s3, "creds")
    assert run(reader.read(job, 1)) is None  # not written yet: not an error
    beat = Heartbeat(run=1, phase="training", step=3, total_steps=9, loss=0.5, last_updated_time=datetime.now(UTC))
    s3.put_bytes(f"jobs/hb/{Layout.status(1)}", json.dumps(beat.to_wire(), default=str).encode())
    got = run(reader.read(job, 1))
    assert got is not None and got.step == 3 and got.progress().total_steps == 9

    s3.put_bytes(f"jobs/hb/{Layout.status(2)}", b'{"not": "a heartbeat"}')
    with pytest.raises(HeartbeatError, match="not a trainer heartbeat"):
        run(reader.read(job, 2))
    with pytest.raises(HeartbeatError, match="secret default/gone"):
        run(reader.read(job_on(s3, "gone"), 1))


def test_the_output_is_read_and_claimed_with_the_jobs_secret(
    k8s_api: K8sApi, kube: KubeClient, s3_no_ambient_credentials: S3Harness
) -> None:
    from tuneloop.ownership import JobIdentity, OutputOwnedError
    from tuneloop_operator.outputs import JobStorage, OutputAccess
    from tuneloop_operator.planner import OutputClaim

    s3 = s3_no_ambient_credentials
    create_credentials(k8s_api)
    outputs = OutputAccess(JobStorage(kube))
    job = job_on(s3, "creds")
    view = run(outputs.observe(job))
    assert view.owner is None and view.highest_run == 0 and view.error is None

    me = JobIdentity(namespace="default", name=job.metadata.name, uid="uid-1")
    run(outputs.claim(job, OutputClaim(identity=me, run=1, spec_hash="h", continue_lineage=False)))
    view = run(outputs.observe(job))
    assert view.owner is not None and view.owner.owner == me and view.highest_run == 1
    assert json.loads(s3.get_bytes(f"jobs/hb/{Layout.run_claim(1)}"))["claimedBy"] == "operator"

    other = JobIdentity(namespace="default", name="other", uid="uid-2")
    with pytest.raises(OutputOwnedError, match="uid uid-1"):
        run(outputs.claim(job, OutputClaim(identity=other, run=2, spec_hash="h", continue_lineage=False)))

    unreadable = run(outputs.observe(job_on(s3, "gone")))
    assert unreadable.error is not None and "secret default/gone" in unreadable.error
