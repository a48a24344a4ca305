"""Object storage for ``s3://`` and ``file://`` URIs, shared by the trainer, the operator and the CLI.

One small interface (:class:`Storage`) with two implementations: :class:`S3Storage` (boto3, for AWS
S3 and S3-compatible stores) and :class:`FileStorage` (a local or mounted filesystem, for laptops and
tests). :meth:`Storage.for_uri` picks one. Both give the same semantics:

* **URIs are literal.** ``s3://bucket/a%20b`` names the key ``a%20b``; nothing is percent-decoded.
* **Prefixes.** :meth:`Storage.list` of ``…/data/`` lists everything under ``data/``, recursively; of
  ``…/data`` (no trailing slash) the object ``data`` itself when it exists, else everything under
  ``data/`` (never ``data2/…``). Keys in the result are relative to the prefix (a single object's
  key is its name). A directory with no files, like an S3 prefix with no objects, does not exist.
* **Keys are checked.** :func:`safe_join` builds a URI strictly under an output prefix and refuses
  anything that could climb out of it ('..', absolute keys, backslashes, empty or '.' segments,
  control characters, percent-encoded traversal). :meth:`Storage.download_prefix` refuses objects
  whose keys would land outside the destination directory, before downloading anything.
* **Atomic writes.** A reader never sees half an object: S3 PUTs and multipart completions are
  atomic; ``file://`` writes go to a temporary file in the same directory, then are renamed.
  Downloads land in a temporary file and are renamed only after they were verified.
* **Integrity.** Uploads record the file's SHA-256 in the object metadata (``x-amz-meta-sha256``)
  and, unless ``spec.storage.checksums`` is ``when-required``, ask S3 for a SHA-256 checksum too.
  Downloads always check the size, and check the SHA-256 against every reference available: the
  caller's ``expected_sha256``, the metadata, and S3's own full-object checksum. A mismatch raises
  :class:`StorageError` and leaves no partial file behind.
* **Errors** are :class:`StorageError` (or :class:`NotFoundError`) with a message naming the URI and
  what to do. Credentials never appear in messages: they are only ever taken from the standard AWS
  environment and credential chain (the pod gets them from the Secret named by
  ``spec.storage.secretRef`` via ``secretKeyRef`` env vars, or from its IAM role), never from the
  spec; botocore's own exception text is not chained onto ours.

Local-side problems (a missing source file for an upload, an unwritable destination for a download)
surface as the usual :class:`OSError`; problems with the URI side are :class:`StorageError`.

Incomplete multipart uploads
----------------------------
A pod killed during a large upload (preemption, OOM, ``activeDeadlineSeconds``) leaves an incomplete
multipart upload behind. Its parts are invisible to listings but are stored and billed until
aborted. Give the bucket a lifecycle rule that aborts them, for example after one day
(:data:`ABORT_INCOMPLETE_MULTIPART_UPLOADS_RULE`)::

    {
      "Rules": [
        {
          "ID": "tuneloop-abort-incomplete-multipart-uploads",
          "Status": "Enabled",
          "Filter": {"Prefix": ""},
          "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}
        }
      ]
    }

    aws s3api put-bucket-lifecycle-configuration --bucket <bucket> \\
        --lifecycle-configuration file://lifecycle.json

``put-bucket-lifecycle-configuration`` replaces the bucket's existing rules: merge this one into them.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Final, Literal, NoReturn
from urllib.parse import unquote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError
from s3transfer.subscribers import BaseSubscriber

from tuneloop import __version__
from tuneloop.api.spec import Storage as StorageSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef, ObjectTypeDef
    from s3transfer.futures import TransferFuture
    from s3transfer.manager import TransferManager

__all__ = [
    "ABORT_INCOMPLETE_MULTIPART_UPLOADS_RULE",
    "FileStorage",
    "InvalidUriError",
    "NotFoundError",
    "ObjectInfo",
    "PreconditionFailedError",
    "S3Storage",
    "Storage",
    "StorageError",
    "UnsafeKeyError",
    "VersionedBytes",
    "parse_s3_uri",
    "redact",
    "safe_join",
    "sha256_file",
]

logger = logging.getLogger(__name__)


# --- keeping credentials out of logs ------------------------------------------------------

_SECRET_ENV_NAMES: Final = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# A session token in a canonical request ("x-amz-security-token:…"), a header dict
# ("'X-Amz-Security-Token': b'…'"), a header list ("('X-Amz-Security-Token', '…')") or a presigned
# URL ("X-Amz-Security-Token=…").
_TOKEN_RE: Final = re.compile(r"(x-amz-security-token['\"]?\s*[:=,]\s*b?['\"]?)[^'\"\s,&})]+", re.IGNORECASE)
#: botocore loggers whose DEBUG records carry request headers (and so a session token).
_BOTOCORE_REQUEST_LOGGERS: Final = ("botocore.auth", "botocore.endpoint", "botocore.awsrequest", "botocore.httpsession")


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with session tokens and the secret values of the AWS environment replaced by ``***``."""
    text = _TOKEN_RE.sub(r"\1***", text)
    for source in (env, os.environ):
        if source is None:
            continue
        for name in _SECRET_ENV_NAMES:
            value = source.get(name)
            if value and len(value) >= 4:
                text = text.replace(value, "***")
    return text


class _RedactCredentials(logging.Filter):
    """Scrubs credentials from botocore's DEBUG records: botocore logs each request's canonical form
    and headers, which include ``X-Amz-Security-Token`` (the secret access key itself is never sent)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem, not ours
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def _install_log_redaction() -> None:
    for name in _BOTOCORE_REQUEST_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, _RedactCredentials) for f in target.filters):
            target.addFilter(_RedactCredentials())


_install_log_redaction()

MiB: Final = 1024 * 1024

#: The S3 lifecycle rule recommended for every bucket Tuneloop writes to (see the module docstring).
ABORT_INCOMPLETE_MULTIPART_UPLOADS_RULE: Final[dict[str, Any]] = {
    "ID": "tuneloop-abort-incomplete-multipart-uploads",
    "Status": "Enabled",
    "Filter": {"Prefix": ""},
    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
}

#: Object metadata key holding the hex SHA-256 of the object's content (``x-amz-meta-sha256``).
SHA256_METADATA_KEY: Final = "sha256"

#: Multipart threshold and part size for uploads and ranged downloads, and parallel requests per
#: transfer. S3 allows 10,000 parts; s3transfer raises the part size by itself for larger files.
DEFAULT_MULTIPART_THRESHOLD: Final = 64 * MiB
DEFAULT_MULTIPART_CHUNKSIZE: Final = 32 * MiB
DEFAULT_MAX_CONCURRENCY: Final = 8

#: Timeouts (seconds) and attempts of every S3 request; the environment variables below override
#: them (see :class:`S3Storage` for what they bound).
DEFAULT_S3_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_S3_READ_TIMEOUT: Final = 20.0
DEFAULT_S3_MAX_ATTEMPTS: Final = 4
S3_CONNECT_TIMEOUT_ENV: Final = "TUNELOOP_S3_CONNECT_TIMEOUT"
S3_READ_TIMEOUT_ENV: Final = "TUNELOOP_S3_READ_TIMEOUT"
S3_MAX_ATTEMPTS_ENV: Final = "TUNELOOP_S3_MAX_ATTEMPTS"
_S3_MAX_TIMEOUT: Final = 3600.0
_S3_MAX_ATTEMPTS_LIMIT: Final = 20
# botocore's standard retry mode waits rand(0, 1) × min(scale × 2 ** (i - 1), 20 s) before retry i;
# scale is 1 s for throttling errors (and for every error before botocore 1.40), 0.05 s otherwise.
_BOTOCORE_BACKOFF_SCALE: Final = 1.0
_BOTOCORE_MAX_BACKOFF: Final = 20.0
# botocore sends uploads with "Expect: 100-continue" and waits up to 1 s for the "100 Continue".
_BOTOCORE_CONTINUE_WAIT: Final = 1.0

NO_CREDENTIALS_MESSAGE: Final = (
    "no S3 credentials: set spec.storage.secretRef to a Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "or give the pod an IAM role"
)

_TMP_PREFIX: Final = ".tuneloop-tmp-"
_BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HEX_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
_S3_KEY_MAX_BYTES: Final = 1024
_NAME_MAX_BYTES: Final = 255
# Characters that re-order how a name is displayed; a name using them can pass for another one.
_BIDI_CONTROLS: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_ChecksumMode = Literal["when_supported", "when_required"]
_CHECKSUM_MODES: Final[dict[str, _ChecksumMode]] = {
    "when-supported": "when_supported",
    "when-required": "when_required",
}


# --- errors and results -----------------------------------------------------------------


class StorageError(Exception):
    """A storage operation failed. The message names the URI and what to do about it.

    ``uri`` is the URI concerned (when there is one) and ``code`` the S3 error code (``NoSuchKey``,
    ``AccessDenied``…) or another short reason (``integrity``, ``connection``).
    """

    def __init__(self, message: str, *, uri: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri
        self.code = code


class NotFoundError(StorageError):
    """The object, prefix or bucket does not exist."""


class UnsafeKeyError(StorageError, ValueError):
    """A key or name could escape the prefix or directory it is meant to stay under.

    ``key`` is the refused key, shown repr-escaped and bounded, and ``problem`` why (``it has a
    '..' segment``), when a key was refused: callers can say so without the paths in the message."""

    def __init__(self, message: str, *, key: str | None = None, problem: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.problem = problem


class InvalidUriError(StorageError, ValueError):
    """The string is not a URI this module can handle."""


class PreconditionFailedError(StorageError):
    """A conditional write lost: the object already exists (:meth:`Storage.create_bytes`) or is no
    longer the version the caller read (:meth:`Storage.replace_bytes`). Re-read it and decide again."""


@dataclass(frozen=True)
class VersionedBytes:
    """An object's content with the version token a conditional replace needs."""

    data: bytes
    etag: str
    """S3: the ETag without quotes; files: the SHA-256 of the content."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object (or file) found by :meth:`Storage.list`."""

    uri: str
    """The object's full URI; pass it to the other methods as is."""
    key: str
    """'/'-separated name relative to the listed prefix (a single object's key is its name)."""
    size: int
    etag: str | None
    """S3 ETag without quotes; ``None`` for files."""
    last_modified: datetime | None
    """Timezone-aware (UTC)."""


