"""Storage keys and URIs, without any server: safe_join against traversal, URI parsing, the choice of
backend, error messages built from S3 error responses, and what never appears in them."""

from __future__ import annotations

import posixpath
import random
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from botocore.exceptions import ClientError

from tuneloop.api.spec import Storage as StorageSettings
from tuneloop.storage import (
    FileStorage,
    InvalidUriError,
    NotFoundError,
    ObjectInfo,
    S3Storage,
    Storage,
    StorageError,
    UnsafeKeyError,
    parse_s3_uri,
    safe_join,
)
from tuneloop.storage.keys import _plan_local_paths

pytestmark = pytest.mark.unit

BASES = ["s3://bucket-a/jobs/support-bot/", "s3://bucket-a/jobs/support-bot", "file:///srv/out/job", "file:///srv/out/"]

ATTACKS = [
    # plain traversal
    "..",
    "../x",
    "../../etc/passwd",
    "a/../../b",
    "a/..",
    "a/b/../../..",
    ".",
    "./a",
    "a/./b",
    "a/.",
    # absolute and empty segments
    "/etc/passwd",
    "//evil/x",
    "a//b",
    "a/",
    "/",
    "",
    # backslashes (Windows separators; some tools normalise them to '/')
    "..\\x",
    "a\\..\\..\\b",
    "\\\\server\\share",
    "C:\\Windows",
    # control and invisible characters
    "a\x00b",
    "a\nb",
    "x\r",
    "tab\there",
    "del\x7f",
    "line\u2028sep",
    "para\u2029sep",
    "gnp.\u202eexe",  # right-to-left override: displays as "exe.png"
    "a\u2066b",
    "lone\ud800surrogate",
    # percent-encoded traversal, single and double encoded, mixed case
    "%2e%2e",
    "%2E%2E/x",
    "..%2f..%2fetc",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2e",
    "a/%2e/b",
    "%252e%252e",
    "%25252e%25252e/x",
    "%2fetc%2fpasswd",
    "a%2f%2fb",
    "a%2f",
    "%5c..%5cx",
    "..%5c",
    "a%00b",
    "a%0ab",
    ".%2e",
    "%2e.",
]

#: Unicode look-alikes of '.', '/' and '\\': no filesystem or S3 treats them as separators or dots,
#: so they are ordinary characters, kept literally and harmless.
LOOKALIKES = [
    "\uff0e\uff0e/x",  # fullwidth full stops
    "\u2025/x",  # two dot leader
    "\u2024\u2024",  # one dot leaders
    "..\u2215etc",  # '..' followed by a division slash: a single segment named like that
    "\u2215etc\u2215passwd",  # division slash
    "\uff0fetc\uff0fpasswd",  # fullwidth solidus
    "a\u2044b",  # fraction slash
    "\ufe68x",  # small reverse solidus
    "\u0430dmin.json",  # Cyrillic a
    "\u2026",  # horizontal ellipsis
    "\uff0e",
]

ACCEPTED = [
    "model.safetensors",
    "runs/3/checkpoints/step-00000100/optimizer.pt",
    "status.json",
    "...",
    "..a",
    "a..",
    ".hidden",
    "a b/c d.txt",
    "100%.txt",
    "a%20b",
    "a%2fb",  # decodes to 'a/b': still two safe segments under the prefix
    "~/x",
    "-rf",
    "$(id)",
    "C:",
    "\u00e9t\u00e9/\u65e5\u672c.txt",
    "emoji-\U0001f600.bin",
    *LOOKALIKES,
]


def _decodings(text: str) -> list[str]:
    out = [text]
    for _ in range(6):
        nxt = unquote(out[-1])
        if nxt == out[-1]:
            break
        out.append(nxt)
    return out


def _stays_under(key: str) -> bool:
    """The independent oracle: no decoding of the key climbs out, starts at '/', or uses '\\'."""
    for form in _decodings(key):
        if form.startswith("/") or "\\" in form:
            return False
        normalized = posixpath.normpath(form)
        if normalized in {".", ".."} or normalized.startswith("../"):
            return False
    return True


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("key", ATTACKS)
def test_safe_join_refuses_attack_strings(base: str, key: str) -> None:
    with pytest.raises(UnsafeKeyError) as caught:
        safe_join(base, key)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, StorageError)
    assert "refusing key" in str(caught.value) or "empty" in str(caught.value)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("key", ACCEPTED)
