"""CheckpointManager against a real moto S3 server and against file:// URIs.

What matters for resume: a round trip restores weights, optimizer and RNG exactly; the upload is
really in the background; partial, truncated, corrupted or malicious checkpoints are never used;
retention keeps what it promises; upload failures surface.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.harness.s3 import S3Harness
from tuneloop.storage import ObjectInfo, Storage, StorageError, VersionedBytes
from tuneloop_trainer.checkpoints import (
    CheckpointManager,
    CheckpointState,
    capture_rng,
    restore_rng,
)

pytestmark = pytest.mark.integration


# --- backends ---------------------------------------------------------------------------


class Backend:
    """One storage under test, plus raw access to its objects (to damage them behind its back)."""

    def __init__(self, storage: Storage, base_uri: str, s3: S3Harness | None, root: Path | None) -> None:
        self.storage = storage
        self.base_uri = base_uri.rstrip("/")
        self.s3 = s3
        self.root = root

    def key(self, relative: str) -> str:
        return f"ckpt/{relative}"

    def put(self, relative: str, data: bytes) -> None:
        if self.s3 is not None:
            self.s3.put_bytes(self.key(relative), data)
        else:
            assert self.root is not None
            path = self.root / self.key(relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def get(self, relative: str) -> bytes:
        if self.s3 is not None:
            return self.s3.get_bytes(self.key(relative))
        assert self.root is not None
        return (self.root / self.key(relative)).read_bytes()

    def delete(self, relative: str) -> None:
        self.storage.delete(f"{self.base_uri}/{relative}")

    def steps(self) -> list[str]:
        return sorted({info.key.split("/")[0] for info in self.storage.list(self.base_uri + "/")})


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "s3":
        s3: S3Harness = request.getfixturevalue("s3")
        uri = s3.uri("ckpt")
        return Backend(Storage.for_uri(uri), uri, s3, None)
    root = tmp_path / "bucket"
    root.mkdir()
    uri = (root / "ckpt").as_uri()
    return Backend(Storage.for_uri(uri), uri, None, root)


class Delegating(Storage):
    """A Storage that forwards everything to another one; tests override single methods."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    def list(self, uri: str) -> list[ObjectInfo]:
        return self.inner.list(uri)

    def exists(self, uri: str) -> bool:
        return self.inner.exists(uri)

    def read_bytes(self, uri: str) -> bytes:
        return self.inner.read_bytes(uri)

    def write_bytes(self, uri: str, data: bytes, *, content_type: str | None = None) -> None:
        self.inner.write_bytes(uri, data, content_type=content_type)

    def upload_file(self, path: Path, uri: str, *, sha256: str | None = None) -> None:
        self.inner.upload_file(path, uri, sha256=sha256)

    def download_file(self, uri: str, dest: Path, *, expected_sha256: str | None = None) -> None:
        self.inner.download_file(uri, dest, expected_sha256=expected_sha256)

    def delete(self, uri: str) -> None:
        self.inner.delete(uri)

    def delete_prefix(self, uri: str) -> int:
        return self.inner.delete_prefix(uri)

    def create_bytes(self, uri: str, data: bytes, *, content_type: str | None = None) -> None:
        self.inner.create_bytes(uri, data, content_type=content_type)

    def read_versioned(self, uri: str) -> VersionedBytes:
        return self.inner.read_versioned(uri)

    def replace_bytes(self, uri: str, data: bytes, *, etag: str, content_type: str | None = None) -> None:
        self.inner.replace_bytes(uri, data, etag=etag, content_type=content_type)

    def list_dirs(self, uri: str) -> list[str]:
        return self.inner.list_dirs(uri)