# --- helpers ----------------------------------------------------------------------------


def sha256_file(path: Path | str) -> str:
    """The hex SHA-256 of a file's content, read in chunks."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")``; the key may be empty (bucket root).

    The key is taken literally (no percent-decoding). Raises :class:`InvalidUriError`.
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise InvalidUriError(
            f"{_show(uri)} is not an s3:// URI; write it as s3://<bucket>/<key>", uri=_str_or_none(uri)
        )
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise InvalidUriError(f"{uri!r} has an empty bucket name; write s3://<bucket>/<key>", uri=uri)
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise InvalidUriError(
            f"{bucket!r} in {uri!r} is not a valid S3 bucket name "
            "(3-63 characters: lowercase letters, digits, '.', '-')",
            uri=uri,
        )
    return bucket, key


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _show(value: object, limit: int = 200) -> str:
    """A bounded repr for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _key_problem(key: str) -> str | None:
    """Why ``key`` (one decoding of it) is not a safe relative key, or ``None``."""
    if key.startswith("/"):
        return "it is absolute (starts with '/')"
    if "\\" in key:
        return "it contains a backslash"
    for ch in key:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs", "Zl", "Zp") or ch in _BIDI_CONTROLS:
            return f"it contains the control or invisible character U+{ord(ch):04X}"
    for segment in key.split("/"):
        if segment == "":
            return "it has an empty segment ('//', or a leading or trailing '/')"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment"
    return None


def _check_relative_key(key: object, *, context: str) -> str:
    """Return ``key`` if it is a safe '/'-separated relative key, else raise :class:`UnsafeKeyError`.

    The key and each percent-decoding of it (so ``%2e%2e`` and ``%252e%252e`` count as ``..``)
    must be non-empty, relative, free of backslashes and control characters, and made of segments
    that are neither empty nor '.' nor '..'. Anything else (including Unicode look-alikes of '.' or
    '/') is kept literally: S3 and POSIX filesystems give such characters no special meaning.
    """
    if not isinstance(key, str):
        raise UnsafeKeyError(f"{context}: a key must be a str, got {type(key).__name__}")
    if not key:
        raise UnsafeKeyError(f"{context}: the key is empty; name an object under the prefix")
    variants = [key]
    decoded = key
    for _ in range(4):  # '%' survives decoding only through double encoding; a few rounds are plenty
        if "%" not in decoded:
            break
        once = unquote(decoded, errors="replace")
        if once == decoded:
            break
        variants.append(once)
        decoded = once
    for variant in variants:
        problem = _key_problem(variant)
        if problem:
            why = problem + (" once percent-decoded" if variant is not key else "")
            raise UnsafeKeyError(
                f"{context}: refusing key {_show(key)}: {why}; use a plain relative name", key=_show(key), problem=why
            )
    return key


def safe_join(base_uri: str, relative_key: str) -> str:
    """The URI of ``relative_key`` strictly under ``base_uri`` (an ``s3://`` or ``file://`` prefix).

    ``base_uri`` is treated as a directory whether or not it ends with '/'. ``relative_key`` is
    checked as described in :func:`_check_relative_key` (a crafted name can never point outside
    the prefix) and appended literally. Raises :class:`UnsafeKeyError` (a ``ValueError``).
    """
    context = f"joining onto {_show(base_uri)}"
    key = _check_relative_key(relative_key, context=context)
    if not isinstance(base_uri, str):
        raise InvalidUriError(f"base URI must be a str, got {type(base_uri).__name__}")
    if base_uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(base_uri)
        prefix = prefix.rstrip("/")
        if prefix and any(seg in (".", "..") for seg in prefix.split("/")):
            raise InvalidUriError(
                f"base URI {base_uri!r} has a '.' or '..' segment; write the full prefix", uri=base_uri
            )
        full_key = f"{prefix}/{key}" if prefix else key
        if len(full_key.encode("utf-8")) > _S3_KEY_MAX_BYTES:
            raise UnsafeKeyError(f"{context}: the object key would exceed S3's {_S3_KEY_MAX_BYTES}-byte limit")
        return f"s3://{bucket}/{full_key}"
    if base_uri.startswith("file://"):
        base_path = _file_path(base_uri)
        if any(len(seg.encode("utf-8")) > _NAME_MAX_BYTES for seg in key.split("/")):
            raise UnsafeKeyError(f"{context}: a path segment of {_show(key)} exceeds {_NAME_MAX_BYTES} bytes")
        base = base_path.as_posix().rstrip("/")
        return f"file://{base}/{key}"
    raise InvalidUriError(f"{_show(base_uri)} is not an s3:// or file:// URI", uri=base_uri)


def _file_path(uri: str) -> Path:
    """``file:///abs/path`` → ``Path("/abs/path")`` (literal; no percent-decoding)."""
    if not isinstance(uri, str) or not uri.startswith("file:///"):
        raise InvalidUriError(
            f"{_show(uri)} is not a file:// URI with an absolute path; write file:///path/to/data (three slashes)",
            uri=_str_or_none(uri),
        )
    raw = uri[len("file://") :]
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in raw):
        raise InvalidUriError(f"{_show(uri)} contains control characters", uri=uri)
    if any(seg in (".", "..") for seg in raw.split("/")):
        raise InvalidUriError(f"{uri!r} contains a '.' or '..' segment; write the full path", uri=uri)
    return Path(raw)


def _file_uri(path: Path) -> str:
    return f"file://{path.as_posix()}"


def _normalize_sha256(value: str, *, what: str) -> str:
    text = value.strip().lower()
    if not _HEX_SHA256_RE.match(text):
        raise ValueError(f"{what} must be 64 hexadecimal characters, got {_show(value)}")
    return text


@dataclass(frozen=True)
class _Verification:
    """What a downloaded copy must match: its size, and SHA-256 digests from named sources."""

    size: int
    sha256: tuple[tuple[str, str], ...]  # (source, hex digest)
    etag: str | None = None


def _verify(tmp: Path, check: _Verification, *, uri: str, digest: str | None = None) -> None:
    """Raise :class:`StorageError` if the file at ``tmp`` does not match ``check``."""
    actual_size = tmp.stat().st_size
    if actual_size != check.size:
        raise StorageError(
            f"integrity check failed for {uri}: downloaded {actual_size} bytes, the object has {check.size}; "
            "the object changed during the download or the transfer was cut short; retry "
            "(the destination was left as it was)",
            uri=uri,
            code="integrity",
        )
    if not check.sha256:
        return
    actual = digest or sha256_file(tmp)
    for source, expected in check.sha256:
        if actual != expected:
            raise StorageError(
                f"integrity check failed for {uri}: its SHA-256 is {actual}, but {source} says {expected}; "
                "the object is corrupt or was replaced; re-upload it or fix the expected checksum "
                "(the destination was left as it was)",
                uri=uri,
                code="integrity",
            )


def _tmp_beside(dest: Path) -> Path:
    """A new, empty temporary file in ``dest``'s directory (created, so the name is ours)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f"{_TMP_PREFIX}{dest.name[:100]}.")
    os.close(fd)
    return Path(name)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary file onto ``dest`` with ordinary permissions."""
    tmp.chmod(0o644)
    tmp.replace(dest)
    _fsync_dir(dest.parent)


def _plan_local_paths(infos: Sequence[ObjectInfo], dest_dir: Path, *, uri: str) -> list[tuple[ObjectInfo, Path]]:
    """Where each listed object goes under ``dest_dir``; refuses (before any download) keys that escape."""
    root = dest_dir.resolve()
    plan = []
    for info in infos:
        if info.key.endswith("/"):
            continue  # a "folder" marker object, not a file
        key = _check_relative_key(info.key, context=f"downloading {uri} into {dest_dir}")
        target = dest_dir.joinpath(*key.split("/"))
        if not target.resolve().is_relative_to(root):  # e.g. a symlink inside dest_dir
            raise UnsafeKeyError(
                f"downloading {uri}: refusing key {_show(key)}: it resolves outside {dest_dir}",
                key=_show(key),
                problem="it resolves outside the download folder",
            )
        plan.append((info, target))
    return plan


# --- the interface ----------------------------------------------------------------------


