"""What S3 failures mean to the user: botocore and s3transfer exceptions turned into
:class:`StorageError` (or :class:`NotFoundError`) with a message naming the URI and what to do.

Server messages are redacted and bounded, and botocore's own exception text is never chained
onto ours, so credentials do not reach a message or a log.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, NamedTuple

from botocore.exceptions import (
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

from tuneloop.storage.keys import parse_s3_uri
from tuneloop.storage.redaction import redact
from tuneloop.storage.results import NotFoundError, StorageError
from tuneloop.storage.s3_config import S3_READ_TIMEOUT_ENV, _display_endpoint

NO_CREDENTIALS_MESSAGE: Final = (
    "no S3 credentials: set spec.storage.secretRef to a Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "or give the pod an IAM role"
)


class _Advice(NamedTuple):
    """What to tell the user about an S3 error code. ``message`` may name ``{uri}``, ``{action}``,
    ``{where}`` ("(reading s3://…)"), ``{bucket}``, ``{region}``, ``{code}``, ``{endpoint}`` and
    ``{max_attempts}``."""

    codes: frozenset[str]
    message: str
    code: str | None = None
    """The code the error reports; ``None``: the store's own."""


#: Advice by error code (the codes of different rows never overlap).
_ADVICE: Final = (
    _Advice(
        frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}),
        "access denied to {uri} ({action}); check the Secret named by spec.storage.secretRef / the pod's IAM "
        "role: it needs s3:GetObject, s3:PutObject, s3:DeleteObject on the objects and s3:ListBucket on the "
        "bucket (without s3:ListBucket a missing object also reads as access denied)",
        code="AccessDenied",
    ),
    _Advice(
        frozenset({"InvalidAccessKeyId"}),
        "the S3 endpoint does not know the access key ID in use {where}; check AWS_ACCESS_KEY_ID in the "
        "Secret named by spec.storage.secretRef, and that spec.storage.endpoint is the store the key "
        "belongs to",
    ),
    _Advice(
        frozenset({"SignatureDoesNotMatch"}),
        "the S3 endpoint rejected the request signature {where}; check AWS_SECRET_ACCESS_KEY in the Secret "
        "named by spec.storage.secretRef (and spec.storage.addressingStyle for S3-compatible stores)",
    ),
    _Advice(
        frozenset({"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "InvalidToken"}),
        "the S3 session token is expired or invalid {where}; refresh AWS_SESSION_TOKEN in the Secret named "
        "by spec.storage.secretRef, or use the pod's IAM role, which renews itself",
    ),
    _Advice(frozenset({"RequestTimeTooSkewed"}), "the node's clock is too far off for S3 {where}; fix time sync"),
    _Advice(
        frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"}),
        "bucket {bucket} is not in region {region} {where}; set spec.storage.region to the bucket's region",
    ),
    _Advice(
        frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}),
        "the data sent for {uri} was corrupted in transit (checksum mismatch, {code}); retry",
    ),
    _Advice(frozenset({"PreconditionFailed", "412"}), "{uri} changed during the transfer; retry"),
    _Advice(
        frozenset({"SlowDown", "503", "ServiceUnavailable", "RequestLimitExceeded"}),
        "{endpoint} is throttling or unavailable ({code}) {where} after {max_attempts} attempts; retry later",
    ),
)


@dataclass(frozen=True)
class S3Errors:
    """Translates the failures of one S3 client, whose endpoint, region, attempts and timeouts the
    messages name; ``env`` holds the secrets to redact besides those of ``os.environ``."""

    endpoint_url: str | None
    region: str
    max_attempts: int
    timeouts: str
    """For messages: "timeouts: connect 5 s, read 20 s"."""
    env: Mapping[str, str]

    def redact(self, text: str) -> str:
        return redact(text, self.env)

    def translate(self, exc: BaseException, uri: str, action: str) -> StorageError:
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
                f"attempts ({self.timeouts}); check that the store is up and that spec.storage.endpoint and the "
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
            return StorageError(f"invalid S3 request {where}: {self.redact(str(exc))}", uri=uri, code="invalid")
        return StorageError(
            f"S3 {action} of {uri} failed: {type(exc).__name__}: {self.redact(str(exc))[:300]}", uri=uri, code="error"
        )

    def stream_error(self, exc: BaseException, uri: str) -> StorageError:
        """An error while the content of an object streams in (the answer itself had come)."""
        if isinstance(exc, (IncompleteReadError, ResponseStreamingError)):
            return StorageError(
                f"the connection to {_display_endpoint(self.endpoint_url)} broke while reading {uri} "
                f"({type(exc).__name__}); retry, and check the store and the network path if it persists",
                uri=uri,
                code="connection",
            )
        return self.translate(exc, uri, "reading")

    def no_such_bucket(self, bucket: str, uri: str, action: str) -> NotFoundError:
        return NotFoundError(
            f"bucket {bucket} does not exist ({action} {uri}); check the bucket name in the URI, "
            f"and spec.storage.endpoint ({_display_endpoint(self.endpoint_url)}) and spec.storage.region",
            uri=uri,
            code="NoSuchBucket",
        )

    def _client_error(self, exc: ClientError, uri: str, action: str) -> StorageError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "")) or "Unknown"
        message = self.redact(str(error.get("Message", "")))[:300]
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = str(error.get("BucketName", "")) or (parse_s3_uri(uri)[0] if uri.startswith("s3://") else "?")
        where = f"({action} {uri})"
        if code == "NoSuchBucket":
            return self.no_such_bucket(bucket, uri, action)
        if code in ("NoSuchKey", "NotFound", "404", "NoSuchUpload"):
            return NotFoundError(f"{uri} does not exist", uri=uri, code="NoSuchKey")
        for advice in _ADVICE:
            if code in advice.codes:
                text = advice.message.format(
                    uri=uri,
                    action=action,
                    where=where,
                    bucket=bucket,
                    region=self.region,
                    code=code,
                    endpoint=_display_endpoint(self.endpoint_url),
                    max_attempts=self.max_attempts,
                )
                return StorageError(text, uri=uri, code=advice.code or code)
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
