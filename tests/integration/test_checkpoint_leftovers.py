"""Partial checkpoints newer than the last save: kept while training may still replace them,
removed once training has ended (found by the reliability suite, scenario 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.s3 import S3Harness
from tests.integration.test_checkpoints import Backend, backend, manager, tiny_state

__all__ = ["backend"]  # the fixture, imported to be used here

pytestmark = pytest.mark.integration


def test_remove_incomplete_drops_every_partial_checkpoint_and_keeps_complete_ones(
    backend: Backend, tmp_path: Path
) -> None:
    mgr = manager(backend, tmp_path, keep=2)
    mgr.save(4, tiny_state(4), blocking=True)
    mgr.save(8, tiny_state(8), blocking=True)
    # What killed attempts leave: data files without a manifest (newer than the last save, where
    # retention leaves them for the next save of that step), and a manifest missing a file.
    backend.put("step-00000010/model.safetensors", b"half an upload")
    mgr.save(12, tiny_state(12), blocking=True)
    backend.put("step-00000013/model.safetensors", b"a SIGTERM checkpoint cut short")
    for name in ("model.safetensors", "meta.json", "manifest.json"):
        backend.put(f"step-00000014/{name}", backend.get(f"step-00000012/{name}"))
    assert backend.steps() == ["step-00000008", "step-00000012", "step-00000013", "step-00000014"]
    assert [c.step for c in mgr.complete()] == [8, 12]

    assert mgr.remove_incomplete() == [13, 14]
    assert backend.steps() == ["step-00000008", "step-00000012"]
    loaded = mgr.load()
    assert loaded is not None and loaded[0].step == 12
    assert mgr.remove_incomplete() == []


def test_unfinished_multipart_uploads_under_the_checkpoints_are_aborted_when_training_ends(
    backend: Backend, tmp_path: Path
) -> None:
    mgr = manager(backend, tmp_path, keep=2)
    mgr.save(4, tiny_state(4), blocking=True)
    if backend.s3 is None:  # files have no multipart uploads: nothing to abort, nothing touched
        assert mgr.abort_incomplete_uploads() == 0
        assert [c.step for c in mgr.complete()] == [4]
        return
    s3 = backend.s3
    # What a SIGKILL mid-upload leaves: a started multipart upload with one part, never completed.
    started = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=backend.key("step-00000008/state.pt"))
    s3.client.upload_part(
        Bucket=s3.bucket, Key=started["Key"], UploadId=started["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    # Another run's upload (outside this manager's prefix) is not this run's to abort.
    other = s3.client.create_multipart_upload(Bucket=s3.bucket, Key="elsewhere/state.pt")

    def unfinished() -> list[str]:
        answer = s3.client.list_multipart_uploads(Bucket=s3.bucket)
        return sorted(u["Key"] for u in answer.get("Uploads", []))

    assert unfinished() == ["ckpt/step-00000008/state.pt", "elsewhere/state.pt"]
    assert mgr.abort_incomplete_uploads() == 1
    assert unfinished() == ["elsewhere/state.pt"]
    assert [c.step for c in mgr.complete()] == [4]  # complete checkpoints untouched
    assert mgr.abort_incomplete_uploads() == 0
    s3.client.abort_multipart_upload(Bucket=s3.bucket, Key=other["Key"], UploadId=other["UploadId"])


def test_aborting_uploads_refuses_a_whole_bucket(s3: S3Harness) -> None:
    from tuneloop.storage import Storage, StorageError

    with pytest.raises(StorageError, match="refusing to abort every upload in bucket"):
        Storage.for_uri(s3.uri("x")).abort_incomplete_uploads(f"s3://{s3.bucket}/")