class Gated(Delegating):
    """Uploads block until ``gate`` opens: the upload is provably still running."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.uploading = threading.Event()

    def upload_file(self, path: Path, uri: str, *, sha256: str | None = None) -> None:
        self.uploading.set()
        assert self.gate.wait(10), "test gate never opened"
        super().upload_file(path, uri, sha256=sha256)


class Failing(Delegating):
    def upload_file(self, path: Path, uri: str, *, sha256: str | None = None) -> None:
        raise StorageError(f"simulated AccessDenied for {uri}", uri=uri, code="AccessDenied")


# --- helpers ----------------------------------------------------------------------------


def tiny_state(step: int, seed: int = 0) -> CheckpointState:
    gen = torch.Generator().manual_seed(seed + step)
    weight = torch.randn(4, 3, generator=gen)
    return CheckpointState(
        tensors={"w": weight, "b": torch.full((3,), float(step))},
        objects={"note": [step, "x"]},
        meta={"step": step, "epoch": step / 10, "metrics": {"loss": 1.0 / (step + 1)}},
    )


def manager(backend: Backend, tmp_path: Path, *, storage: Storage | None = None, **kw: Any) -> CheckpointManager:
    kw.setdefault("keep", 10)
    return CheckpointManager(storage or backend.storage, backend.base_uri, tmp_path / "local", **kw)


def rewrite_manifest_entry(backend: Backend, step_dir: str, name: str, data: bytes) -> None:
    """Replace ``name`` and make the manifest agree with it (what an attacker with write access does)."""
    backend.put(f"{step_dir}/{name}", data)
    manifest = json.loads(backend.get(f"{step_dir}/manifest.json"))
    for entry in manifest["files"]:
        if entry["name"] == name:
            entry["size"] = len(data)
            entry["sha256"] = hashlib.sha256(data).hexdigest()
    backend.put(f"{step_dir}/manifest.json", json.dumps(manifest).encode())


# --- tests ------------------------------------------------------------------------------


def test_round_trip_restores_weights_optimizer_and_rng(backend: Backend, tmp_path: Path) -> None:
    torch.manual_seed(0)
    first, second = torch.nn.Linear(5, 4), torch.nn.Linear(4, 5)
    second.weight = torch.nn.Parameter(first.weight.t())  # a view sharing storage, like tied weights
    model = torch.nn.Sequential(first, second)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 5)).pow(2).sum().backward()
        opt.step()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = CheckpointState(
        tensors=dict(model.state_dict()),
        objects={"optimizer": opt.state_dict(), "rng": capture_rng()},
        meta={"epoch": 1, "batch": 7, "early_stopping": {"best": 0.5, "bad_evals": 1}, "metrics": {"eval_loss": 0.5}},
    )
    expected = (torch.rand(3), random.random(), np.random.rand(2))

    mgr = manager(backend, tmp_path)
    mgr.save(12, state, metric=0.5, blocking=True)
    assert mgr.stats["last_bytes"] > 0 and mgr.last_save_seconds is not None and mgr.last_upload_seconds is not None
    assert backend.steps() == ["step-00000012"]
    assert not (tmp_path / "local" / "step-00000012").exists(), "local snapshot must go once uploaded"

    manifest = json.loads(backend.get("step-00000012/manifest.json"))
    assert manifest["step"] == 12 and manifest["epoch"] == 1 and manifest["metric"] == 0.5
    assert manifest["metrics"] == {"eval_loss": 0.5}
    assert [f["name"] for f in manifest["files"]] == ["model.safetensors", "state.pt", "meta.json"]

    torch.manual_seed(99)  # disturb every RNG before restoring
    random.seed(99)
    np.random.seed(99)
    loaded = CheckpointManager(backend.storage, backend.base_uri, tmp_path / "other", keep=3).load()
    assert loaded is not None
    info, back = loaded
    assert info.step == 12
    assert back.tensors.keys() == state.tensors.keys()
    for name, tensor in state.tensors.items():
        assert torch.equal(back.tensors[name], tensor)
    assert back.meta == {**state.meta, "step": 12}

    model2 = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 5))
    model2.load_state_dict(back.tensors)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(back.objects["optimizer"])
    original, restored = opt.state_dict(), opt2.state_dict()
    assert original["param_groups"] == restored["param_groups"]
    for key, per_param in original["state"].items():
        for name, value in per_param.items():
            assert torch.equal(value, restored["state"][key][name]), (key, name)

    restore_rng(back.objects["rng"])
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(again[0], expected[0])
    assert again[1] == expected[1]
    np.testing.assert_array_equal(again[2], expected[2])


def test_save_returns_before_upload_and_second_save_waits(backend: Backend, tmp_path: Path) -> None:
    gated = Gated(backend.storage)
    mgr = manager(backend, tmp_path, storage=gated)
    mgr.save(1, tiny_state(1))
    assert gated.uploading.wait(5)
    assert mgr.stats["upload_in_flight"]
    assert mgr.latest_complete() is None, "no manifest yet, so no checkpoint yet"

    second_done = threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            mgr.save(2, tiny_state(2))
        except BaseException as exc:
            errors.append(exc)
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not second_done.wait(0.3), "the second save must wait for the first upload"
    assert not (tmp_path / "local" / "step-00000002").exists(), "no second snapshot while one is in flight"
    gated.gate.set()
    thread.join(10)
    assert second_done.is_set() and not errors
    mgr.wait(10)
    assert [c.step for c in mgr.complete()] == [1, 2]
    assert mgr.stats["saves"] == 2 and mgr.stats["uploads"] == 2
    assert not mgr.stats["upload_in_flight"]


def test_wait_timeout_leaves_upload_running(backend: Backend, tmp_path: Path) -> None:
    gated = Gated(backend.storage)
    mgr = manager(backend, tmp_path, storage=gated)
    mgr.save(1, tiny_state(1))
    with pytest.raises(TimeoutError):
        mgr.wait(0.05)
    gated.gate.set()
    mgr.wait(10)
    assert mgr.latest_complete() is not None


def test_checkpoint_without_manifest_is_ignored(backend: Backend, tmp_path: Path) -> None:
    mgr = manager(backend, tmp_path)
    mgr.save(1, tiny_state(1), blocking=True)
    mgr.save(2, tiny_state(2), blocking=True)
    backend.delete("step-00000002/manifest.json")  # as if the pod died before the manifest
    latest = mgr.latest_complete()
    assert latest is not None and latest.step == 1
    loaded = mgr.load()
    assert loaded is not None and loaded[0].step == 1
    assert torch.equal(loaded[1].tensors["w"], tiny_state(1).tensors["w"])


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_file_falls_back_to_previous(
    backend: Backend, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    mgr = manager(backend, tmp_path)
    mgr.save(1, tiny_state(1), blocking=True)
    mgr.save(2, tiny_state(2), blocking=True)
    newest = mgr.latest_complete()
    assert newest is not None and newest.step == 2
    original = backend.get("step-00000002/model.safetensors")
    if damage == "truncated":
        backend.put("step-00000002/model.safetensors", original[:-7])
        # The cheap size check already rules it out...
        latest = mgr.latest_complete()
        assert latest is not None and latest.step == 1
    else:
        flipped = bytes([original[-1] ^ 0xFF])
        backend.put("step-00000002/model.safetensors", original[:-1] + flipped)
        latest = mgr.latest_complete()
        assert latest is not None and latest.step == 2, "same size: only the hash can tell"
    # ...and loading it explicitly (as from a stale CheckpointInfo) verifies and falls back.
    loaded = mgr.load(newest)
    assert loaded is not None and loaded[0].step == 1
    assert torch.equal(loaded[1].tensors["b"], torch.full((3,), 1.0))
    assert "step 2 is unusable" in caplog.text
    assert mgr.load() is not None and mgr.load()[0].step == 1  # type: ignore[index]


def test_only_damaged_checkpoint_loads_none(backend: Backend, tmp_path: Path) -> None:
    mgr = manager(backend, tmp_path)
    mgr.save(5, tiny_state(5), blocking=True)
    data = backend.get("step-00000005/state.pt")
    backend.put("step-00000005/state.pt", bytes(len(data)))
    assert mgr.load() is None


class _WouldRunCode:
    """Unpickling this calls ``print`` (harmless): proof that the loader would execute code."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("TUNELOOP-PICKLE-PAYLOAD-RAN",))


