"""How an S3 client is set up: where its endpoint, region and credentials come from, the defaults
of its multipart transfers, timeouts and attempts and the environment variables that override them
(checked, with messages naming the variable), its checksum modes, and the bucket lifecycle rule
Tuneloop recommends. :class:`~tuneloop.storage.s3.S3Storage` documents the rules these apply.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from tuneloop import __version__
from tuneloop.api.spec import Storage as StorageSettings
from tuneloop.storage.keys import _show
from tuneloop.storage.localfiles import MiB
from tuneloop.storage.results import StorageError

#: The S3 lifecycle rule recommended for every bucket Tuneloop writes to (see the package docstring).
ABORT_INCOMPLETE_MULTIPART_UPLOADS_RULE: Final[dict[str, Any]] = {
    "ID": "tuneloop-abort-incomplete-multipart-uploads",
    "Status": "Enabled",
    "Filter": {"Prefix": ""},
    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
}

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

_ChecksumMode = Literal["when_supported", "when_required"]
_CHECKSUM_MODES: Final[dict[str, _ChecksumMode]] = {
    "when-supported": "when_supported",
    "when-required": "when_required",
}


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


def _tuning(env: Mapping[str, str] | None, name: str) -> str | None:
    """A tuning variable, from ``env``, else from the process environment."""
    value = env.get(name) if env is not None else None
    return os.environ.get(name) if value is None else value


def _request_limits(
    env: Mapping[str, str] | None, max_attempts: int | None, connect_timeout: float | None, read_timeout: float | None
) -> tuple[int, float, float]:
    """Attempts, connect timeout and read timeout of each request: the arguments given, else the
    tuning variables, else the defaults."""
    if max_attempts is None:
        max_attempts = _attempts_setting(
            _tuning(env, S3_MAX_ATTEMPTS_ENV), S3_MAX_ATTEMPTS_ENV, DEFAULT_S3_MAX_ATTEMPTS
        )
    if connect_timeout is None:
        connect_timeout = _seconds_setting(
            _tuning(env, S3_CONNECT_TIMEOUT_ENV), S3_CONNECT_TIMEOUT_ENV, DEFAULT_S3_CONNECT_TIMEOUT
        )
    if read_timeout is None:
        read_timeout = _seconds_setting(_tuning(env, S3_READ_TIMEOUT_ENV), S3_READ_TIMEOUT_ENV, DEFAULT_S3_READ_TIMEOUT)
    return max_attempts, connect_timeout, read_timeout


def _resolve_endpoint(settings: StorageSettings, env: Mapping[str, str]) -> str | None:
    if settings.endpoint:
        return _check_endpoint(settings.endpoint, source="spec.storage.endpoint")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = env.get(name)
        if value:
            return _check_endpoint(value, source=name)
    return None


def _resolve_region(settings: StorageSettings, env: Mapping[str, str]) -> str:
    return settings.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"


def _default_transfer_config() -> TransferConfig:
    return TransferConfig(
        multipart_threshold=DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize=DEFAULT_MULTIPART_CHUNKSIZE,
        max_concurrency=DEFAULT_MAX_CONCURRENCY,
        use_threads=True,
        preferred_transfer_client="classic",
    )


def _client_config(
    settings: StorageSettings,
    region: str,
    *,
    max_attempts: int,
    connect_timeout: float,
    read_timeout: float,
    transfer_config: TransferConfig,
) -> Config:
    concurrency = int(getattr(transfer_config, "max_request_concurrency", DEFAULT_MAX_CONCURRENCY))
    checksums = _CHECKSUM_MODES[settings.checksums]
    return Config(
        region_name=region,
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        s3={"addressing_style": settings.addressing_style},
        request_checksum_calculation=checksums,
        response_checksum_validation=checksums,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        tcp_keepalive=True,
        max_pool_connections=max(10, 2 * concurrency),
        user_agent_extra=f"tuneloop/{__version__}",
        # The endpoint is resolved by _resolve_endpoint, from `env`; boto must not pick another from
        # os.environ or ~/.aws/config. (Supported since botocore 1.31; botocore-stubs 1.43 lacks it.)
        ignore_configured_endpoint_urls=True,  # type: ignore[call-arg]
    )


def _session(env: Mapping[str, str] | None, region: str) -> boto3.session.Session:
    """A session with the key pair or profile in ``env`` when given, else botocore's standard chain."""
    env = env or {}
    key_id = env.get("AWS_ACCESS_KEY_ID")
    secret = env.get("AWS_SECRET_ACCESS_KEY")
    if key_id and secret:
        return boto3.session.Session(
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
            region_name=region,
        )
    return boto3.session.Session(profile_name=env.get("AWS_PROFILE") or None, region_name=region)
