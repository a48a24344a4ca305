"""tuneloop.storage against a real moto S3 server over HTTP, and the same suite on file:// URIs.

Credentials reach S3Storage only through the process environment (the ``s3`` fixture exports them
as a pod's ``secretKeyRef`` env vars would) or an explicit ``env`` mapping; the spec has no field
for them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from pydantic import ValidationError

from tests.harness.s3 import S3Harness
from tuneloop import __version__
from tuneloop.api.spec import Storage as StorageSettings
from tuneloop.storage import (
    ABORT_INCOMPLETE_MULTIPART_UPLOADS_RULE,
    FileStorage,
    NotFoundError,
    S3Storage,
    Storage,
    StorageError,
    UnsafeKeyError,
    sha256_file,
)
from tuneloop.storage.localfiles import _verify
from tuneloop.storage.s3_errors import NO_CREDENTIALS_MESSAGE
from tuneloop.storage.s3_integrity import _verification

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
#: Small parts so that a 20 MiB file goes multipart (S3's minimum part size is 5 MiB).
SMALL_PARTS = TransferConfig(
    multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4, preferred_transfer_client="classic"
)


@dataclass
class Backend:
    """A storage under test, a fresh base prefix (ending in '/'), and raw access that bypasses it."""

    name: str
    storage: Storage
    base: str
    plant: Callable[[str, bytes], None]  # write a key relative to base, raw
    plant_many: Callable[[list[str], bytes], None]  # the same for many keys, fast
    raw_keys: Callable[[], list[str]]  # every key under base, raw, sorted
    s3: S3Harness | None = None

    def uri(self, key: str) -> str:
        return self.base + key


def _s3_backend(s3: S3Harness, **kwargs: Any) -> Backend:
    storage = S3Storage(**kwargs)  # endpoint, region and credentials from the environment
    prefix = "jobs/test/"

    def plant(key: str, data: bytes) -> None:
        s3.put_bytes(prefix + key, data)

    def plant_many(keys: list[str], data: bytes) -> None:
        # Straight into the in-process moto backend: over HTTP this takes ~4.5 ms an object
        # (~5 s for 1100); what is under test (listing, deleting) still goes over HTTP.
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key in keys:
            backend.put_object(s3.bucket, prefix + key, data)

    def raw_keys() -> list[str]:
        return [k[len(prefix) :] for k in s3.list_keys(prefix)]

    return Backend("s3", storage, s3.uri(prefix), plant, plant_many, raw_keys, s3)


def _file_backend(root: Path) -> Backend:
    base_dir = root / "store" / "jobs" / "test"
    base_dir.mkdir(parents=True)

    def plant(key: str, data: bytes) -> None:
        path = base_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def plant_many(keys: list[str], data: bytes) -> None:
        for key in keys:
            plant(key, data)

    def raw_keys() -> list[str]:
        return sorted(p.relative_to(base_dir).as_posix() for p in base_dir.rglob("*") if p.is_file())

    return Backend("file", FileStorage(), f"file://{base_dir}/", plant, plant_many, raw_keys)


@pytest.fixture(params=["s3", "file"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "s3":
        s3: S3Harness = request.getfixturevalue("s3")
        return _s3_backend(s3, transfer_config=SMALL_PARTS)
    return _file_backend(tmp_path)


@pytest.fixture
def s3_storage(s3: S3Harness) -> S3Storage:
    storage = Storage.for_uri(s3.uri("x"))
    assert isinstance(storage, S3Storage)
    return storage


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- the same behaviour on both backends -----------------------------------------------


def test_write_read_bytes_and_json(backend: Backend) -> None:
    st = backend.storage
    st.write_bytes(backend.uri("runs/1/blob.bin"), b"\x00\x01binary")
    assert st.read_bytes(backend.uri("runs/1/blob.bin")) == b"\x00\x01binary"
    st.write_bytes(backend.uri("runs/1/blob.bin"), b"replaced")
    assert st.read_bytes(backend.uri("runs/1/blob.bin")) == b"replaced"

    status = {"step": 120, "loss": 0.25, "metrics": {"f1": 0.9}, "note": "caf\u00e9"}
    st.write_json(backend.uri("runs/1/status.json"), status)
    assert st.read_json(backend.uri("runs/1/status.json")) == status
    st.write_bytes(backend.uri("empty"), b"")
    assert st.read_bytes(backend.uri("empty")) == b""

    st.write_bytes(backend.uri("bad.json"), b"{not json")
    with pytest.raises(StorageError, match="is not valid JSON"):
        st.read_json(backend.uri("bad.json"))
    assert backend.raw_keys() == ["bad.json", "empty", "runs/1/blob.bin", "runs/1/status.json"]
    if backend.s3:
        head = backend.s3.client.head_object(Bucket=backend.s3.bucket, Key="jobs/test/runs/1/status.json")
        assert head["ContentType"] == "application/json"
        assert (
            head["Metadata"]["sha256"] == hashlib.sha256(st.read_bytes(backend.uri("runs/1/status.json"))).hexdigest()
        )


def test_missing_objects(backend: Backend) -> None:
    st = backend.storage
    missing = backend.uri("runs/9/status.json")
    with pytest.raises(NotFoundError) as caught:
        st.read_bytes(missing)
    assert str(caught.value) == f"{missing} does not exist"
    assert caught.value.uri == missing
    with pytest.raises(NotFoundError):
        st.read_json(missing)
    with pytest.raises(NotFoundError):
        st.download_file(missing, Path("/nonexistent-dir-never-created/x"))
    assert not st.exists(missing)
    assert st.list(missing) == []
    assert st.list(backend.uri("nothing/here/")) == []
    st.delete(missing)  # deleting what is not there is fine


def test_list_exists_and_prefix_semantics(backend: Backend) -> None:
    st = backend.storage
    for key, data in [("data/b.jsonl", b"bb"), ("data/a.jsonl", b"a"), ("data/sub/c.csv", b"ccc"), ("data2/x", b"x")]:
        backend.plant(key, data)
    backend.plant("single.parquet", b"12345")
    if backend.s3:  # "folders" made by a console: not objects, never listed
        backend.plant("data/", b"")
        backend.plant("data/sub/", b"")

    infos = st.list(backend.uri("data/"))
    assert [i.key for i in infos] == ["a.jsonl", "b.jsonl", "sub/c.csv"]
    assert [i.size for i in infos] == [1, 2, 3]
    assert [i.uri for i in infos] == [backend.uri(k) for k in ("data/a.jsonl", "data/b.jsonl", "data/sub/c.csv")]
    assert all(i.last_modified is not None and i.last_modified.tzinfo is not None for i in infos)
    assert all((i.etag is not None) == (backend.name == "s3") for i in infos)
    # Without the slash, "data" is still the directory, and never includes "data2/".
    assert [i.key for i in st.list(backend.uri("data"))] == ["a.jsonl", "b.jsonl", "sub/c.csv"]
    # A single object lists as itself, keyed by its name.
    [single] = st.list(backend.uri("single.parquet"))
    assert (single.key, single.size, single.uri) == ("single.parquet", 5, backend.uri("single.parquet"))
    assert [i.key for i in st.list(backend.base)] == [
        "data/a.jsonl",
        "data/b.jsonl",
        "data/sub/c.csv",
        "data2/x",
        "single.parquet",
    ]
    for uri in ("data/", "data", "data/sub", "single.parquet", "data/a.jsonl"):
        assert st.exists(backend.uri(uri)), uri
    for uri in ("dat", "data/a", "single", "data/sub/c"):
        assert not st.exists(backend.uri(uri)), uri
    assert st.delete_prefix(backend.uri("data/")) == (5 if backend.s3 else 3)  # markers go too
    assert backend.raw_keys() == ["data2/x", "single.parquet"]


def test_list_paginates_past_1000_objects(backend: Backend) -> None:
    count = 1100
    start = time.perf_counter()
    backend.plant_many([f"many/{i:05d}.json" for i in range(count)], b"{}")
    assert len(backend.raw_keys()) == count
    planted = time.perf_counter() - start

    start = time.perf_counter()
    infos = backend.storage.list(backend.uri("many/"))
    listed = time.perf_counter() - start
    assert [i.key for i in infos] == [f"{i:05d}.json" for i in range(count)]
    assert backend.storage.exists(backend.uri("many"))

    start = time.perf_counter()
    assert backend.storage.delete_prefix(backend.uri("many")) == count  # two delete batches on S3
    deleted = time.perf_counter() - start
    assert backend.storage.list(backend.uri("many/")) == []
    print(f"[{backend.name}] planted {count} in {planted:.2f}s, listed in {listed:.2f}s, deleted in {deleted:.2f}s")


def test_upload_and_download_a_large_file(backend: Backend, tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    digest = _random_file(src, 20 * MiB + 123)
    uri = backend.uri("runs/1/model/model.safetensors")
    backend.storage.upload_file(src, uri)

    if backend.s3:
        head = backend.s3.client.head_object(Bucket=backend.s3.bucket, Key="jobs/test/runs/1/model/model.safetensors")
        assert head["ETag"].strip('"').endswith("-5"), "20 MiB in 5 MiB parts must have gone multipart"
        assert head["Metadata"]["sha256"] == digest

    dest = tmp_path / "out" / "nested" / "model.safetensors"
    requests: list[tuple[str, str | None]] = []
    if isinstance(backend.storage, S3Storage):

        def record(request: Any, **_: Any) -> None:
            if_match = request.headers.get("If-Match")
            requests.append((request.method, if_match.decode() if if_match else None))

        backend.storage.client.meta.events.register("before-send.s3.*", record)
    backend.storage.download_file(uri, dest, expected_sha256=digest)
    if backend.s3:
        # One HEAD (ours), then ranged GETs pinned to the ETag that was verified.
        assert requests == [("HEAD", None)] + [("GET", head["ETag"])] * 5
    assert sha256_file(dest) == digest
    assert dest.stat().st_size == 20 * MiB + 123
    assert _leftovers(dest.parent) == ["model.safetensors"]  # no temporary files left
    backend.storage.download_file(uri, dest)  # again, over the existing file, with the metadata check
    assert sha256_file(dest) == digest


def test_download_detects_a_corrupted_object_and_leaves_nothing(backend: Backend, tmp_path: Path) -> None:
    src = tmp_path / "shard.bin"
    recorded = _random_file(src, 256 * 1024)
    uri = backend.uri("ckpt/shard.bin")
    backend.storage.upload_file(src, uri, sha256=recorded)
    # Someone (or bit rot) replaces the object with different bytes of the same size.
    backend.plant("ckpt/shard.bin", os.urandom(256 * 1024))

    dest_dir = tmp_path / "restore"
    with pytest.raises(StorageError, match="integrity check failed") as caught:
        backend.storage.download_file(uri, dest_dir / "shard.bin", expected_sha256=recorded)
    assert caught.value.code == "integrity"
    assert recorded in str(caught.value)
    assert _leftovers(dest_dir) == []

    # An existing file at the destination is left untouched by a failed download.
    (dest_dir / "shard.bin").write_bytes(b"previous good copy")
    with pytest.raises(StorageError, match="integrity check failed"):
        backend.storage.download_file(uri, dest_dir / "shard.bin", expected_sha256=recorded.upper())
    assert (dest_dir / "shard.bin").read_bytes() == b"previous good copy"
    assert _leftovers(dest_dir) == ["shard.bin"]
    with pytest.raises(ValueError, match="64 hexadecimal"):
        backend.storage.download_file(uri, dest_dir / "x", expected_sha256="abc")


def test_upload_dir_and_download_prefix_mirror_a_tree(backend: Backend, tmp_path: Path) -> None:
    tree = tmp_path / "checkpoint"
    files = {
        "config.json": b"{}",
        "model.safetensors": os.urandom(70_000),
        "tokenizer/vocab.txt": b"a\nb\n",
        "tokenizer/deep/er/merges.txt": b"x y",
        "caf\u00e9 \u65e5\u672c.txt": b"unicode",
    }
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    prefix = backend.uri("runs/2/checkpoints/step-00000100/")
    uris = backend.storage.upload_dir(tree, prefix)
    assert uris == sorted(prefix + rel for rel in files)

    out = tmp_path / "mirror"
    written = backend.storage.download_prefix(prefix, out)
    assert written == sorted(out / rel for rel in files)
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
    # A single object downloads under its own name.
    assert backend.storage.download_prefix(prefix + "config.json", tmp_path / "one") == [tmp_path / "one/config.json"]


def test_upload_dir_refuses_unsafe_names_before_uploading_anything(backend: Backend, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "fine.txt").write_bytes(b"ok")
    (tree / "..\\..\\evil.txt").write_bytes(b"backslashes are separators elsewhere")
    with pytest.raises(UnsafeKeyError, match="backslash"):
        backend.storage.upload_dir(tree, backend.uri("up/"))
    assert backend.raw_keys() == []


def test_download_prefix_refuses_escaping_keys(backend: Backend, tmp_path: Path) -> None:
    backend.plant("evil/ok.txt", b"fine")
    if backend.s3:
        # Planted with the raw client: S3 keys are opaque strings, '..' included.
        backend.s3.put_bytes("jobs/test/evil/../../etc/passwd", b"root:x:0:0")
        backend.s3.put_bytes("jobs/test/evil/sub/", b"")  # a folder marker: skipped, not refused
    else:
        backend.plant("evil/..\\..\\etc\\passwd", b"root:x:0:0")
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeKeyError, match="refusing key"):
        backend.storage.download_prefix(backend.uri("evil/"), dest)
    assert _leftovers(dest) == []  # refused before anything was downloaded
    assert not (tmp_path / "etc").exists()


def test_delete_and_delete_prefix(backend: Backend) -> None:
    st = backend.storage
    for key in ("runs/1/a", "runs/1/sub/b", "runs/10/c", "runs/1x"):
        backend.plant(key, b"1")
    assert st.delete_prefix(backend.uri("runs/1")) == 2  # not runs/10/ nor runs/1x
    assert backend.raw_keys() == ["runs/10/c", "runs/1x"]
    st.delete(backend.uri("runs/1x"))
    assert backend.raw_keys() == ["runs/10/c"]
    assert st.delete_prefix(backend.uri("runs/10/c")) == 1  # a single object is its own prefix
    assert st.delete_prefix(backend.uri("runs/")) == 0
    with pytest.raises(StorageError, match="refusing to delete everything"):
        st.delete_prefix(backend.base.split("/jobs/")[0] + "/" if backend.s3 else "file:///")


# --- S3 specifics ------------------------------------------------------------------------


def test_the_client_config(s3: S3Harness) -> None:
    default = S3Storage()
    config = default.client.meta.config
    # At most 4 requests in all (botocore's total_max_attempts), each with bounded timeouts; see
    # tests/integration/test_storage_timeouts.py.
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}
    assert config.request_checksum_calculation == "when_supported"
    assert config.response_checksum_validation == "when_supported"
    assert config.s3 == {"addressing_style": "auto"}
    assert f"tuneloop/{__version__}" in (config.user_agent_extra or "")
    assert (config.connect_timeout, config.read_timeout) == (5.0, 20.0)
    assert default.client.meta.endpoint_url == s3.endpoint_url
    assert default.client.meta.region_name == "us-east-1"

    strict = S3Storage(StorageSettings(checksums="when-required", addressing_style="path", region="eu-west-1"))
    config = strict.client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3 == {"addressing_style": "path"}
    assert strict.client.meta.region_name == "eu-west-1"


@pytest.mark.parametrize("checksums", ["when-supported", "when-required"])
def test_the_checksums_setting_reaches_the_wire(s3: S3Harness, tmp_path: Path, checksums: str) -> None:
    storage = S3Storage(StorageSettings(checksums=checksums), transfer_config=SMALL_PARTS)  # type: ignore[arg-type]
    sent: list[dict[str, str]] = []

    def capture(request: Any, **_: Any) -> None:
        sent.append({k.lower(): str(v) for k, v in request.headers.items()})

    storage.client.meta.events.register("before-send.s3.PutObject", capture)
    storage.client.meta.events.register("before-send.s3.UploadPart", capture)
    storage.write_bytes(s3.uri("small.json"), b"{}")
    src = tmp_path / "big.bin"
    _random_file(src, 11 * MiB)
    storage.upload_file(src, s3.uri("big.bin"))
    assert len(sent) == 1 + 3  # one PUT, three parts

    checksum_headers = [{k for k in headers if k.startswith("x-amz-checksum-")} for headers in sent]
    head = s3.client.head_object(Bucket=s3.bucket, Key="small.json", ChecksumMode="ENABLED")
    if checksums == "when-supported":
        assert all(h == {"x-amz-checksum-sha256"} for h in checksum_headers), checksum_headers
        assert "ChecksumSHA256" in head
    else:
        assert checksum_headers == [set()] * 4, "no flexible checksums for stores that reject them"
        assert "ChecksumSHA256" not in head
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"{}").hexdigest()  # our own check works either way
    storage.download_file(s3.uri("big.bin"), tmp_path / "back.bin")
    assert sha256_file(tmp_path / "back.bin") == sha256_file(src)


def test_s3_native_checksums_verify_downloads(s3: S3Harness, s3_storage: S3Storage, tmp_path: Path) -> None:
    # An object written by another tool: S3's SHA-256 checksum, no sha256 metadata.
    data = os.urandom(4096)
    s3.client.put_object(Bucket=s3.bucket, Key="ext/data.bin", Body=data, ChecksumAlgorithm="SHA256")
    head = s3_storage._head(s3.uri("ext/data.bin"))
    check = _verification(head, None)
    assert check.sha256 == (("S3's SHA-256 checksum", hashlib.sha256(data).hexdigest()),)
    s3_storage.download_file(s3.uri("ext/data.bin"), tmp_path / "ok.bin")
    assert (tmp_path / "ok.bin").read_bytes() == data

    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(StorageError, match="S3's SHA-256 checksum says"):
        _verify(corrupt, check, uri=s3.uri("ext/data.bin"))

    # Metadata that disagrees with the content is caught without any expected_sha256.
    s3.client.put_object(Bucket=s3.bucket, Key="ext/lying.bin", Body=b"content", Metadata={"sha256": "0" * 64})
    with pytest.raises(StorageError, match="sha256 metadata says"):
        s3_storage.download_file(s3.uri("ext/lying.bin"), tmp_path / "lying.bin")
    with pytest.raises(StorageError, match="integrity check failed"):
        s3_storage.read_bytes(s3.uri("ext/lying.bin"))
    assert _leftovers(tmp_path) == ["corrupt.bin", "ok.bin"]


def test_multipart_objects_from_other_tools_are_not_checked_against_composite_checksums(
    s3: S3Harness, s3_storage: S3Storage, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    digest = _random_file(src, 12 * MiB)
    s3.client.upload_file(
        str(src), s3.bucket, "ext/big.bin", ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=SMALL_PARTS
    )
    check = _verification(s3_storage._head(s3.uri("ext/big.bin")), None)
    assert check.sha256 == ()  # a checksum of part checksums is not a SHA-256 of the content
    s3_storage.download_file(s3.uri("ext/big.bin"), tmp_path / "back.bin", expected_sha256=digest)
    assert sha256_file(tmp_path / "back.bin") == digest


def test_missing_bucket(s3: S3Harness, s3_storage: S3Storage, tmp_path: Path) -> None:
    uri = "s3://no-such-bucket-tuneloop/runs/1/status.json"
    calls: list[Callable[[], object]] = [
        lambda: s3_storage.read_bytes(uri),
        lambda: s3_storage.list("s3://no-such-bucket-tuneloop/runs/"),
        lambda: s3_storage.exists(uri),
        lambda: s3_storage.write_bytes(uri, b"x"),
        lambda: s3_storage.download_file(uri, tmp_path / "x"),
        lambda: s3_storage.download_prefix("s3://no-such-bucket-tuneloop/runs/", tmp_path / "y"),
        lambda: s3_storage.upload_file(src, uri),
        lambda: s3_storage.delete_prefix("s3://no-such-bucket-tuneloop/runs/"),
    ]
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for call in calls:
        with pytest.raises(NotFoundError, match=r"^bucket no-such-bucket-tuneloop does not exist"):
            call()


def test_credentials_come_from_the_environment_only(
    s3_no_ambient_credentials: S3Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = s3_no_ambient_credentials
    assert not any(name in StorageSettings.model_fields for name in ("access_key_id", "secret_access_key"))
    with pytest.raises(ValidationError):
        StorageSettings.model_validate({"accessKeyId": "AKIA", "secretAccessKey": "x"})

    settings = StorageSettings(endpoint=harness.endpoint_url)
    nothing = S3Storage(settings)
    with pytest.raises(StorageError) as caught:
        nothing.read_bytes(harness.uri("status.json"))
    assert NO_CREDENTIALS_MESSAGE in str(caught.value)
    assert harness.uri("status.json") in str(caught.value)

    # An explicit environment (what the operator passes to a subprocess) works…
    S3Storage(settings, env=harness.env).write_bytes(harness.uri("a"), b"1")
    # …and so does the process environment, as a pod gets it from secretKeyRef env vars.
    for name, value in harness.env.items():
        monkeypatch.setenv(name, value)
    assert Storage.for_uri(harness.uri("a")).read_bytes(harness.uri("a")) == b"1"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_endpoint(s3: S3Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    storage = S3Storage(max_attempts=1, connect_timeout=2)
    with pytest.raises(StorageError, match=f"cannot reach http://127.0.0.1:{port}") as caught:
        storage.read_bytes(s3.uri("x"))
    assert caught.value.code == "connection"


@dataclass
class MotoAuth:
    """moto with request authentication on, and one IAM user (no policies) with a real key pair."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str