def test_pickle_payload_is_refused_not_executed(
    backend: Backend, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    mgr = manager(backend, tmp_path)
    mgr.save(1, tiny_state(1), blocking=True)
    mgr.save(2, tiny_state(2), blocking=True)
    evil = tmp_path / "evil.pt"
    torch.save({"optimizer": _WouldRunCode()}, evil)
    # The payload is live: a plain pickle load would run it.
    torch.load(evil, weights_only=False)
    assert "TUNELOOP-PICKLE-PAYLOAD-RAN" in capfd.readouterr().out
    # Written with a matching manifest, as someone with write access to the bucket could.
    rewrite_manifest_entry(backend, "step-00000002", "state.pt", evil.read_bytes())
    latest = mgr.latest_complete()
    assert latest is not None and latest.step == 2
    loaded = mgr.load()
    assert loaded is not None and loaded[0].step == 1, "weights_only must refuse it and fall back"
    assert "TUNELOOP-PICKLE-PAYLOAD-RAN" not in capfd.readouterr().out


def test_retention_keeps_last_n_plus_best(backend: Backend, tmp_path: Path) -> None:
    mgr = manager(backend, tmp_path, keep=2, best_metric_mode="min")
    metrics = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.0}
    for step, metric in metrics.items():
        mgr.save(step, tiny_state(step), metric=metric)
    mgr.wait(10)
    assert backend.steps() == ["step-00000002", "step-00000004", "step-00000005"]
    assert [c.step for c in mgr.complete()] == [2, 4, 5]
    best = mgr.best
    assert best is not None and best.step == 2 and best.metric == 1.0
    assert not any((tmp_path / "local").iterdir()), "every local snapshot is gone after upload"

    maxed = manager(backend, tmp_path, keep=1, best_metric_mode="max")
    maxed.save(6, tiny_state(6), metric=0.0, blocking=True)
    assert [c.step for c in maxed.complete()] == [4, 6]  # of 2, 4, 5, 6, step 4 scores highest (3.0)