class Storage(ABC):
    """Read and write objects by URI. Get one with :meth:`for_uri`; reuse it (it holds a client)."""

    scheme: str = ""

    @staticmethod
    def for_uri(uri: str, settings: StorageSettings | None = None, *, env: Mapping[str, str] | None = None) -> Storage:
        """The storage for ``uri``'s scheme: :class:`S3Storage` for ``s3://``, :class:`FileStorage` for ``file://``.

        ``settings`` is the job's ``spec.storage`` (only used for S3); ``env`` replaces
        ``os.environ`` for the endpoint and region, and supplies the key pair when it holds one
        (otherwise botocore's standard credential chain applies; see :class:`S3Storage`).
        """
        if isinstance(uri, str) and uri.startswith("s3://"):
            parse_s3_uri(uri)
            return S3Storage(settings, env=env)
        if isinstance(uri, str) and uri.startswith("file://"):
            _file_path(uri)
            return FileStorage()
        scheme = uri.split("://", 1)[0] + "://" if isinstance(uri, str) and "://" in uri else None
        hint = f"{scheme} is not object storage; " if scheme else ""
        raise InvalidUriError(
            f"{_show(uri)}: {hint}storage URIs are s3://<bucket>/<key> or file:///<absolute path>",
            uri=_str_or_none(uri),
        )

    @abstractmethod
    def list(self, uri: str) -> list[ObjectInfo]:
        """Objects under a prefix (recursively), or the single object ``uri`` names; sorted by key.

        S3 "folder" markers (keys ending in '/', as consoles create) are not objects here, just as
        directories are not files: they are left out.
        """

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether ``uri`` is an object, or a prefix with at least one object under it."""

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes:
        """The object's content; :class:`NotFoundError` when it is missing."""

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes, *, content_type: str | None = None) -> None:
        """Create or replace the object, atomically."""

    def read_json(self, uri: str) -> Any:
        """The object parsed as JSON."""
        data = self.read_bytes(uri)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{uri} is not valid JSON ({exc}); rewrite or remove the object", uri=uri) from None

    def write_json(self, uri: str, obj: Any) -> None:
        """Write ``obj`` as indented UTF-8 JSON, atomically.

        Like :func:`json.dumps`, NaN and infinities are written as ``NaN``/``Infinity`` (a diverged
        loss must not crash a heartbeat); Python's :func:`json.loads` reads them back.
        """
        data = json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
        self.write_bytes(uri, data, content_type="application/json")

    @abstractmethod
    def upload_file(self, path: Path, uri: str, *, sha256: str | None = None) -> None:
        """Copy a local file to ``uri`` (multipart and parallel for large files on S3).

        ``sha256`` is the file's hex SHA-256 when the caller already computed it (a checkpoint
        manifest does); otherwise it is computed. It is stored with the object for later checks.
        """

    @abstractmethod
    def download_file(self, uri: str, dest: Path, *, expected_sha256: str | None = None) -> None:
        """Copy the object to ``dest`` atomically, after checking its size and SHA-256.

        The SHA-256 is checked against ``expected_sha256`` and whatever the object itself records.
        On a mismatch: :class:`StorageError`, and ``dest`` is left as it was.
        """

    def upload_dir(self, directory: Path, uri: str) -> builtins.list[str]:
        """Upload every file under ``directory`` to ``uri``/<relative path>; returns the URIs, sorted.

        Names are joined with :func:`safe_join`: a file whose name is not a safe key (a backslash,
        a control character…) is refused before anything is uploaded. Symlinks to files are
        followed; symlinked directories are not entered; empty directories vanish.
        """
        root = Path(directory)
        if not root.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        items = [(path, safe_join(uri, key)) for path, key in _local_files(root)]
        self._upload_many(items)
        return sorted(target for _, target in items)

    def download_prefix(self, uri: str, dest_dir: Path) -> builtins.list[Path]:
        """Mirror every object under ``uri`` into ``dest_dir``; returns the files written, sorted.

        Each file is verified and written atomically. Object keys that would land outside
        ``dest_dir`` ('..', absolute, backslashes…) are refused with :class:`UnsafeKeyError`
        before anything is downloaded. Keys ending in '/' (folder markers) are skipped.
        """
        dest = Path(dest_dir)
        plan = _plan_local_paths(self.list(uri), dest, uri=uri)
        self._download_many([(info.uri, path, None) for info, path in plan])
        return sorted(path for _, path in plan)

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    @abstractmethod
    def delete_prefix(self, uri: str) -> int:
        """Delete what :meth:`list` returns for ``uri`` (and S3 folder markers under it); returns how
        many objects were deleted. Refuses a whole bucket or the filesystem root."""

    # -- conditional writes: claims that must be won by exactly one writer --

    @abstractmethod
    def create_bytes(self, uri: str, data: bytes, *, content_type: str | None = None) -> None:
        """Create the object only if it does not exist, atomically; :class:`PreconditionFailedError`
        if it does (S3: ``If-None-Match: *``; files: a hard link, which fails on an existing name).
        Two writers racing for the same name: exactly one wins."""

    @abstractmethod
    def read_versioned(self, uri: str) -> VersionedBytes:
        """The object's content and version token (for :meth:`replace_bytes`); :class:`NotFoundError`
        when it is missing."""

    @abstractmethod
    def replace_bytes(self, uri: str, data: bytes, *, etag: str, content_type: str | None = None) -> None:
        """Replace the object only if it is still the version ``etag`` names (S3: ``If-Match``; files:
        under a lock, comparing content); :class:`PreconditionFailedError` otherwise."""

    @abstractmethod
    def list_dirs(self, uri: str) -> builtins.list[str]:
        """Names of the immediate "sub-directories" of the prefix ``uri`` (S3: common prefixes with
        the delimiter '/'; files: directories), sorted; without listing what is inside them."""

    # Batch primitives behind upload_dir/download_prefix; implementations may parallelise them.
    def _upload_many(self, items: Sequence[tuple[Path, str]]) -> None:
        for path, target in items:
            self.upload_file(path, target)

    def _download_many(self, items: Sequence[tuple[str, Path, str | None]]) -> None:
        for source, dest, expected in items:
            self.download_file(source, dest, expected_sha256=expected)

    # -- streaming and ranged reads: looking into objects without downloading them --

    def open_read(self, uri: str, *, etag: str | None = None) -> BinaryIO:
        """A stream of the object's content, read from the start without holding it in memory.

        Close it (use it in a ``with`` block); closing early abandons the rest of the object.
        Errors while reading are :class:`StorageError`, like every other call. ``etag``: read the
        object only while it is still that version (S3: ``If-Match``), else
        :class:`PreconditionFailedError`; ignored where objects have no ETags (files). This
        default reads the whole object at once; :class:`S3Storage` and :class:`FileStorage` stream.
        Nothing is checked against a recorded SHA-256: use :meth:`read_bytes` or
        :meth:`download_file` where the content must be verified.
        """
        del etag
        return io.BytesIO(self.read_bytes(uri))

    def read_range(self, uri: str, start: int, end: int, *, etag: str | None = None) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive, like a slice) of the object; fewer when it ends sooner,
        none when it ends before ``start``. ``etag`` as in :meth:`open_read`."""
        del etag
        _check_range(uri, start, end)
        return self.read_bytes(uri)[start:end]


def _local_files(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, '/'-separated relative key) for every file under ``root``, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames):
            path = base / name
            if path.is_file():
                yield path, PurePosixPath(*path.relative_to(root).parts).as_posix()


# --- S3 ---------------------------------------------------------------------------------


class _PinObject(BaseSubscriber):
    """Tell s3transfer the size and ETag we already know, so it skips its own HEAD and every
    ranged GET carries ``If-Match`` with the ETag we verified against."""

    def __init__(self, size: int, etag: str | None) -> None:
        self._size = size
        self._etag = etag

    def on_queued(self, future: TransferFuture, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)
        if self._etag is not None:
            future.meta.provide_object_etag(self._etag)


def _display_endpoint(endpoint: str | None) -> str:
    """The endpoint for messages: scheme, host and port only (never userinfo or a query)."""
    if not endpoint:
        return "the AWS S3 endpoint"
    parts = urlsplit(endpoint)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def _check_endpoint(endpoint: str, *, source: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"{source} must be an http:// or https:// URL, e.g. https://minio.example:9000")
    if "@" in parts.netloc:
        # Never echo the value: it holds a credential.
        raise StorageError(
            f"{source} must not contain credentials (user:password@host); "
            "put them in the Secret named by spec.storage.secretRef"
        )
    return endpoint


def s3_request_time_bound(connect_timeout: float, read_timeout: float, max_attempts: int) -> float:
    """The longest one small S3 request can take to fail, in seconds, when the endpoint never answers.

    Each attempt waits at most ``connect_timeout`` to connect, 1 s for a "100 Continue" (requests
    with a body) and ``read_timeout`` for the answer; before attempt i + 1, botocore's standard retry
    mode waits at most min(2 ** (i - 1), 20) s (its largest back-off scale, for throttling errors;
    other errors wait 1/20 of that). Not covered: DNS resolution, and a host with several addresses,
    each of which may take ``connect_timeout``.
    """
    backoff = sum(min(_BOTOCORE_BACKOFF_SCALE * 2.0 ** (i - 1), _BOTOCORE_MAX_BACKOFF) for i in range(1, max_attempts))
    return max_attempts * (connect_timeout + _BOTOCORE_CONTINUE_WAIT + read_timeout) + backoff


def _seconds_setting(raw: str | None, name: str, default: float) -> float:
    """A timeout from an environment variable (unset or blank: ``default``)."""
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        value = -1.0
    if not 0 < value <= _S3_MAX_TIMEOUT:  # also refuses nan and inf
        raise StorageError(
            f"{name}={_show(raw)} is not valid: expected a number of seconds greater than 0 and at most "
            f"{_S3_MAX_TIMEOUT:g}, e.g. {name}=20",
            code="config",
        )
    return value


def _attempts_setting(raw: str | None, name: str, default: int) -> int:
    """A number of attempts from an environment variable (unset or blank: ``default``)."""
    if raw is None or not raw.strip():
        return default
    text = raw.strip()
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= _S3_MAX_ATTEMPTS_LIMIT):
        raise StorageError(
            f"{name}={_show(raw)} is not valid: expected a whole number of attempts from 1 to "
            f"{_S3_MAX_ATTEMPTS_LIMIT} (1: no retries), e.g. {name}=4",
            code="config",
        )
    return int(text)


_ATTEMPT_STARTED: Final = "tuneloop_attempt_started"
_ATTEMPT_FAILURE: Final = "tuneloop_attempt_failure"
#: How the reading of an answer's body breaks off (connection reset, truncated, stalled).
_BROKEN_BODY_ERRORS: Final = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError)
_RETRIED_ERROR_CODES: Final = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
    }
)


class _RetryReporter:
    """Logs one WARNING on ``tuneloop.storage`` for each retry of an S3 request, so that a slow or
    stalled store shows progress (on the console of ``tuneloop run``, in pod logs) instead of silence.

    It only observes botocore's events and returns nothing, so botocore's own retry handler alone
    decides whether and when to retry: after each attempt (``needs-retry``) it notes why the attempt
    failed; before each attempt (``request-created``, after botocore's back-off) it reports the
    failure that led to it. A failure botocore does not retry is reported by the StorageError alone.
    Only the host contacted, the operation, bucket and key and the error's class or status are
    logged; never headers, signatures or credentials.
    """

    def __init__(self, max_attempts: int, timeouts: str, redact: Callable[[str], str]) -> None:
        self.max_attempts = max_attempts
        self.timeouts = timeouts
        self._redact = redact

    def register(self, events: Any) -> None:
        events.register("request-created.s3", self.attempt_starts, unique_id="tuneloop-retry-report-start")
        events.register_last("needs-retry.s3", self.attempt_ended, unique_id="tuneloop-retry-report-end")

    @staticmethod
    def _problem(response: Any, caught: BaseException | None) -> tuple[str, str] | None:
        """(what the endpoint did, the error's class or HTTP status) for a failure botocore may retry."""
        if caught is not None:
            verb = "is not answering" if isinstance(caught, (ConnectTimeoutError, ReadTimeoutError)) else "failed"
            return verb, type(caught).__name__
        if not isinstance(response, tuple) or len(response) != 2:
            return None
        http_response, parsed = response
        status = getattr(http_response, "status_code", None)
        error = parsed.get("Error", {}) if isinstance(parsed, dict) else {}
        code = str(error.get("Code", "")) if isinstance(error, dict) else ""
        if not (isinstance(status, int) and (status >= 500 or status == 429)) and code not in _RETRIED_ERROR_CODES:
            return None
        return "answered", f"HTTP {status} {code}".rstrip()

    def attempt_ended(self, **kwargs: Any) -> None:
        try:
            self._note_failure(**kwargs)
        except Exception:  # a report must never turn into a failed request
            logger.debug("could not note a failed S3 attempt", exc_info=True)

    def attempt_starts(self, **kwargs: Any) -> None:
        try:
            self._report_retry(**kwargs)
        except Exception:  # a report must never turn into a failed request
            logger.debug("could not report an S3 retry", exc_info=True)

    def _note_failure(self, request_dict: Any = None, response: Any = None, **kwargs: Any) -> None:
        context = request_dict.get("context") if isinstance(request_dict, dict) else None
        if not isinstance(context, dict):
            return
        problem = self._problem(response, kwargs.get("caught_exception"))
        if problem is None:
            context.pop(_ATTEMPT_FAILURE, None)
        else:
            context[_ATTEMPT_FAILURE] = (problem, _display_endpoint(request_dict.get("url")), time.monotonic())

    def _report_retry(self, request: Any = None, operation_name: str = "request", **kwargs: Any) -> None:
        context = getattr(request, "context", None)
        if not isinstance(context, dict):
            return
        now = time.monotonic()
        started = context.get(_ATTEMPT_STARTED)
        context[_ATTEMPT_STARTED] = now
        failure = context.pop(_ATTEMPT_FAILURE, None)
        if failure is None:
            return
        (verb, detail), host, failed_at = failure
        retries = context.get("retries")
        attempt = retries.get("attempt", "?") if isinstance(retries, dict) else "?"
        params = context.get("input_params")
        params = params if isinstance(params, dict) else {}
        target = operation_name
        if params.get("Bucket"):
            target += f" s3://{params['Bucket']}/{params.get('Key') or params.get('Prefix') or ''}"
        took = f" after {failed_at - started:.1f} s" if isinstance(started, float) else ""
        logger.warning(
            "S3 %s %s (%s%s) for %s; retrying: attempt %s of %d, after a %.1f s back-off (%s)",
            host,
            verb,
            detail,
            took,
            self._redact(target),
            attempt,
            self.max_attempts,
            now - failed_at,
            self.timeouts,
        )


class S3Storage(Storage):
    """Storage on AWS S3 or an S3-compatible store (MinIO, Ceph, …), through boto3.

    Where things come from:

    * **endpoint**: ``settings.endpoint``, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``,
      else AWS. (boto's own endpoint lookup is switched off so that ``env`` is authoritative.)
    * **region**: ``settings.region``, else ``AWS_REGION``, else ``AWS_DEFAULT_REGION``, else ``us-east-1``.
    * **credentials**: never from ``settings``. When ``env`` is given and holds ``AWS_ACCESS_KEY_ID``
      and ``AWS_SECRET_ACCESS_KEY`` (and optionally ``AWS_SESSION_TOKEN``), those; otherwise
      botocore's standard chain: environment variables, ``AWS_PROFILE``/config files, web identity
      (IRSA, EKS Pod Identity), container and instance metadata.

    ``env`` defaults to ``os.environ``. The client sends flexible checksums per
    ``settings.checksums`` and identifies itself as ``tuneloop/<version>``. ``transfer_config``
    overrides the multipart threshold, part size and concurrency (tests set small ones).

    **Timeouts and retries.** Each request is tried at most ``max_attempts`` times in all
    (``TUNELOOP_S3_MAX_ATTEMPTS``, default 4; 1: no retries), in botocore's ``standard`` retry mode
    (connection errors, timeouts, 5xx and throttling answers are retried). Each attempt waits at most
    ``connect_timeout`` seconds to connect (``TUNELOOP_S3_CONNECT_TIMEOUT``, default 5) and
    ``read_timeout`` seconds for data of the answer (``TUNELOOP_S3_READ_TIMEOUT``, default 20).
    Arguments win over the variables; the variables are read from ``env``, then from the process
    environment (so the operator's own settings apply to clients made with a job's credentials);
    a value that is not a number of seconds in (0, 3600], or a whole number of attempts from 1 to 20,
    raises :class:`StorageError` (code ``config``) naming the variable.

    The timeouts bound each socket operation (urllib3 sets them on the socket), not a transfer: a
    large multipart upload or download on a slow link works as long as data keeps moving. The read
    timeout bounds each wait for bytes of the answer, including the store's time to answer after the
    last byte of a part was sent; urllib3 applies the connect timeout to each blocked send of request
    data too (so a send must make progress, 16 KiB at a time, within it). Raise them for a store
    that takes longer to answer.

    Each retry logs one WARNING on ``tuneloop.storage`` (the host, the error, the operation and URI,
    the attempt number; never credentials), so a stalled store shows progress on the console and in
    pod logs. When every attempt failed without an answer, :class:`StorageError` with code
    ``connection`` names the endpoint, the URI and what to check; callers treat it as transient.

    **Bound.** One small request to an endpoint that accepts no connection or never answers fails
    within ``max_attempts × (connect_timeout + 1 s + read_timeout)`` (the 1 s: botocore's wait for
    "100 Continue" before sending an upload's body) plus botocore's back-off of at most
    min(2^(i-1), 20) s before retry i (:func:`s3_request_time_bound`); with the defaults
    4 × (5 + 1 + 20) + (1 + 2 + 4) = 111 s (botocore >= 1.40 backs off 1/20 as long after errors
    that are not throttling: 104.4 s). Not included: DNS lookups (the resolver's own timeouts), one
    connect timeout per address of a host with several, a store that trickles bytes slower than one
    per read timeout, and up to 5 s more per retry when a store answers with ``x-amz-retry-after``.
    An operation of several requests (a listing of many pages, a multipart transfer) fails within
    that bound once a request stalls, except that s3transfer retries a download whose data stalls
    mid-way up to 5 times, each with the retries above, and that :meth:`read_bytes`,
    :meth:`read_versioned` and :meth:`read_range` make their request again, and :meth:`open_read`
    streams ask for the rest (a ranged GET pinned to the ETag), when the answer's body breaks off
    mid-way (a reset, a truncated body, a read timeout), which botocore does not retry: up to
    ``max_attempts`` times in all, 0.1 × 2^(i-1) s apart.

    **Lost answers.** When the answer to a conditional write (:meth:`create_bytes`,
    :meth:`replace_bytes`) is lost after the store applied it, botocore's retry loses the condition
    to that first attempt; a retried write that lost its condition and finds exactly its own bytes
    in the object counts as done, so a claim is not mistaken for someone else's.
    """

    scheme = "s3"

    def __init__(
        self,
        settings: StorageSettings | None = None,
        *,
        env: Mapping[str, str] | None = None,
        transfer_config: TransferConfig | None = None,
        max_attempts: int | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self.settings = settings or StorageSettings()
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._explicit_env = env is not None
        if max_attempts is None:
            max_attempts = _attempts_setting(
                self._setting(S3_MAX_ATTEMPTS_ENV), S3_MAX_ATTEMPTS_ENV, DEFAULT_S3_MAX_ATTEMPTS
            )
        if connect_timeout is None:
            connect_timeout = _seconds_setting(
                self._setting(S3_CONNECT_TIMEOUT_ENV), S3_CONNECT_TIMEOUT_ENV, DEFAULT_S3_CONNECT_TIMEOUT
            )
        if read_timeout is None:
            read_timeout = _seconds_setting(
                self._setting(S3_READ_TIMEOUT_ENV), S3_READ_TIMEOUT_ENV, DEFAULT_S3_READ_TIMEOUT
            )
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        #: Seconds within which one small request to an endpoint that never answers has failed.
        self.request_time_bound = s3_request_time_bound(connect_timeout, read_timeout, max_attempts)
        self.endpoint_url = self._resolve_endpoint()
        self.region = (
            self.settings.region or self._env.get("AWS_REGION") or self._env.get("AWS_DEFAULT_REGION") or "us-east-1"
        )
        self.transfer_config = transfer_config or TransferConfig(
            multipart_threshold=DEFAULT_MULTIPART_THRESHOLD,
            multipart_chunksize=DEFAULT_MULTIPART_CHUNKSIZE,
            max_concurrency=DEFAULT_MAX_CONCURRENCY,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        concurrency = int(getattr(self.transfer_config, "max_request_concurrency", DEFAULT_MAX_CONCURRENCY))
        checksums = _CHECKSUM_MODES[self.settings.checksums]
        self.client_config = Config(
            region_name=self.region,
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            s3={"addressing_style": self.settings.addressing_style},
            request_checksum_calculation=checksums,
            response_checksum_validation=checksums,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            tcp_keepalive=True,
            max_pool_connections=max(10, 2 * concurrency),
            user_agent_extra=f"tuneloop/{__version__}",
            # The endpoint is resolved above, from `env`; boto must not pick another from os.environ
            # or ~/.aws/config. (Supported since botocore 1.31; botocore-stubs 1.43 lacks it.)
            ignore_configured_endpoint_urls=True,  # type: ignore[call-arg]
        )
        try:
            session = self._session()
            self.client: S3Client = session.client("s3", endpoint_url=self.endpoint_url, config=self.client_config)
        except (BotoCoreError, ValueError) as exc:
            raise StorageError(f"cannot set up the S3 client: {type(exc).__name__}: {self._redact(str(exc))}") from None
        self._timeouts = f"timeouts: connect {connect_timeout:g} s, read {read_timeout:g} s"
        _RetryReporter(max_attempts, self._timeouts, self._redact).register(self.client.meta.events)

    # -- setup --

    def _setting(self, name: str) -> str | None:
        """A tuning variable, from ``env``, else from the process environment."""
        value = self._env.get(name)
        return os.environ.get(name) if value is None and self._explicit_env else value

    def _resolve_endpoint(self) -> str | None:
        if self.settings.endpoint:
            return _check_endpoint(self.settings.endpoint, source="spec.storage.endpoint")
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            value = self._env.get(name)
            if value:
                return _check_endpoint(value, source=name)
        return None

    def _session(self) -> boto3.session.Session:
        key_id = self._env.get("AWS_ACCESS_KEY_ID") if self._explicit_env else None
        secret = self._env.get("AWS_SECRET_ACCESS_KEY") if self._explicit_env else None
        if key_id and secret:
            return boto3.session.Session(
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                aws_session_token=self._env.get("AWS_SESSION_TOKEN") or None,
                region_name=self.region,
            )
        profile = self._env.get("AWS_PROFILE") if self._explicit_env else None
        return boto3.session.Session(profile_name=profile or None, region_name=self.region)

    @property
    def checksums_enabled(self) -> bool:
        """Whether uploads ask S3 for SHA-256 checksums (``spec.storage.checksums: when-supported``)."""
        return self.settings.checksums == "when-supported"

    # -- errors --

    def _redact(self, text: str) -> str:
        return redact(text, self._env)

    def _error(self, exc: BaseException, uri: str, action: str) -> StorageError:
        """Translate a botocore/s3transfer exception into a :class:`StorageError` with advice."""
        while isinstance(exc, TransferRetriesExceededError) and exc.last_exception is not None:
            exc = exc.last_exception
        where = f"({action} {uri})"
        endpoint = _display_endpoint(self.endpoint_url)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
            return StorageError(f"{NO_CREDENTIALS_MESSAGE} {where}", uri=uri, code="NoCredentials")
        if isinstance(exc, ProfileNotFound):
            return StorageError(
                f"the AWS profile named by AWS_PROFILE does not exist {where}", uri=uri, code="ProfileNotFound"
            )
        if isinstance(exc, ClientError):
            return self._client_error(exc, uri, action)
        if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
            return StorageError(
                f"{endpoint} is not answering {where}: {type(exc).__name__} on each of up to {self.max_attempts} "
                f"attempts ({self._timeouts}); check that the store is up and that spec.storage.endpoint and the "
                "network path (NetworkPolicy, proxy, firewall, DNS) lead to it; for a store that is slow to answer, "
                f"raise {S3_READ_TIMEOUT_ENV}",
                uri=uri,
                code="connection",
            )
        if isinstance(exc, (HTTPClientError, BotoConnectionError)):
            return StorageError(
                f"cannot reach {endpoint} {where}: {type(exc).__name__}; check spec.storage.endpoint, "
                "spec.storage.region and the network path (NetworkPolicy, proxy, DNS)",
                uri=uri,
                code="connection",
            )
        if isinstance(exc, FlexibleChecksumError):
            return StorageError(
                f"the checksum of the data received for {uri} does not match the one S3 sent; "
                "the data was corrupted in transit or at rest; retry, and re-upload the object if it persists",
                uri=uri,
                code="integrity",
            )
        if isinstance(exc, ParamValidationError):
            return StorageError(f"invalid S3 request {where}: {self._redact(str(exc))}", uri=uri, code="invalid")
        return StorageError(
            f"S3 {action} of {uri} failed: {type(exc).__name__}: {self._redact(str(exc))[:300]}", uri=uri, code="error"
        )

    def _no_such_bucket(self, bucket: str, uri: str, action: str) -> NotFoundError:
        return NotFoundError(
            f"bucket {bucket} does not exist ({action} {uri}); check the bucket name in the URI, "
            f"and spec.storage.endpoint ({_display_endpoint(self.endpoint_url)}) and spec.storage.region",
            uri=uri,
            code="NoSuchBucket",
        )

    def _client_error(self, exc: ClientError, uri: str, action: str) -> StorageError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "Unknown"
        message = self._redact(str(error.get("Message", "")))[:300]
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = str(error.get("BucketName", "")) or (parse_s3_uri(uri)[0] if uri.startswith("s3://") else "?")
        where = f"({action} {uri})"
        if code == "NoSuchBucket":
            return self._no_such_bucket(bucket, uri, action)
        if code in ("NoSuchKey", "NotFound", "404", "NoSuchUpload"):
            return NotFoundError(f"{uri} does not exist", uri=uri, code="NoSuchKey")
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"):
            return StorageError(
                f"access denied to {uri} ({action}); check the Secret named by spec.storage.secretRef / the pod's IAM "
                "role: it needs s3:GetObject, s3:PutObject, s3:DeleteObject on the objects and s3:ListBucket on the "
                "bucket (without s3:ListBucket a missing object also reads as access denied)",
                uri=uri,
                code="AccessDenied",
            )
        if code == "InvalidAccessKeyId":
            return StorageError(
                f"the S3 endpoint does not know the access key ID in use {where}; check AWS_ACCESS_KEY_ID in the "
                "Secret named by spec.storage.secretRef, and that spec.storage.endpoint is the store the key "
                "belongs to",
                uri=uri,
                code=code,
            )
        if code == "SignatureDoesNotMatch":
            return StorageError(
                f"the S3 endpoint rejected the request signature {where}; check AWS_SECRET_ACCESS_KEY in the Secret "
                "named by spec.storage.secretRef (and spec.storage.addressingStyle for S3-compatible stores)",
                uri=uri,
                code=code,
            )
        if code in ("ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "InvalidToken"):
            return StorageError(
                f"the S3 session token is expired or invalid {where}; refresh AWS_SESSION_TOKEN in the Secret named "
                "by spec.storage.secretRef, or use the pod's IAM role, which renews itself",
                uri=uri,
                code=code,
            )
        if code == "RequestTimeTooSkewed":
            return StorageError(f"the node's clock is too far off for S3 {where}; fix time sync", uri=uri, code=code)
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"):
            return StorageError(
                f"bucket {bucket} is not in region {self.region} {where}; "
                "set spec.storage.region to the bucket's region",
                uri=uri,
                code=code,
            )
        if code in ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"):
            return StorageError(
                f"the data sent for {uri} was corrupted in transit (checksum mismatch, {code}); retry",
                uri=uri,
                code=code,
            )
        if code in ("PreconditionFailed", "412"):
            return StorageError(f"{uri} changed during the transfer; retry", uri=uri, code=code)
        if code in ("SlowDown", "503", "ServiceUnavailable", "RequestLimitExceeded"):
            return StorageError(
                f"{_display_endpoint(self.endpoint_url)} is throttling or unavailable ({code}) {where} after "
                f"{self.max_attempts} attempts; "
                "retry later",
                uri=uri,
                code=code,
            )
        if "checksum" in message.lower() or (code in ("NotImplemented", "InvalidArgument") and "x-amz-" in message):
            return StorageError(
                f"the store rejected the request's checksum headers {where}: {code}: {message}; "
                "for S3-compatible stores that do not support flexible checksums set spec.storage.checksums: "
                "when-required",
                uri=uri,
                code=code,
            )
        request_id = exc.response.get("ResponseMetadata", {}).get("RequestId")
        suffix = f" [request id {request_id}]" if request_id else ""
        return StorageError(
            f"S3 {action} of {uri} failed: {code} (HTTP {status}): {message}{suffix}", uri=uri, code=code
        )

    @contextlib.contextmanager
    def _translating(self, uri: str, action: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except (BotoCoreError, ClientError, TransferRetriesExceededError) as exc:
            error = self._error(exc, uri, action)
            logger.debug("%s", error)
            raise error from None

    def _location(self, uri: str) -> tuple[str, str]:
        if isinstance(uri, str) and uri.startswith("file://"):
            raise InvalidUriError(f"{uri!r} is a file:// URI; use Storage.for_uri to get a FileStorage", uri=uri)
        return parse_s3_uri(uri)

    def _object_location(self, uri: str) -> tuple[str, str]:
        bucket, key = self._location(uri)
        if not key or key.endswith("/"):
            raise InvalidUriError(f"{uri!r} names a prefix, not an object; add the object's name", uri=uri)
        return bucket, key

    def _upload_args(self, sha256: str, content_type: str | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"Metadata": {SHA256_METADATA_KEY: sha256}}
        if self.checksums_enabled:
            args["ChecksumAlgorithm"] = "SHA256"
        if content_type:
            args["ContentType"] = content_type
        return args

    def _transfer_manager(self) -> TransferManager:
        return create_transfer_manager(self.client, self.transfer_config)

    # -- listing --

    def _info(self, bucket: str, obj: ObjectTypeDef, relative: str) -> ObjectInfo:
        return ObjectInfo(
            uri=f"s3://{bucket}/{obj['Key']}",
            key=relative,
            size=int(obj.get("Size", 0)),
            etag=obj.get("ETag", "").strip('"') or None,
            last_modified=obj.get("LastModified"),
        )

    def _list_prefix(self, bucket: str, prefix: str) -> Iterator[ObjectTypeDef]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def _exact_object(self, bucket: str, key: str) -> ObjectTypeDef | None:
        """The listing entry of exactly ``key`` (it sorts first among keys starting with it)."""
        page = self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        contents = page.get("Contents", [])
        return contents[0] if contents and contents[0]["Key"] == key else None

    def list(self, uri: str) -> list[ObjectInfo]:
        bucket, key = self._location(uri)
        with self._translating(uri, "listing"):
            infos = self._list_all(bucket, key)
        return [info for info in infos if not info.key.endswith("/") and info.key]

    def _list_all(self, bucket: str, key: str) -> builtins.list[ObjectInfo]:
        """What :meth:`list` returns, folder markers included."""
        if key and not key.endswith("/"):
            exact = self._exact_object(bucket, key)
            if exact is not None:
                return [self._info(bucket, exact, key.rsplit("/", 1)[-1])]
            key += "/"
        infos = [self._info(bucket, obj, obj["Key"][len(key) :]) for obj in self._list_prefix(bucket, key)]
        return sorted(infos, key=lambda info: info.key)

    def exists(self, uri: str) -> bool:
        bucket, key = self._location(uri)
        with self._translating(uri, "checking"):
            if key and not key.endswith("/"):
                try:
                    self.client.head_object(Bucket=bucket, Key=key)
                    return True
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                        raise
                key += "/"
            page = self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            return bool(page.get("Contents"))

    # -- small objects --

    def read_bytes(self, uri: str) -> bytes:
        bucket, key = self._object_location(uri)
        with self._translating(uri, "reading"):
            response, data = self._get_whole(uri, {"Bucket": bucket, "Key": key})
        self._check_recorded_sha256(uri, data, response.get("Metadata", {}))
        return data

    def _get_whole(self, uri: str, args: Mapping[str, Any]) -> tuple[Any, bytes]:
        """``get_object(**args)`` and its whole body, read again when it breaks off (see
        :meth:`_body_broke`)."""
        attempt = 1
        while True:
            response = self.client.get_object(**args)
            try:
                return response, response["Body"].read()
            except _BROKEN_BODY_ERRORS as exc:
                self._body_broke(exc, uri, attempt)
            attempt += 1

    def _body_broke(self, exc: BaseException, uri: str, attempt: int) -> None:
        """botocore retries a request whose answer does not come, not the reading of an answer that
        breaks off mid-body (a reset, a stall): such a read is made again, up to ``max_attempts``
        times in all, after 0.1 × 2^(i-1) s (at most 2 s). Raises once they are used up."""
        if attempt >= self.max_attempts:
            raise self._stream_error(exc, uri) from None
        pause = min(0.1 * 2.0 ** (attempt - 1), 2.0)
        logger.warning(
            "S3 %s broke off the answer for %s (%s); reading it again: attempt %d of %d, after %.1f s",
            _display_endpoint(self.endpoint_url),
            uri,
            type(exc).__name__,
            attempt + 1,
            self.max_attempts,
            pause,
        )
        time.sleep(pause)

    @staticmethod
    def _check_recorded_sha256(uri: str, data: bytes, metadata: Mapping[str, str]) -> None:
        recorded = metadata.get(SHA256_METADATA_KEY)
        if recorded and _HEX_SHA256_RE.match(recorded) and hashlib.sha256(data).hexdigest() != recorded:
            raise StorageError(
                f"integrity check failed for {uri}: its content does not match the SHA-256 in its metadata; "
                "the object is corrupt or was replaced by a tool that kept the old metadata; rewrite it",
                uri=uri,
                code="integrity",
            )

    def write_bytes(self, uri: str, data: bytes, *, content_type: str | None = None) -> None:
        bucket, key = self._object_location(uri)
        args = self._upload_args(hashlib.sha256(data).hexdigest(), content_type)
        with self._translating(uri, "writing"):
            self.client.put_object(Bucket=bucket, Key=key, Body=data, **args)
        logger.debug("wrote %s (%d bytes)", uri, len(data))

    # -- files --

    def upload_file(self, path: Path, uri: str, *, sha256: str | None = None) -> None:
        self._upload_many([(Path(path), uri)], {uri: sha256} if sha256 else None)

    def _upload_many(self, items: Sequence[tuple[Path, str]], known: Mapping[str, str] | None = None) -> None:
        targets = [(path, uri, *self._object_location(uri)) for path, uri in items]
        for path, _, _, _ in targets:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is not a file")
        if not targets:
            return
        current = targets[0][1]
        with self._translating_many(lambda: current, "uploading"), self._transfer_manager() as manager:
            futures = []
            for path, uri, bucket, key in targets:
                current = uri
                given = (known or {}).get(uri)
                digest = _normalize_sha256(given, what="sha256") if given else sha256_file(path)
                futures.append((uri, manager.upload(str(path), bucket, key, extra_args=self._upload_args(digest))))
            for uri, future in futures:
                current = uri
                future.result()
                logger.debug("uploaded %s", uri)

    @contextlib.contextmanager
    def _translating_many(self, current: Callable[[], str], action: str) -> Iterator[None]:
        """Like :meth:`_translating`, naming whichever URI ``current()`` returns when it fails."""
        try:
            yield
        except StorageError:
            raise
        except (BotoCoreError, ClientError, TransferRetriesExceededError) as exc:
            error = self._error(exc, current(), action)
            logger.debug("%s", error)
            raise error from None

    def _head(self, uri: str) -> HeadObjectOutputTypeDef:
        bucket, key = self._object_location(uri)
        with self._translating(uri, "reading"):
            try:
                if self.checksums_enabled:
                    return self.client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
                return self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    self._check_bucket(bucket, uri)
                raise

    def _check_bucket(self, bucket: str, uri: str) -> None:
        """A HEAD answers a bare 404 for a missing bucket and a missing key alike; tell them apart."""
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                raise self._no_such_bucket(bucket, uri, "reading") from None
            # Anything else (no s3:ListBucket, …): report the object as missing, as asked.

    @staticmethod
    def _verification(head: HeadObjectOutputTypeDef, expected_sha256: str | None) -> _Verification:
        digests: builtins.list[tuple[str, str]] = []
        if expected_sha256:
            digests.append(("the expected SHA-256", _normalize_sha256(expected_sha256, what="expected_sha256")))
        recorded = head.get("Metadata", {}).get(SHA256_METADATA_KEY, "").lower()
        if _HEX_SHA256_RE.match(recorded):
            digests.append(("the object's sha256 metadata", recorded))
        native = head.get("ChecksumSHA256")
        # Only a full-object checksum is a SHA-256 of the content; a multipart upload's is a
        # checksum of part checksums ("COMPOSITE"; some stores omit the type and the "-N" suffix,
        # so without a type only objects with a single-part ETag are trusted).
        checksum_type = head.get("ChecksumType")
        etag = head.get("ETag", "")
        full_object = checksum_type == "FULL_OBJECT" or (checksum_type is None and "-" not in etag)
        if native and full_object and "-" not in native:
            with contextlib.suppress(binascii.Error, ValueError):
                digests.append(("S3's SHA-256 checksum", base64.b64decode(native, validate=True).hex()))
        return _Verification(size=int(head.get("ContentLength", 0)), sha256=tuple(digests), etag=etag or None)

    def download_file(self, uri: str, dest: Path, *, expected_sha256: str | None = None) -> None:
        self._download_many([(uri, Path(dest), expected_sha256)])

    def _download_many(self, items: Sequence[tuple[str, Path, str | None]]) -> None:
        if not items:
            return
        for uri, _, expected in items:
            self._object_location(uri)
            if expected:
                _normalize_sha256(expected, what="expected_sha256")
        workers = min(16, len(items))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            checks = list(pool.map(lambda item: self._verification(self._head(item[0]), item[2]), items))
        temps: builtins.list[Path] = []
        try:
            current = items[0][0]
            with self._translating_many(lambda: current, "downloading"), self._transfer_manager() as manager:
                futures = []
                for (uri, dest, _), check in zip(items, checks, strict=True):
                    bucket, key = self._object_location(uri)
                    tmp = _tmp_beside(dest)
                    temps.append(tmp)
                    pin = _PinObject(check.size, check.etag)
                    futures.append((uri, manager.download(bucket, key, str(tmp), subscribers=[pin])))
                for uri, future in futures:
                    current = uri
                    future.result()
            digests = self._digests(temps, checks, workers)
            for (uri, _, _), tmp, check, digest in zip(items, temps, checks, digests, strict=True):
                _verify(tmp, check, uri=uri, digest=digest)
            for (uri, dest, _), tmp in zip(items, temps, strict=True):
                _publish(tmp, dest)
                logger.debug("downloaded %s to %s", uri, dest)
            temps.clear()
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)

    @staticmethod
    def _digests(temps: Sequence[Path], checks: Sequence[_Verification], workers: int) -> builtins.list[str | None]:
        def digest(pair: tuple[Path, _Verification]) -> str | None:
            tmp, check = pair
            return sha256_file(tmp) if check.sha256 and tmp.stat().st_size == check.size else None

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(digest, zip(temps, checks, strict=True)))

    # -- deleting --

    def delete(self, uri: str) -> None:
        bucket, key = self._object_location(uri)
        with self._translating(uri, "deleting"):
            self.client.delete_object(Bucket=bucket, Key=key)

    def delete_prefix(self, uri: str) -> int:
        bucket, key = self._location(uri)
        if not key.strip("/"):
            raise StorageError(
                f"refusing to delete everything in bucket {bucket} ({uri}); delete a prefix under it", uri=uri
            )
        with self._translating(uri, "listing"):
            infos = self._list_all(bucket, key)
        deleted = 0
        with self._translating(uri, "deleting"):
            for start in range(0, len(infos), 1000):
                batch = infos[start : start + 1000]
                keys = [parse_s3_uri(info.uri)[1] for info in batch]
                response = self.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
                )
                errors = response.get("Errors", [])
                if errors:
                    first = errors[0]
                    raise StorageError(
                        f"could not delete {len(errors)} of {len(keys)} objects under {uri}, e.g. "
                        f"s3://{bucket}/{first.get('Key', '?')}: {first.get('Code', '?')}; check the role's "
                        "s3:DeleteObject permission",
                        uri=uri,
                        code=str(first.get("Code", "")) or None,
                    )
                deleted += len(keys)
        logger.debug("deleted %d objects under %s", deleted, uri)
        return deleted

    # -- conditional writes --

    def create_bytes(self, uri: str, data: bytes, *, content_type: str | None = None) -> None:
        bucket, key = self._object_location(uri)
        args = self._upload_args(hashlib.sha256(data).hexdigest(), content_type)
        with self._translating(uri, "creating"):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*", **args)
            except ClientError as exc:
                if _lost_condition(exc):
                    if self._own_retried_write(exc, bucket, key, data):
                        logger.debug("created %s (%d bytes; the answer to an earlier attempt was lost)", uri, len(data))
                        return
                    raise PreconditionFailedError(f"{uri} already exists", uri=uri, code="PreconditionFailed") from None
                if not _conditional_unsupported(exc):
                    raise
                self._warn_no_conditional_writes(uri)
                # Check, write, read back: narrows the race to the moment between the check and
                # the write, but cannot close it on a store that ignores conditions.
                if self.exists(uri):
                    raise PreconditionFailedError(f"{uri} already exists", uri=uri, code="PreconditionFailed") from None
                self.client.put_object(Bucket=bucket, Key=key, Body=data, **args)
                if self.client.get_object(Bucket=bucket, Key=key)["Body"].read() != data:
                    raise PreconditionFailedError(
                        f"{uri} was written by someone else at the same time", uri=uri, code="PreconditionFailed"
                    ) from None
        logger.debug("created %s (%d bytes)", uri, len(data))

    def _own_retried_write(self, exc: ClientError, bucket: str, key: str, data: bytes) -> bool:
        """Whether a conditional write that lost its condition only lost it to itself: botocore retried
        it (an earlier attempt reached the store but its answer was lost: a reset, a timeout) and the
        object now holds exactly ``data``. Without a retry a lost condition is always someone else's."""
        if not exc.response.get("ResponseMetadata", {}).get("RetryAttempts"):
            return False
        try:
            current = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError):
            return False
        return bool(current == data)

    def read_versioned(self, uri: str) -> VersionedBytes:
        bucket, key = self._object_location(uri)
        with self._translating(uri, "reading"):
            response, data = self._get_whole(uri, {"Bucket": bucket, "Key": key})
        self._check_recorded_sha256(uri, data, response.get("Metadata", {}))
        return VersionedBytes(data=data, etag=str(response.get("ETag", "")).strip('"'))

    def replace_bytes(self, uri: str, data: bytes, *, etag: str, content_type: str | None = None) -> None:
        bucket, key = self._object_location(uri)
        args = self._upload_args(hashlib.sha256(data).hexdigest(), content_type)
        with self._translating(uri, "replacing"):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=f'"{etag}"', **args)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if _lost_condition(exc) and self._own_retried_write(exc, bucket, key, data):
                    logger.debug("replaced %s (%d bytes; the answer to an earlier attempt was lost)", uri, len(data))
                    return
                if _lost_condition(exc) or code in ("NoSuchKey", "404"):
                    raise PreconditionFailedError(
                        f"{uri} changed since it was read", uri=uri, code="PreconditionFailed"
                    ) from None
                if not _conditional_unsupported(exc):
                    raise
                self._warn_no_conditional_writes(uri)
                current = self.client.get_object(Bucket=bucket, Key=key)
                if str(current.get("ETag", "")).strip('"') != etag:
                    raise PreconditionFailedError(
                        f"{uri} changed since it was read", uri=uri, code="PreconditionFailed"
                    ) from None
                self.client.put_object(Bucket=bucket, Key=key, Body=data, **args)
        logger.debug("replaced %s (%d bytes)", uri, len(data))

    def list_dirs(self, uri: str) -> builtins.list[str]:
        bucket, key = self._location(uri)
        if key and not key.endswith("/"):
            key += "/"
        names: set[str] = set()
        with self._translating(uri, "listing"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    name = common.get("Prefix", "")[len(key) :].rstrip("/")
                    if name:
                        names.add(name)
        return sorted(names)

    def _warn_no_conditional_writes(self, uri: str) -> None:
        if not S3Storage._conditional_warned:
            S3Storage._conditional_warned = True
            logger.warning(
                "%s does not support conditional writes (If-None-Match/If-Match) for %s: claims fall back to "
                "check-then-write, which two writers racing within the same moment can both pass; "
                "use a store with conditional writes (AWS S3, MinIO) where jobs may share a bucket",
                _display_endpoint(self.endpoint_url),
                uri,
            )

    _conditional_warned: ClassVar[bool] = False

    # -- streaming and ranged reads --

    def _get_object(self, uri: str, *, etag: str | None, byte_range: str | None = None) -> Any:
        bucket, key = self._object_location(uri)
        args: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if etag is not None:
            args["IfMatch"] = f'"{etag}"'
        if byte_range is not None:
            args["Range"] = byte_range
        with self._translating(uri, "reading"):
            try:
                return self.client.get_object(**args)
            except ClientError as exc:
                if etag is not None and _lost_condition(exc):
                    raise PreconditionFailedError(
                        f"{uri} changed since it was listed (it is no longer ETag {etag}); list it again",
                        uri=uri,
                        code="PreconditionFailed",
                    ) from None
                raise

    def open_read(self, uri: str, *, etag: str | None = None) -> BinaryIO:
        response = self._get_object(uri, etag=etag)
        return io.BufferedReader(_ResumingBody(self, uri, response, etag), buffer_size=MiB)

    def _stream_error(self, exc: BaseException, uri: str) -> StorageError:
        """An error while the content of an object streams in (the answer itself had come)."""
        if isinstance(exc, (IncompleteReadError, ResponseStreamingError)):
            return StorageError(
                f"the connection to {_display_endpoint(self.endpoint_url)} broke while reading {uri} "
                f"({type(exc).__name__}); retry, and check the store and the network path if it persists",
                uri=uri,
                code="connection",
            )
        return self._error(exc, uri, "reading")

    def read_range(self, uri: str, start: int, end: int, *, etag: str | None = None) -> bytes:
        _check_range(uri, start, end)
        if end <= start:
            return b""
        attempt = 1
        while True:
            try:
                response = self._get_object(uri, etag=etag, byte_range=f"bytes={start}-{end - 1}")
            except StorageError as exc:
                if exc.code == "InvalidRange":  # the object ends before `start`
                    return b""
                raise
            with self._translating(uri, "reading"):
                try:
                    data: bytes = response["Body"].read()
                    break
                except _BROKEN_BODY_ERRORS as exc:
                    self._body_broke(exc, uri, attempt)
            attempt += 1
        # A store that ignores Range answers 200 with the whole object.
        if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200 and "ContentRange" not in response:
            data = data[start:end]
        return data


def _lost_condition(exc: ClientError) -> bool:
    """A conditional write that lost: the condition failed (412) or raced another one (409)."""
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return error.get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412)


def _conditional_unsupported(exc: ClientError) -> bool:
    """The store refused the conditional header itself (not the condition)."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", "")).lower()
    if code in ("NotImplemented", "501"):
        return True
    return code in ("InvalidArgument", "InvalidRequest") and ("if-none-match" in message or "if-match" in message)


# --- files ------------------------------------------------------------------------------


class FileStorage(Storage):
    """Storage on a filesystem, for ``file:///absolute/path`` URIs (laptops, mounted volumes, tests).

    Same semantics as :class:`S3Storage`: writes and downloads are atomic (a temporary file in the
    target directory, then a rename); ``download_file`` checks the size and, when given,
    ``expected_sha256``. Files whose names start with ``.tuneloop-tmp-`` are in-flight writes
    and never listed.
    """

    scheme = "file"

    @staticmethod
    def _fail(exc: OSError, uri: str, action: str) -> NoReturn:
        if isinstance(exc, FileNotFoundError):
            raise NotFoundError(f"{uri} does not exist", uri=uri, code="NoSuchKey") from None
        if isinstance(exc, IsADirectoryError):
            raise StorageError(f"{uri} is a directory, not a file ({action})", uri=uri, code="IsADirectory") from None
        if isinstance(exc, PermissionError):
            raise StorageError(
                f"permission denied {action} {uri}; check the volume's ownership and the pod's securityContext",
                uri=uri,
                code="AccessDenied",
            ) from None
        raise StorageError(f"{action} {uri} failed: {exc.strerror or type(exc).__name__}", uri=uri) from None

    @contextlib.contextmanager
    def _translating(self, uri: str, action: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except OSError as exc:
            self._fail(exc, uri, action)

    @staticmethod
    def _object_path(uri: str) -> Path:
        if uri.endswith("/"):
            raise InvalidUriError(f"{uri!r} names a directory, not a file; add the file's name", uri=uri)
        return _file_path(uri)

    def _walk(self, directory: Path) -> Iterator[tuple[Path, str]]:
        for path, key in _local_files(directory):
            if not path.name.startswith(_TMP_PREFIX):
                yield path, key

    @staticmethod
    def _info(path: Path, key: str) -> ObjectInfo:
        stat = path.stat()
        return ObjectInfo(
            uri=_file_uri(path),
            key=key,
            size=stat.st_size,
            etag=None,
            last_modified=datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        )

    def list(self, uri: str) -> list[ObjectInfo]:
        path = _file_path(uri)
        with self._translating(uri, "listing"):
            if path.is_file() and not uri.endswith("/"):
                return [self._info(path, path.name)]
            if path.is_dir():
                return sorted((self._info(p, key) for p, key in self._walk(path)), key=lambda info: info.key)
        return []

    def exists(self, uri: str) -> bool:
        path = _file_path(uri)
        with self._translating(uri, "checking"):
            if path.is_file() and not uri.endswith("/"):
                return True
            return path.is_dir() and next(iter(self._walk(path)), None) is not None

    def read_bytes(self, uri: str) -> bytes:
        path = self._object_path(uri)
        with self._translating(uri, "reading"):
            return path.read_bytes()

    @staticmethod
    def _staged(path: Path, data: bytes) -> Path:
        """``data`` in a new temporary file beside ``path``, synced to disk, ready to publish."""
        tmp = _tmp_beside(path)
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def write_bytes(self, uri: str, data: bytes, *, content_type: str | None = None) -> None:
        path = self._object_path(uri)
        with self._translating(uri, "writing"):
            tmp = self._staged(path, data)
            try:
                _publish(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    def _copy(self, src: Path, dest: Path, *, uri: str, check: _Verification | None) -> None:
        """Copy ``src`` to ``dest`` through a temporary file, hashing on the way; verify; rename."""
        tmp = _tmp_beside(dest)
        try:
            hasher = hashlib.sha256()
            with src.open("rb") as fin, tmp.open("wb") as fout:
                while chunk := fin.read(MiB):
                    hasher.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            if check is not None:
                _verify(tmp, check, uri=uri, digest=hasher.hexdigest())
            _publish(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, path: Path, uri: str, *, sha256: str | None = None) -> None:
        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"{src} is not a file")
        dest = self._object_path(uri)
        digests = (("the given sha256", _normalize_sha256(sha256, what="sha256")),) if sha256 else ()
        check = _Verification(size=src.stat().st_size, sha256=digests)
        with self._translating(uri, "writing"):
            self._copy(src, dest, uri=uri, check=check)

    def download_file(self, uri: str, dest: Path, *, expected_sha256: str | None = None) -> None:
        src = self._object_path(uri)
        digests = (
            (("the expected SHA-256", _normalize_sha256(expected_sha256, what="expected_sha256")),)
            if expected_sha256
            else ()
        )
        with self._translating(uri, "reading"):
            if not src.is_file():
                src.open("rb").close()  # raises the precise error: missing, a directory, permissions
            check = _Verification(size=src.stat().st_size, sha256=digests)
        self._copy(src, Path(dest), uri=uri, check=check)

    def delete(self, uri: str) -> None:
        path = self._object_path(uri)
        with self._translating(uri, "deleting"):
            if path.is_dir() and not path.is_symlink():
                raise StorageError(f"{uri} is a directory; use delete_prefix", uri=uri, code="IsADirectory")
            path.unlink(missing_ok=True)

    def delete_prefix(self, uri: str) -> int:
        path = _file_path(uri)
        if path == Path(path.anchor):
            raise StorageError(f"refusing to delete everything under {uri}; delete a directory under it", uri=uri)
        infos = self.list(uri)
        with self._translating(uri, "deleting"):
            for info in infos:
                _file_path(info.uri).unlink(missing_ok=True)
            if path.is_dir() and not path.is_symlink():
                # Like S3, a prefix with no objects left does not exist: remove emptied directories.
                for dirpath, _, _ in sorted(os.walk(path), key=lambda entry: len(entry[0]), reverse=True):
                    with contextlib.suppress(OSError):
                        Path(dirpath).rmdir()
        return len(infos)

    # -- conditional writes --

    def create_bytes(self, uri: str, data: bytes, *, content_type: str | None = None) -> None:
        del content_type
        path = self._object_path(uri)
        with self._translating(uri, "creating"):
            tmp = self._staged(path, data)
            try:
                tmp.chmod(0o644)
                try:
                    # A hard link fails on an existing name, atomically, and publishes a complete file.
                    os.link(tmp, path)
                except FileExistsError:
                    raise PreconditionFailedError(f"{uri} already exists", uri=uri, code="PreconditionFailed") from None
                _fsync_dir(path.parent)
            finally:
                tmp.unlink(missing_ok=True)

    def read_versioned(self, uri: str) -> VersionedBytes:
        data = self.read_bytes(uri)
        return VersionedBytes(data=data, etag=hashlib.sha256(data).hexdigest())

    def replace_bytes(self, uri: str, data: bytes, *, etag: str, content_type: str | None = None) -> None:
        del content_type
        path = self._object_path(uri)
        changed = PreconditionFailedError(f"{uri} changed since it was read", uri=uri, code="PreconditionFailed")
        with self._translating(uri, "replacing"):
            try:
                handle = path.open("rb")
            except FileNotFoundError:
                raise changed from None
            with handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                # Whoever held the lock before may have renamed a new file over this one.
                if path.stat().st_ino != os.fstat(handle.fileno()).st_ino:
                    raise changed
                if hashlib.sha256(handle.read()).hexdigest() != etag:
                    raise changed
                self.write_bytes(uri, data)  # a rename onto the name, under the lock of the old file

    def list_dirs(self, uri: str) -> builtins.list[str]:
        path = _file_path(uri)
        with self._translating(uri, "listing"):
            if not path.is_dir():
                return []
            return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink() and _holds_objects(p))

    # -- streaming and ranged reads --

    def open_read(self, uri: str, *, etag: str | None = None) -> BinaryIO:
        del etag  # files have no ETags
        path = self._object_path(uri)
        with self._translating(uri, "reading"):
            handle = path.open("rb", buffering=0)

        def translate(exc: BaseException) -> StorageError:
            try:
                self._fail(exc if isinstance(exc, OSError) else OSError(str(exc)), uri, "reading")
            except StorageError as translated:  # _fail raises the message every other read gives
                return translated

        return io.BufferedReader(_TranslatedReader(handle.read, handle.close, translate, (OSError,)), buffer_size=MiB)

    def read_range(self, uri: str, start: int, end: int, *, etag: str | None = None) -> bytes:
        del etag
        _check_range(uri, start, end)
        path = self._object_path(uri)
        with self._translating(uri, "reading"), path.open("rb") as handle:
            handle.seek(start)
            return handle.read(max(0, end - start))


# --- streams ----------------------------------------------------------------------------


def _check_range(uri: str, start: int, end: int) -> None:
    if start < 0 or end < 0:
        raise ValueError(f"reading {uri}: a byte range starts and ends at offsets >= 0, got {start} to {end}")


def _holds_objects(directory: Path) -> bool:
    """Whether a folder holds an object, as an S3 prefix exists only while objects are under it: a
    folder with nothing but empty folders or in-flight temporary files (a writer killed before its
    rename) is not listed, so a run a killed writer never finished claiming is not taken for one."""
    return any(f.is_file() and not f.name.startswith(_TMP_PREFIX) for f in directory.rglob("*") if not f.is_symlink())


class _ResumingBody(io.RawIOBase):
    """The body of an S3 GET (:meth:`S3Storage.open_read`) that picks up where it broke off: when the
    connection breaks mid-body, the rest is asked for again (``Range: bytes=<read so far>-``, and
    ``If-Match`` with the object's ETag, so the pieces are of one version), up to ``max_attempts``
    times in all. Other errors, and the last break, surface as :class:`StorageError`."""

    def __init__(self, storage: S3Storage, uri: str, response: Any, etag: str | None) -> None:
        super().__init__()
        self._storage = storage
        self._uri = uri
        self._body = response["Body"]
        self._etag = etag or (str(response.get("ETag", "")).strip('"') or None)
        self._position = 0
        self._attempt = 1

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            try:
                data = self._body.read(len(view))
                break
            except _BROKEN_BODY_ERRORS as exc:
                self._storage._body_broke(exc, self._uri, self._attempt)  # raises once attempts are used up
                self._attempt += 1
                with contextlib.suppress(BotoCoreError):
                    self._body.close()
                response = self._storage._get_object(self._uri, etag=self._etag, byte_range=f"bytes={self._position}-")
                self._body = response["Body"]
            except BotoCoreError as exc:
                raise self._storage._stream_error(exc, self._uri) from None
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                with contextlib.suppress(BotoCoreError):
                    self._body.close()
            finally:
                super().close()


class _TranslatedReader(io.RawIOBase):
    """A raw stream over ``read(n)`` whose errors surface as :class:`StorageError` (see
    :meth:`Storage.open_read`): a store that stalls or drops the connection mid-object is reported
    like a failed request, naming the URI, never as a botocore or OS exception."""

    def __init__(
        self,
        read: Callable[[int], bytes],
        close: Callable[[], None],
        translate: Callable[[BaseException], StorageError],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        super().__init__()
        self._read = read
        self._close = close
        self._translate = translate
        self._errors = errors

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._read(len(view))
        except self._errors as exc:
            raise self._translate(exc) from None
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                with contextlib.suppress(*self._errors):
                    self._close()
            finally:
                super().close()
