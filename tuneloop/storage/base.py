"""The storage interface: :class:`Storage`, what every backend offers, and :meth:`Storage.for_uri`,
which picks the backend for a URI.

The methods built from others (JSON, whole directories, the default streaming and ranged reads)
live here once; the backends (:mod:`tuneloop.storage.s3`, :mod:`tuneloop.storage.files`)
implement the rest and may override the batch primitives to work in parallel.
"""

from __future__ import annotations

import builtins
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tuneloop.storage.keys import _plan_local_paths, _show, _str_or_none, safe_join
from tuneloop.storage.localfiles import _local_files
from tuneloop.storage.results import InvalidUriError, ObjectInfo, StorageError, VersionedBytes

if TYPE_CHECKING:
    from tuneloop.api.spec import Storage as StorageSettings


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
        backend = _BACKENDS.get(uri.partition("://")[0]) if isinstance(uri, str) and "://" in uri else None
        if backend is not None:
            return backend._open(uri, settings, env)
        scheme = uri.split("://", 1)[0] + "://" if isinstance(uri, str) and "://" in uri else None
        hint = f"{scheme} is not object storage; " if scheme else ""
        raise InvalidUriError(
            f"{_show(uri)}: {hint}storage URIs are s3://<bucket>/<key> or file:///<absolute path>",
            uri=_str_or_none(uri),
        )

    @classmethod
    def _open(cls, uri: str, settings: StorageSettings | None, env: Mapping[str, str] | None) -> Storage:
        """This backend's storage for ``uri`` (of its scheme), after checking the URI; see :meth:`for_uri`."""
        raise NotImplementedError

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

    def abort_incomplete_uploads(self, uri: str) -> int:
        """Abort the unfinished multipart uploads under the prefix ``uri`` (what a writer killed
        mid-upload leaves: invisible to :meth:`list`, billed until aborted); returns how many.
        Only for a prefix no one is writing to. Files have none: 0."""
        return 0

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


def _check_range(uri: str, start: int, end: int) -> None:
    if start < 0 or end < 0:
        raise ValueError(f"reading {uri}: a byte range starts and ends at offsets >= 0, got {start} to {end}")


#: The backend for each URI scheme. The backends import this interface, so each adds itself
#: (:func:`_register`) rather than being imported here; the package imports them all.
_BACKENDS: dict[str, type[Storage]] = {}


def _register(backend: type[Storage]) -> None:
    """Make :meth:`Storage.for_uri` open ``backend.scheme`` URIs with ``backend``."""
    _BACKENDS[backend.scheme] = backend
