"""What storage operations return and raise: the :class:`StorageError` family and the small
result types (:class:`ObjectInfo` from listings, :class:`VersionedBytes` for conditional replaces).

Every backend raises these and nothing else for problems on the URI side, so callers handle S3 and
``file://`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