def test_safe_join_keeps_ordinary_and_lookalike_names_literally(base: str, key: str) -> None:
    joined = safe_join(base, key)
    assert joined == base.rstrip("/") + "/" + key  # literal: no normalisation, no decoding
    assert _stays_under(key)


@pytest.mark.parametrize("key", LOOKALIKES)
def test_lookalikes_stay_inside_the_directory_on_a_real_filesystem(tmp_path: Path, key: str) -> None:
    base = tmp_path / "out"
    base.mkdir()
    joined = safe_join(f"file://{base}", key)
    path = Path(joined.removeprefix("file://"))
    assert path.resolve().is_relative_to(base.resolve())
    assert path.resolve() != base.resolve()


@pytest.mark.parametrize("value", [None, b"model.bin", 7, Path("a/b"), ["a"], object()])
def test_safe_join_refuses_keys_that_are_not_str(value: Any) -> None:
    with pytest.raises(UnsafeKeyError, match="must be a str"):
        safe_join("s3://bucket-a/out/", value)


def test_safe_join_fuzz_against_an_independent_oracle() -> None:
    alphabet = [".", ".", "/", "\\", "%", "2", "e", "E", "f", "5", "c", "a", " ", "\x00", "\uff0e"]
    rng = random.Random(20240611)
    accepted = 0
    for _ in range(20_000):
        key = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9)))
        try:
            joined = safe_join("s3://bucket-a/out/", key)
        except UnsafeKeyError:
            continue
        accepted += 1
        assert _stays_under(key), key
        assert joined == "s3://bucket-a/out/" + key
    assert accepted > 100  # the fuzz also exercised the accepting side


def test_safe_join_bases() -> None:
    assert safe_join("s3://bucket-a", "k") == "s3://bucket-a/k"
    assert safe_join("s3://bucket-a/", "k") == "s3://bucket-a/k"
    assert safe_join("s3://bucket-a/p//", "k") == "s3://bucket-a/p/k"
    assert safe_join("file:///", "k") == "file:///k"
    with pytest.raises(InvalidUriError):
        safe_join("hf://org/model", "k")
    with pytest.raises(InvalidUriError):
        safe_join("s3://bucket-a/a/../b", "k")
    with pytest.raises(InvalidUriError):
        safe_join("file://relative/path", "k")
    with pytest.raises(InvalidUriError):
        safe_join("/plain/path", "k")


def test_safe_join_limits_key_length() -> None:
    with pytest.raises(UnsafeKeyError, match="1024-byte"):
        safe_join("s3://bucket-a/out", "x" * 1100)
    with pytest.raises(UnsafeKeyError, match="255 bytes"):
        safe_join("file:///srv/out", "x" * 256)
    assert safe_join("file:///srv/out", "x" * 255).endswith("x" * 255)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket-a", ("bucket-a", "")),
        ("s3://bucket-a/", ("bucket-a", "")),
        ("s3://bucket-a/runs/1/status.json", ("bucket-a", "runs/1/status.json")),
        ("s3://my.bucket-1/a%20b", ("my.bucket-1", "a%20b")),
        ("s3://bucket-a/dir/", ("bucket-a", "dir/")),
    ],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "s3://AB/key", "s3://a/key", "s3://a..b/k", "http://x/y", "b/k"])
def test_parse_s3_uri_refuses(uri: str) -> None:
    with pytest.raises(InvalidUriError):
        parse_s3_uri(uri)


def test_for_uri_picks_the_backend() -> None:
    assert isinstance(Storage.for_uri("file:///tmp/x"), FileStorage)
    s3 = Storage.for_uri("s3://bucket-a/x", StorageSettings(region="eu-west-1"), env={})
    assert isinstance(s3, S3Storage)
    assert s3.region == "eu-west-1"
    for bad in ("hf://org/model", "file://relative", "gs://b/k", "/abs/path", "file:///a/../b"):
        with pytest.raises(InvalidUriError):
            Storage.for_uri(bad)


def test_endpoint_and_region_resolution_from_env() -> None:
    env = {"AWS_ENDPOINT_URL": "http://generic:1", "AWS_ENDPOINT_URL_S3": "http://s3only:2", "AWS_REGION": "ap-south-1"}
    s3 = S3Storage(env=env)
    assert s3.endpoint_url == "http://s3only:2"
    assert s3.region == "ap-south-1"
    assert s3.client.meta.endpoint_url == "http://s3only:2"
    assert S3Storage(env={"AWS_ENDPOINT_URL": "http://generic:1"}).endpoint_url == "http://generic:1"
    assert S3Storage(env={"AWS_DEFAULT_REGION": "eu-north-1"}).region == "eu-north-1"
    assert S3Storage(env={}).region == "us-east-1"
    assert S3Storage(env={}).endpoint_url is None
    spec_wins = S3Storage(StorageSettings(endpoint="https://minio.example:9000", region="x-1"), env=env)
    assert (spec_wins.endpoint_url, spec_wins.region) == ("https://minio.example:9000", "x-1")