@pytest.fixture
def moto_auth(s3: S3Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoAuth]:
    import moto.settings
    from moto.core.authorization import ActionAuthenticatorMixin

    iam = boto3.client(
        "iam", endpoint_url=s3.endpoint_url, region_name="us-east-1",
        aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    iam.create_user(UserName="trainer")
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    # The server runs in this process: switch its IAM enforcement on for this test only.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    yield MotoAuth(s3.endpoint_url, key["AccessKeyId"], key["SecretAccessKey"])


CANARY_SECRET = "CanarySecret-7f3a9c1e-DO-NOT-LOG"
CANARY_TOKEN = "CanaryToken-IQoJb3JpZ2luX2VjE-DO-NOT-LOG"


def _scan(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def test_real_authorization_failures_have_actionable_messages(
    moto_auth: MotoAuth, s3: S3Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = s3.uri("runs/1/status.json")
    cases = [
        (
            "AKIAUNKNOWNKEY000000",
            CANARY_SECRET,
            "check AWS_ACCESS_KEY_ID in the Secret named by spec.storage.secretRef",
        ),
        (moto_auth.access_key_id, CANARY_SECRET, "check AWS_SECRET_ACCESS_KEY in the Secret named by spec.storage"),
        (
            moto_auth.access_key_id,
            moto_auth.secret_access_key,
            "check the Secret named by spec.storage.secretRef / the",
        ),
    ]
    for key_id, secret, advice in cases:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        storage = S3Storage(max_attempts=1)
        with pytest.raises(StorageError) as read:
            storage.read_bytes(uri)
        with pytest.raises(StorageError) as listed:
            storage.list(s3.uri("runs/"))
        for error in (read.value, listed.value):
            assert advice in str(error)
            assert uri.rsplit("/", 2)[0] in str(error)
            assert CANARY_SECRET not in _scan(error)
    # HEAD answers a bare 403: still the access-denied advice.
    with pytest.raises(StorageError, match="access denied to s3://"):
        S3Storage(max_attempts=1).exists(uri)


def test_no_secret_ever_reaches_messages_or_logs(
    moto_auth: MotoAuth,
    s3: S3Harness,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything, botocore's request dumps included
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_auth.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)  # wrong secret: signatures fail
    monkeypatch.setenv("AWS_SESSION_TOKEN", CANARY_TOKEN)  # sent as a header, and logged by botocore at DEBUG
    storage = S3Storage(max_attempts=2)
    src = tmp_path / "f.bin"
    src.write_bytes(b"data")
    failures: list[BaseException] = []
    calls: list[Callable[[], object]] = [
        lambda: storage.read_bytes(s3.uri("a")),
        lambda: storage.write_bytes(s3.uri("a"), b"x"),
        lambda: storage.list(s3.uri("")),
        lambda: storage.exists(s3.uri("a")),
        lambda: storage.upload_file(src, s3.uri("f.bin")),
        lambda: storage.download_file(s3.uri("a"), tmp_path / "a"),
        lambda: storage.delete_prefix(s3.uri("runs/")),
        lambda: storage.read_bytes("s3://no-such-bucket-tuneloop/a"),
    ]
    # Errors with authentication off: missing objects, integrity, connection, unsafe keys.
    unreachable = S3Storage(env={"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{_closed_port()}"}, max_attempts=1)
    calls_without_auth: list[Callable[[], object]] = [
        lambda: storage.read_bytes(s3.uri("missing")),
        lambda: storage.download_file(s3.uri("ok"), tmp_path / "ok", expected_sha256="0" * 64),
        lambda: storage.upload_dir(tmp_path, "s3://no-such-bucket-tuneloop/x/"),
        lambda: storage.download_prefix(s3.uri("evil/"), tmp_path / "evil"),
        lambda: unreachable.read_bytes(s3.uri("a")),
    ]
    for call in calls:
        with pytest.raises(StorageError) as caught:
            call()
        failures.append(caught.value)
    monkeypatch.setattr("moto.settings.INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    storage.write_bytes(s3.uri("ok"), b"fine")
    s3.put_bytes("evil/../../x", b"x")
    for call in calls_without_auth:
        with pytest.raises(StorageError) as caught:
            call()
        failures.append(caught.value)

    assert len(failures) == 13
    for failure in failures:
        text = _scan(failure)
        assert CANARY_SECRET not in text and CANARY_TOKEN not in text, text

    # The moto server runs in this process and logs the headers it receives: proof that the
    # token really went over the wire. Everything on the client side must be clean.
    server = ("moto", "werkzeug")
    assert any(CANARY_TOKEN in r.getMessage() for r in caplog.records if r.name.startswith(server))
    client_side = [r for r in caplog.records if not r.name.startswith(server)]
    assert any(r.name.startswith("botocore") and r.levelno == logging.DEBUG for r in client_side)
    assert any("x-amz-security-token" in r.getMessage().lower() for r in client_side), "request dumps captured"
    leaks = [(r.name, r.getMessage()[:200]) for r in client_side if CANARY_TOKEN in r.getMessage()]
    assert leaks == []
    assert not [r.name for r in caplog.records if CANARY_SECRET in r.getMessage()]


def test_the_recommended_lifecycle_rule_is_valid(s3: S3Harness) -> None:
    s3.client.put_bucket_lifecycle_configuration(
        Bucket=s3.bucket,
        LifecycleConfiguration={"Rules": [ABORT_INCOMPLETE_MULTIPART_UPLOADS_RULE]},  # type: ignore[list-item]
    )
    [rule] = s3.client.get_bucket_lifecycle_configuration(Bucket=s3.bucket)["Rules"]
    assert rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert rule["Status"] == "Enabled"


# --- file:// specifics -------------------------------------------------------------------


def test_file_writes_are_atomic_and_temporaries_are_invisible(tmp_path: Path) -> None:
    storage = FileStorage()
    base = f"file://{tmp_path}/out/"
    storage.write_bytes(base + "status.json", b"{}")
    assert _leftovers(tmp_path / "out") == ["status.json"]
    assert oct((tmp_path / "out/status.json").stat().st_mode & 0o777) == oct(0o644)
    # A writer that died mid-way leaves a temporary file; nobody lists or mirrors it.
    (tmp_path / "out/.tuneloop-tmp-model.bin.abc123").write_bytes(b"partial")
    assert [i.key for i in storage.list(base)] == ["status.json"]
    with pytest.raises(StorageError, match="is a directory"):
        storage.read_bytes(f"file://{tmp_path}/out")
    with pytest.raises(StorageError, match="names a directory"):
        storage.write_bytes(base, b"x")
    (tmp_path / "empty-dir").mkdir()
    assert not storage.exists(f"file://{tmp_path}/empty-dir")  # like an S3 prefix with no objects


def test_file_delete_prefix_removes_emptied_directories(tmp_path: Path) -> None:
    storage = FileStorage()
    for rel in ("p/a/b/c.txt", "p/a/d.txt", "keep.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert storage.delete_prefix(f"file://{tmp_path}/p/") == 2
    assert _leftovers(tmp_path) == ["keep.txt"]
    with pytest.raises(StorageError, match="use delete_prefix"):
        (tmp_path / "d").mkdir()
        storage.delete(f"file://{tmp_path}/d")
