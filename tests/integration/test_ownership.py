"""Output ownership and run claims (tuneloop.ownership) on a real moto S3 server and on files.

Regression tests for issue #9: two jobs sharing ``spec.output.uri`` overwrote each other's runs,
and two ``tuneloop run`` on one output both took run 1.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.s3 import S3Harness
from tuneloop.contract import Layout
from tuneloop.ownership import (
    JobIdentity,
    OutputOwnedError,
    claim_next_run,
    claim_output,
    claim_run,
    highest_run,
    ownership_problem,
    read_owner,
)
from tuneloop.storage import NotFoundError, PreconditionFailedError, Storage, safe_join

pytestmark = pytest.mark.integration

TINY = JobIdentity(namespace="ml", name="tiny", uid="uid-1")
TINY_AGAIN = JobIdentity(namespace="ml", name="tiny", uid="uid-2")
OTHER = JobIdentity(namespace="ml", name="other", uid="uid-3")
LOCAL_TINY = JobIdentity(namespace="ml", name="tiny")


@dataclass
class Backend:
    storage: Storage
    uri: str


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "s3":
        s3: S3Harness = request.getfixturevalue("s3")
        uri = s3.uri("models/bot/")
        return Backend(Storage.for_uri(uri), uri)
    uri = (tmp_path / "models" / "bot").as_uri() + "/"
    return Backend(Storage.for_uri(uri), uri)


# --- the storage primitives -------------------------------------------------------------------


def test_create_bytes_wins_once(backend: Backend) -> None:
    uri = safe_join(backend.uri, "claim.json")
    backend.storage.create_bytes(uri, b"first")
    with pytest.raises(PreconditionFailedError, match="already exists"):
        backend.storage.create_bytes(uri, b"second")
    assert backend.storage.read_bytes(uri) == b"first"


def test_create_bytes_race_has_exactly_one_winner(backend: Backend) -> None:
    uri = safe_join(backend.uri, "race.json")
    barrier = threading.Barrier(8)
    won: list[int] = []
    lost: list[int] = []

    def claim(i: int) -> None:
        barrier.wait()
        try:
            backend.storage.create_bytes(uri, str(i).encode())
            won.append(i)
        except PreconditionFailedError:
            lost.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert backend.storage.read_bytes(uri) == str(won[0]).encode()


def test_replace_bytes_only_from_the_version_read(backend: Backend) -> None:
    uri = safe_join(backend.uri, "owner.json")
    backend.storage.write_bytes(uri, b"v1")
    read = backend.storage.read_versioned(uri)
    assert read.data == b"v1" and read.etag
    backend.storage.replace_bytes(uri, b"v2", etag=read.etag)
    assert backend.storage.read_bytes(uri) == b"v2"
    with pytest.raises(PreconditionFailedError, match="changed since it was read"):
        backend.storage.replace_bytes(uri, b"v3", etag=read.etag)  # stale version
    assert backend.storage.read_bytes(uri) == b"v2"


def test_replace_bytes_of_a_missing_object_is_a_lost_condition(backend: Backend) -> None:
    with pytest.raises(PreconditionFailedError):
        backend.storage.replace_bytes(safe_join(backend.uri, "gone.json"), b"x", etag="0" * 32)
    with pytest.raises(NotFoundError):
        backend.storage.read_versioned(safe_join(backend.uri, "gone.json"))


def test_list_dirs_lists_one_level(backend: Backend) -> None:
    for key in ("runs/1/run.json", "runs/1/checkpoints/step-00000001/manifest.json", "runs/12/model/x", "owner.json"):
        backend.storage.write_bytes(safe_join(backend.uri, key), b"x")
    assert backend.storage.list_dirs(safe_join(backend.uri, "runs") + "/") == ["1", "12"]
    assert backend.storage.list_dirs(backend.uri) == ["runs"]
    assert backend.storage.list_dirs(safe_join(backend.uri, "nothing") + "/") == []


# --- ownership ---------------------------------------------------------------------------------


def test_the_first_job_owns_the_output_and_another_is_refused_by_name(backend: Backend) -> None:
    record = claim_output(backend.storage, backend.uri, TINY, continue_lineage=False, by="operator")
    assert record.owner == TINY
    again = claim_output(backend.storage, backend.uri, TINY, continue_lineage=False, by="trainer")
    assert again.owner == TINY  # the owner itself: idempotent
    with pytest.raises(OutputOwnedError) as refused:
        claim_output(backend.storage, backend.uri, OTHER, continue_lineage=True, by="operator")
    message = str(refused.value)
    assert "FineTuneJob ml/tiny (uid uid-1)" in message
    assert "choose another spec.output.uri" in message
    owner = read_owner(backend.storage, backend.uri)
    assert owner is not None and owner.owner == TINY  # untouched


def test_a_recreated_job_continues_the_lineage_only_when_asked(backend: Backend) -> None:
    claim_output(backend.storage, backend.uri, TINY, continue_lineage=False, by="operator")
    with pytest.raises(OutputOwnedError, match="continueLineage: true"):
        claim_output(backend.storage, backend.uri, TINY_AGAIN, continue_lineage=False, by="operator")
    record = claim_output(backend.storage, backend.uri, TINY_AGAIN, continue_lineage=True, by="operator")
    assert record.owner == TINY_AGAIN
    assert record.lineage == (TINY,)
    # The predecessor, were it still writing somewhere, is now refused.
    with pytest.raises(OutputOwnedError):
        claim_output(backend.storage, backend.uri, TINY, continue_lineage=False, by="trainer")


def test_racing_jobs_for_a_new_prefix_get_one_owner(backend: Backend) -> None:
    identities = [JobIdentity(namespace="ml", name=f"job-{i}", uid=f"u{i}") for i in range(6)]
    barrier = threading.Barrier(len(identities))
    owners: list[JobIdentity] = []
    refused: list[JobIdentity] = []

    def claim(me: JobIdentity) -> None:
        barrier.wait()
        try:
            owners.append(claim_output(backend.storage, backend.uri, me, continue_lineage=False, by="operator").owner)
        except OutputOwnedError:
            refused.append(me)

    threads = [threading.Thread(target=claim, args=(me,)) for me in identities]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(owners) == 1 and len(refused) == len(identities) - 1


def test_a_local_run_may_not_write_into_a_cluster_jobs_output(backend: Backend) -> None:
    claim_output(backend.storage, backend.uri, TINY, continue_lineage=False, by="operator")
    with pytest.raises(OutputOwnedError, match="pass --output"):
        claim_output(backend.storage, backend.uri, LOCAL_TINY, continue_lineage=False, by="tuneloop run")


def test_a_corrupt_owner_record_is_reported_not_overwritten(backend: Backend) -> None:
    uri = safe_join(backend.uri, Layout.OWNER)
    backend.storage.write_bytes(uri, b"{not json")
    with pytest.raises(Exception, match="not a Tuneloop owner record"):
        claim_output(backend.storage, backend.uri, TINY, continue_lineage=False, by="operator")
    assert backend.storage.read_bytes(uri) == b"{not json"


@pytest.mark.parametrize(
    ("owner", "me", "lineage", "expected"),
    [
        (None, TINY, False, None),
        (TINY, TINY, False, None),
        (TINY, TINY_AGAIN, True, None),
        (TINY, TINY_AGAIN, False, "earlier FineTuneJob of the same name"),
        (TINY, OTHER, True, "two jobs cannot share an output"),
        (LOCAL_TINY, TINY, False, "local runs of this manifest"),
        (LOCAL_TINY, TINY, True, None),
        (TINY, LOCAL_TINY, True, "pass --output"),
        (LOCAL_TINY, LOCAL_TINY, False, None),
    ],
)
def test_ownership_rules(owner: JobIdentity | None, me: JobIdentity, lineage: bool, expected: str | None) -> None:
    from tuneloop.ownership import OwnerRecord

    record = OwnerRecord(owner=owner) if owner is not None else None
    problem = ownership_problem(record, me, continue_lineage=lineage, output_uri="s3://b/p/")
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem


# --- run numbers ---------------------------------------------------------------------------------


def test_concurrent_local_runs_get_distinct_run_numbers(backend: Backend) -> None:
    claim_output(backend.storage, backend.uri, LOCAL_TINY, continue_lineage=False, by="tuneloop run")
    barrier = threading.Barrier(5)
    runs: list[int] = []

    def take() -> None:
        barrier.wait()
        claim = claim_next_run(backend.storage, backend.uri, LOCAL_TINY, spec_hash="h", by="tuneloop run")
        runs.append(claim.run)

    threads = [threading.Thread(target=take) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(runs) == [1, 2, 3, 4, 5]
    assert highest_run(backend.storage, backend.uri) == 5


def test_run_numbers_continue_after_existing_runs(backend: Backend) -> None:
    # Runs written before claims existed (no run.json): numbering goes past them.
    backend.storage.write_bytes(safe_join(backend.uri, "runs/4/model/config.json"), b"{}")
    claim = claim_next_run(backend.storage, backend.uri, TINY, spec_hash="h", by="operator")
    assert claim.run == 5
    assert claim_next_run(backend.storage, backend.uri, TINY, spec_hash="h", by="operator", after=9).run == 10


def test_a_run_claimed_by_another_job_is_refused_and_the_same_job_may_reclaim(backend: Backend) -> None:
    claim_run(backend.storage, backend.uri, TINY, 1, spec_hash="aaa", by="operator")
    again = claim_run(backend.storage, backend.uri, TINY, 1, spec_hash="aaa", by="trainer")
    assert again.job == TINY and again.claimed_by == "operator"
    with pytest.raises(OutputOwnedError, match=r"run 1 .* was claimed by FineTuneJob ml/tiny \(uid uid-1\)"):
        claim_run(backend.storage, backend.uri, TINY_AGAIN, 1, spec_hash="aaa", by="trainer")
    raw = json.loads(backend.storage.read_bytes(safe_join(backend.uri, Layout.run_claim(1))))
    assert raw["job"] == {"namespace": "ml", "name": "tiny", "uid": "uid-1"}
    assert raw["specHash"] == "aaa"