def test_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    canary = "Canary-Secret-0xDEADBEEF"
    with pytest.raises(StorageError) as caught:
        # The API refuses such an endpoint; the storage layer refuses it again (defence in depth).
        S3Storage(StorageSettings.model_construct(endpoint=f"https://user:{canary}@minio.example"), env={})
    assert canary not in str(caught.value)
    assert "spec.storage.secretRef" in str(caught.value)
    with pytest.raises(StorageError) as caught:
        S3Storage(env={"AWS_ENDPOINT_URL_S3": f"http://u:{canary}@host:9000"})
    assert canary not in str(caught.value)


@pytest.fixture(scope="module")
def plain_s3() -> S3Storage:
    """A client that is never used for requests (building one takes ~0.1 s)."""
    return S3Storage(env={})


def _client_error(code: str, message: str = "", status: int = 400, op: str = "GetObject") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "REQ123"},
    }
    return ClientError(response, op)


@pytest.mark.parametrize(
    ("code", "message", "cls", "needle"),
    [
        ("NoSuchBucket", "The specified bucket does not exist", NotFoundError, "bucket bucket-a does not exist"),
        ("NoSuchKey", "", NotFoundError, "s3://bucket-a/k does not exist"),
        ("404", "Not Found", NotFoundError, "does not exist"),
        ("AccessDenied", "Access Denied", StorageError, "check the Secret named by spec.storage.secretRef"),
        ("403", "Forbidden", StorageError, "the pod's IAM role"),
        ("InvalidAccessKeyId", "", StorageError, "AWS_ACCESS_KEY_ID"),
        ("SignatureDoesNotMatch", "", StorageError, "AWS_SECRET_ACCESS_KEY"),
        ("ExpiredToken", "", StorageError, "AWS_SESSION_TOKEN"),
        ("PermanentRedirect", "", StorageError, "set spec.storage.region"),
        ("AuthorizationHeaderMalformed", "", StorageError, "set spec.storage.region"),
        ("InvalidArgument", "x-amz-checksum-crc32 header is not supported", StorageError, "checksums: when-required"),
        ("BadDigest", "", StorageError, "corrupted in transit"),
        ("SlowDown", "", StorageError, "throttling"),
        ("WeirdCode", "something odd", StorageError, "WeirdCode (HTTP 400): something odd [request id REQ123]"),
    ],
)
def test_client_errors_become_readable_storage_errors(
    plain_s3: S3Storage, code: str, message: str, cls: type[StorageError], needle: str
) -> None:
    error = plain_s3._errors.translate(_client_error(code, message), "s3://bucket-a/k", "reading")
    assert type(error) is cls
    assert needle in str(error)
    assert error.uri == "s3://bucket-a/k"


def test_server_messages_are_redacted() -> None:
    canary = "Canary-Secret-0xDEADBEEF"
    storage = S3Storage(env={"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": canary})
    error = storage._errors.translate(_client_error("Odd", f"echoed {canary} back"), "s3://bucket-a/k", "reading")
    assert canary not in str(error)
    assert "***" in str(error)


def test_download_plan_refuses_escaping_keys_before_anything(tmp_path: Path) -> None:
    def info(key: str) -> ObjectInfo:
        return ObjectInfo(uri=f"s3://bucket-a/p/{key}", key=key, size=1, etag=None, last_modified=None)

    plan = _plan_local_paths([info("a/b.bin"), info("dir/"), info("c")], tmp_path, uri="s3://bucket-a/p/")
    assert [p for _, p in plan] == [tmp_path / "a" / "b.bin", tmp_path / "c"]
    for bad in ("../../etc/passwd", "/etc/passwd", "a/../../x", "..\\x", "%2e%2e/x", "a//b"):
        with pytest.raises(UnsafeKeyError):
            _plan_local_paths([info("ok"), info(bad)], tmp_path, uri="s3://bucket-a/p/")
    # A symlink inside the destination that points elsewhere is refused too.
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeKeyError, match="resolves outside"):
        _plan_local_paths([info("link/x")], tmp_path, uri="s3://bucket-a/p/")
