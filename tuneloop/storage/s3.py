"""The S3 backend: :class:`S3Storage`, for AWS S3 and S3-compatible stores (MinIO, Ceph, …), through
boto3: listing, small objects, parallel multipart transfers of files, deletes, conditional writes,
and streamed or ranged reads that pick up where a broken answer left off.

How its client is set up is in :mod:`tuneloop.storage.s3_config`, how requests are retried in
:mod:`tuneloop.storage.s3_retries`, what failures mean in :mod:`tuneloop.storage.s3_errors`, and
what is recorded and checked about an object's content in :mod:`tuneloop.storage.s3_integrity`.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

from tuneloop.api.spec import Storage as StorageSettings
from tuneloop.storage.base import Storage, _check_range, _register
from tuneloop.storage.keys import parse_s3_uri
from tuneloop.storage.localfiles import (
    MiB,
    _normalize_sha256,
    _publish,
    _tmp_beside,
    _verify,
    sha256_file,
)
from tuneloop.storage.results import (
    InvalidUriError,
    ObjectInfo,
    PreconditionFailedError,
    StorageError,
    VersionedBytes,
)
from tuneloop.storage.s3_config import (
    _client_config,
    _default_transfer_config,
    _display_endpoint,
    _request_limits,
    _resolve_endpoint,
    _resolve_region,
    _session,
)
from tuneloop.storage.s3_errors import S3Errors, _conditional_unsupported, _lost_condition
from tuneloop.storage.s3_integrity import (
    SHA256_METADATA_KEY,
    _check_recorded_sha256,
    _digests,
    _PinObject,
    _verification,
)
from tuneloop.storage.s3_retries import _BROKEN_BODY_ERRORS, _RetryReporter, s3_request_time_bound

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef, ObjectTypeDef
    from s3transfer.manager import TransferManager

# One logger for the whole package: the messages are documented as coming from "tuneloop.storage".
logger = logging.getLogger(__package__)


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

    @classmethod
    def _open(cls, uri: str, settings: StorageSettings | None, env: Mapping[str, str] | None) -> S3Storage:
        parse_s3_uri(uri)
        return cls(settings, env=env)

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
        max_attempts, connect_timeout, read_timeout = _request_limits(env, max_attempts, connect_timeout, read_timeout)
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        #: Seconds within which one small request to an endpoint that never answers has failed.
        self.request_time_bound = s3_request_time_bound(connect_timeout, read_timeout, max_attempts)
        self.endpoint_url = _resolve_endpoint(self.settings, self._env)
        self.region = _resolve_region(self.settings, self._env)
        self.transfer_config = transfer_config or _default_transfer_config()
        self.client_config = _client_config(
            self.settings,
            self.region,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            transfer_config=self.transfer_config,
        )
        timeouts = f"timeouts: connect {connect_timeout:g} s, read {read_timeout:g} s"
        self._errors = S3Errors(
            endpoint_url=self.endpoint_url,
            region=self.region,
            max_attempts=max_attempts,
            timeouts=timeouts,
            env=self._env,
        )
        try:
            session = _session(env, self.region)
            self.client: S3Client = session.client("s3", endpoint_url=self.endpoint_url, config=self.client_config)
        except (BotoCoreError, ValueError) as exc:
            raise StorageError(
                f"cannot set up the S3 client: {type(exc).__name__}: {self._errors.redact(str(exc))}"
            ) from None
        _RetryReporter(max_attempts, timeouts, self._errors.redact).register(self.client.meta.events)

    @property
    def checksums_enabled(self) -> bool:
        """Whether uploads ask S3 for SHA-256 checksums (``spec.storage.checksums: when-supported``)."""
        return self.settings.checksums == "when-supported"

    @contextlib.contextmanager
    def _translating(self, uri: str | Callable[[], str], action: str) -> Iterator[None]:
        """Raise botocore's and s3transfer's exceptions as :class:`StorageError` naming ``uri`` (for a
        batch, a callable: whichever URI it returns when the failure happens)."""
        try:
            yield
        except StorageError:
            raise
        except (BotoCoreError, ClientError, TransferRetriesExceededError) as exc:
            error = self._errors.translate(exc, uri if isinstance(uri, str) else uri(), action)
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
        _check_recorded_sha256(uri, data, response.get("Metadata", {}))
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
            raise self._errors.stream_error(exc, uri) from None
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
        with self._translating(lambda: current, "uploading"), self._transfer_manager() as manager:
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
                raise self._errors.no_such_bucket(bucket, uri, "reading") from None
            # Anything else (no s3:ListBucket, …): report the object as missing, as asked.

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
            checks = list(pool.map(lambda item: _verification(self._head(item[0]), item[2]), items))
        temps: builtins.list[Path] = []
        try:
            current = items[0][0]
            with self._translating(lambda: current, "downloading"), self._transfer_manager() as manager:
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
            digests = _digests(temps, checks, workers)
            for (uri, _, _), tmp, check, digest in zip(items, temps, checks, digests, strict=True):
                _verify(tmp, check, uri=uri, digest=digest)
            for (uri, dest, _), tmp in zip(items, temps, strict=True):
                _publish(tmp, dest)
                logger.debug("downloaded %s to %s", uri, dest)
            temps.clear()
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)

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

    def abort_incomplete_uploads(self, uri: str) -> int:
        bucket, key = self._location(uri)
        if not key.strip("/"):
            raise StorageError(f"refusing to abort every upload in bucket {bucket} ({uri}); name a prefix", uri=uri)
        aborted = 0
        with self._translating(uri, "aborting unfinished uploads"):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=bucket, Prefix=key):
                for upload in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
        logger.debug("aborted %d unfinished multipart uploads under %s", aborted, uri)
        return aborted

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
        _check_recorded_sha256(uri, data, response.get("Metadata", {}))
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
                raise self._storage._errors.stream_error(exc, self._uri) from None
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


_register(S3Storage)