def test_retention_removes_stale_partial_but_keeps_newest(backend: Backend, tmp_path: Path) -> None:
    mgr = manager(backend, tmp_path, keep=1)
    backend.put("step-00000001/model.safetensors", b"partial upload of a killed pod")
    mgr.save(3, tiny_state(3), blocking=True)
    assert backend.steps() == ["step-00000003"]


def test_upload_failure_surfaces_from_wait(backend: Backend, tmp_path: Path) -> None:
    mgr = manager(backend, tmp_path, storage=Failing(backend.storage))
    mgr.save(1, tiny_state(1))  # returns: the failure happens in the background
    with pytest.raises(StorageError, match="AccessDenied"):
        mgr.wait(10)
    mgr.wait()  # raised once, then cleared
    assert mgr.latest_complete() is None
    assert not (tmp_path / "local" / "step-00000001").exists()

    mgr.save(2, tiny_state(2))
    with pytest.raises(StorageError):
        mgr.save(3, tiny_state(3))  # the next save surfaces it too


def test_resave_of_same_step_replaces_it(backend: Backend, tmp_path: Path) -> None:
    mgr = manager(backend, tmp_path)
    mgr.save(4, tiny_state(4, seed=0), blocking=True)
    mgr.save(4, tiny_state(4, seed=1), blocking=True)
    loaded = mgr.load()
    assert loaded is not None
    assert torch.equal(loaded[1].tensors["w"], tiny_state(4, seed=1).tensors["w"])


def test_empty_prefix_has_nothing(backend: Backend, tmp_path: Path) -> None:
    mgr = manager(backend, tmp_path)
    assert mgr.latest_complete() is None
    assert mgr.complete() == []
    assert mgr.load() is None
    assert mgr.best is None


def test_objects_stay_weights_only_loadable(tmp_path: Path) -> None:
    """capture_rng's output passes the weights_only loader as is (no allow-listing needed)."""
    path = tmp_path / "rng.pt"
    torch.save({"rng": capture_rng()}, path)
    loaded = torch.load(path, weights_only=True)
    assert set(loaded["rng"]) >= {"torch", "numpy", "python"}
    with pytest.raises(pickle.UnpicklingError):
        torch.save({"bad": np.random.get_state()}, path)
        torch.load(path, weights_only=True)


