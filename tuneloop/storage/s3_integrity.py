"""Integrity of S3 objects: what an upload records about its content (the hex SHA-256 in the
``sha256`` metadata), and what a read or download checks against it and against S3's own
full-object checksum, pinning the size and ETag it verified.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from s3transfer.subscribers import BaseSubscriber

from tuneloop.storage.localfiles import _HEX_SHA256_RE, _normalize_sha256, _Verification, sha256_file
from tuneloop.storage.results import StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import HeadObjectOutputTypeDef
    from s3transfer.futures import TransferFuture

#: Object metadata key holding the hex SHA-256 of the object's content (``x-amz-meta-sha256``).
SHA256_METADATA_KEY: Final = "sha256"


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


def _check_recorded_sha256(uri: str, data: bytes, metadata: Mapping[str, str]) -> None:
    recorded = metadata.get(SHA256_METADATA_KEY)
    if recorded and _HEX_SHA256_RE.match(recorded) and hashlib.sha256(data).hexdigest() != recorded:
        raise StorageError(
            f"integrity check failed for {uri}: its content does not match the SHA-256 in its metadata; "
            "the object is corrupt or was replaced by a tool that kept the old metadata; rewrite it",
            uri=uri,
            code="integrity",
        )


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


def _digests(temps: Sequence[Path], checks: Sequence[_Verification], workers: int) -> builtins.list[str | None]:
    def digest(pair: tuple[Path, _Verification]) -> str | None:
        tmp, check = pair
        return sha256_file(tmp) if check.sha256 and tmp.stat().st_size == check.size else None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(digest, zip(temps, checks, strict=True)))
