"""S3 for tests: moto in server mode on 127.0.0.1, spoken to over real HTTP.

One ``ThreadedMotoServer`` runs per test session (per xdist worker); every test that uses the
``s3`` fixture starts from an empty server (``POST /moto-api/reset``) with a fresh bucket, and with
the real environment's AWS configuration (profiles, config files, CA bundles, endpoints, proxies for
localhost) kept out of the way.

Fixtures
    ``s3_server`` (session) — the running :class:`MotoS3Server`.
    ``s3`` (function) — an :class:`S3Harness`; the test credentials are also exported to
    ``os.environ`` (restored afterwards), as a user would have them in a pod.
    ``s3_no_ambient_credentials`` (function) — the same harness, but only the isolation is applied:
    no credentials in ``os.environ``. For tests proving that credentials flow by reference
    (``harness.env`` passed explicitly to a pod or subprocess) and not from the test process.
"""

from __future__ import annotations

import os
import string
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.request import OpenerDirector, ProxyHandler, Request, build_opener

import boto3
import pytest
from botocore.config import Config

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import PaginatorConfigTypeDef

#: Fake credentials; moto accepts any. Distinctive, so a leak into logs or manifests is easy to grep.
TEST_ACCESS_KEY_ID = "TUNELOOPTESTKEYID000"
TEST_SECRET_ACCESS_KEY = "tuneloop-test-secret-not-a-real-key"
TEST_REGION = "us-east-1"

_LOCAL_HOSTS = ("127.0.0.1", "localhost")
_BUCKET_CHARS = frozenset(string.ascii_lowercase + string.digits)


def _no_proxy_opener() -> OpenerDirector:
    # A proxy configured for the real environment must never see requests to the local server.
    return build_opener(ProxyHandler({}))


@dataclass
class MotoS3Server:
    """A running moto server; ``endpoint_url`` is ``http://127.0.0.1:<port>``."""

    server: ThreadedMotoServer
    host: str
    port: int

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def reset(self) -> None:
        """Forget every bucket and object (all moto backends)."""
        request = Request(f"{self.endpoint_url}/moto-api/reset", method="POST", data=b"")
        with _no_proxy_opener().open(request, timeout=30) as response:
            if response.status != 200:
                raise RuntimeError(f"moto reset failed: HTTP {response.status}")

    @classmethod
    def start(cls) -> MotoS3Server:
        from moto.server import ThreadedMotoServer  # imported on use: it loads Flask and all of moto

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        return cls(server=server, host=host, port=port)

    def stop(self) -> None:
        self.server.stop()


def make_client(endpoint_url: str, *, region: str = TEST_REGION) -> S3Client:
    """A boto3 S3 client for the test server with explicit test credentials (harness use only)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=TEST_ACCESS_KEY_ID,
        aws_secret_access_key=TEST_SECRET_ACCESS_KEY,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"}),
    )


def create_bucket(client: S3Client, name: str, *, region: str = TEST_REGION) -> str:
    if region == "us-east-1":
        client.create_bucket(Bucket=name)
    else:
        client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})  # type: ignore[typeddict-item]
    return name


def unique_bucket_name(hint: str = "tuneloop") -> str:
    """A valid, unique S3 bucket name (3-63 chars of ``[a-z0-9-]``) starting with ``hint``."""
    cleaned = "".join(c if c in _BUCKET_CHARS else "-" for c in hint.lower())
    cleaned = "-".join(part for part in cleaned.split("-") if part)[:40] or "bucket"
    return f"{cleaned}-{uuid.uuid4().hex[:12]}"


def _key_prefix(prefix: str) -> str:
    """``"a/b"``, ``"/a/b/"`` → ``"a/b/"``; ``""`` → ``""``."""
    stripped = prefix.strip("/")
    return f"{stripped}/" if stripped else ""


def upload_directory(client: S3Client, bucket: str, local_dir: Path | str, prefix: str = "") -> list[str]:
    """Upload every file under ``local_dir`` to ``s3://bucket/prefix/<relative path>``.

    Returns the keys written, sorted. Symlinks to files are followed; empty directories vanish.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(root)
    base = _key_prefix(prefix)
    keys = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = base + PurePosixPath(*path.relative_to(root).parts).as_posix()
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def list_keys(client: S3Client, bucket: str, prefix: str = "", *, page_size: int | None = None) -> list[str]:
    """All keys in ``bucket`` starting with ``prefix`` (a plain string prefix), sorted.

    Follows continuation tokens; ``page_size`` (default: the server's 1000) exists to test that.
    """
    pagination: PaginatorConfigTypeDef = {"PageSize": page_size} if page_size else {}
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, PaginationConfig=pagination)
    keys: list[str] = []
    for page in pages:
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return sorted(keys)