def test_only_the_writer_identity_resumes_and_foreign_checkpoints_are_cleaned_up(
    backend: Backend, tmp_path: Path
) -> None:
    """Issue #9: a re-created job resumed the old job's step-20 checkpoint with the old optimizer and
    scheduler state. A checkpoint records who wrote it; another identity never loads it."""
    old = {"namespace": "ml", "name": "tiny", "uid": "uid-1", "run": 1, "specHash": "aaaa"}
    writer = manager(backend, tmp_path, identity=old)
    for step in (10, 20):
        writer.save(step, tiny_state(step), blocking=True)
    writer.close()
    assert json.loads(backend.get("step-00000020/manifest.json"))["identity"] == old

    same = manager(backend, tmp_path, identity=dict(old))
    loaded = same.load()
    assert loaded is not None and loaded[0].step == 20

    for other in ({**old, "specHash": "bbbb"}, {**old, "uid": "uid-2"}, {**old, "run": 2}):
        reader = manager(backend, tmp_path, identity=other)
        assert reader.load() is None, other
        assert [c.step for c in reader.foreign()] == [10, 20]
        assert reader.complete() == []

    # The new spec's first checkpoint (step 2, below the foreign step 20) removes every foreign one.
    new = manager(backend, tmp_path, identity={**old, "specHash": "bbbb"})
    new.save(2, tiny_state(2), blocking=True)
    new.close()
    assert backend.steps() == ["step-00000002"]


def test_checkpoints_without_an_identity_are_not_resumed_by_an_identified_writer(
    backend: Backend, tmp_path: Path
) -> None:
    legacy = manager(backend, tmp_path)  # an older trainer: no identity in the manifest
    legacy.save(5, tiny_state(5), blocking=True)
    legacy.close()
    reader = manager(
        backend, tmp_path, identity={"namespace": None, "name": "t", "uid": None, "run": 1, "specHash": "x"}
    )
    assert reader.load() is None and [c.step for c in reader.foreign()] == [5]


def test_a_checkpoint_recorded_under_an_older_hash_of_the_same_spec_resumes(backend: Backend, tmp_path: Path) -> None:
    # 0.1 trainers hashed nodeSelector/tolerations with the spec (contract.spec_hashes): a run
    # preempted before an upgrade resumes after it instead of training from step 0 again.
    before = {"namespace": "ml", "name": "tiny", "uid": "uid-1", "run": 1, "specHash": "legacy"}
    writer = manager(backend, tmp_path, identity=before)
    writer.save(20, tiny_state(20), blocking=True)
    writer.close()
    after = {**before, "specHash": "current"}
    assert manager(backend, tmp_path, identity=after).load() is None
    upgraded = manager(backend, tmp_path, identity=after, spec_hashes={"current", "legacy"})
    loaded = upgraded.load()
    assert loaded is not None and loaded[0].step == 20 and upgraded.foreign() == []
    # Another job's checkpoint stays foreign, whatever its hash.
    stranger = manager(backend, tmp_path, identity={**after, "uid": "uid-2"}, spec_hashes={"current", "legacy"})
    assert stranger.load() is None


def test_a_resumed_manager_knows_the_upload_time_its_checkpoint_recorded(backend: Backend, tmp_path: Path) -> None:
    """A resumed attempt snapshots early by the last upload's duration from its first checkpoint on
    (recipe Cadence), instead of waiting for a whole untimed upload: the manifest records it."""
    writer = manager(backend, tmp_path / "a")
    writer.save(4, tiny_state(4), blocking=True)
    recorded = json.loads(backend.get("step-00000004/manifest.json"))["uploadSeconds"]
    assert isinstance(recorded, float) and recorded >= 0
    writer.close()

    fresh = manager(backend, tmp_path / "b")
    assert fresh.last_flight_seconds is None  # nothing timed before loading
    loaded = fresh.load()
    assert loaded is not None and loaded[0].step == 4
    assert fresh.last_flight_seconds == (recorded or None)  # 0.0 (an instant upload) seeds nothing

    # A manifest without the field (an older trainer) seeds nothing; this process's own upload does.
    manifest = json.loads(backend.get("step-00000004/manifest.json"))
    manifest["uploadSeconds"] = 7.5
    backend.put("step-00000004/manifest.json", json.dumps(manifest).encode())
    seeded = manager(backend, tmp_path / "c")
    assert seeded.load() is not None and seeded.last_flight_seconds == 7.5
    del manifest["uploadSeconds"]
    backend.put("step-00000004/manifest.json", json.dumps(manifest).encode())
    old = manager(backend, tmp_path / "d")
    assert old.load() is not None and old.last_flight_seconds is None
    old.save(8, tiny_state(8), blocking=True)
    assert old.last_flight_seconds is not None and old.last_flight_seconds > 0