def download_prefix(client: S3Client, bucket: str, prefix: str, dest: Path | str) -> list[Path]:
    """Download every object under ``prefix/`` into ``dest`` keeping relative paths; returns files.

    Keys ending in ``/`` (folder markers) are skipped; a key escaping ``dest`` is refused.
    """
    target = Path(dest)
    base = _key_prefix(prefix)
    written = []
    for key in list_keys(client, bucket, base):
        relative = key[len(base) :]
        if not relative or relative.endswith("/"):
            continue
        path = (target / relative).resolve()
        if not path.is_relative_to(target.resolve()):
            raise ValueError(f"key {key!r} escapes {target}")
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(path))
        written.append(path)
    return written


@dataclass
class S3Harness:
    """What the ``s3`` fixtures yield: one empty bucket on a freshly reset moto server."""

    bucket: str
    endpoint_url: str
    client: S3Client
    #: The environment a user would give the trainer or operator (a pod's ``secretKeyRef`` env):
    #: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``.
    env: dict[str, str]
    region: str = TEST_REGION
    extra_buckets: list[str] = field(default_factory=list)

    def uri(self, key: str = "", *, bucket: str | None = None) -> str:
        """``s3://<bucket>/<key>`` (the test bucket unless ``bucket`` is given)."""
        return f"s3://{bucket or self.bucket}/{key.lstrip('/')}"

    def create_bucket(self, hint: str = "extra") -> str:
        """Another empty bucket on the same server (gone at the next reset)."""
        name = create_bucket(self.client, unique_bucket_name(hint), region=self.region)
        self.extra_buckets.append(name)
        return name

    def upload_dir(self, local_dir: Path | str, prefix: str = "", *, bucket: str | None = None) -> str:
        """Upload a directory under ``prefix/``; returns ``s3://bucket/prefix/``."""
        upload_directory(self.client, bucket or self.bucket, local_dir, prefix)
        return self.uri(_key_prefix(prefix), bucket=bucket)

    def list_keys(self, prefix: str = "", *, bucket: str | None = None) -> list[str]:
        return list_keys(self.client, bucket or self.bucket, prefix)

    def download(self, prefix: str, dest: Path | str, *, bucket: str | None = None) -> list[Path]:
        return download_prefix(self.client, bucket or self.bucket, prefix, dest)

    def put_bytes(self, key: str, data: bytes, *, bucket: str | None = None) -> None:
        self.client.put_object(Bucket=bucket or self.bucket, Key=key, Body=data)

    def get_bytes(self, key: str, *, bucket: str | None = None) -> bytes:
        return self.client.get_object(Bucket=bucket or self.bucket, Key=key)["Body"].read()


def user_env(endpoint_url: str, region: str = TEST_REGION) -> dict[str, str]:
    """The variables a user sets to point an AWS SDK at this server (the standard SDK names)."""
    return {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": region,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
    }


def isolate_aws_environment(monkeypatch: pytest.MonkeyPatch, scratch: Path) -> None:
    """Hide the real environment's AWS setup from the test process (undone by ``monkeypatch``).

    Removes every ``AWS_*`` variable (profiles, keys, session tokens, CA bundles, endpoints, web
    identity, ...), points the config and credentials files at paths that do not exist (so
    ``~/.aws`` is never read), turns off the instance-metadata lookup (which would otherwise stall
    for seconds when no credentials are found), and exempts localhost from any proxy.
    """
    for name in list(os.environ):
        if name.upper().startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(scratch / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(scratch / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("NO_PROXY", "no_proxy"):
        current = [h for h in os.environ.get(name, "").split(",") if h]
        monkeypatch.setenv(name, ",".join([*current, *(h for h in _LOCAL_HOSTS if h not in current)]))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    server = MotoS3Server.start()
    try:
        yield server
    finally:
        server.stop()


def _harness(
    server: MotoS3Server, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, scratch: Path
) -> S3Harness:
    isolate_aws_environment(monkeypatch, scratch)
    server.reset()
    client = make_client(server.endpoint_url)
    bucket = create_bucket(client, unique_bucket_name(request.node.name))
    return S3Harness(bucket=bucket, endpoint_url=server.endpoint_url, client=client, env=user_env(server.endpoint_url))


@pytest.fixture
def s3(
    s3_server: MotoS3Server,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> S3Harness:
    """A reset server, a fresh bucket, and the test credentials exported to ``os.environ``."""
    harness = _harness(s3_server, request, monkeypatch, tmp_path_factory.mktemp("aws-isolation"))
    for name, value in harness.env.items():
        monkeypatch.setenv(name, value)
    return harness


@pytest.fixture
def s3_no_ambient_credentials(
    s3_server: MotoS3Server,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
) -> S3Harness:
    """Like ``s3`` but nothing is exported: the process has no AWS credentials at all."""
    return _harness(s3_server, request, monkeypatch, tmp_path_factory.mktemp("aws-isolation"))
