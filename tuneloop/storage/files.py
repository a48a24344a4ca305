"""The local-filesystem backend: :class:`FileStorage`, for ``file:///absolute/path`` URIs (laptops,
mounted volumes, tests), with the same semantics as S3: atomic writes, verified copies, prefixes that
exist only while objects are under them, and conditional writes for claims.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import io
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from tuneloop.storage.base import Storage, _check_range, _register
from tuneloop.storage.keys import _file_path, _file_uri
from tuneloop.storage.localfiles import (
    _TMP_PREFIX,
    MiB,
    _fsync_dir,
    _local_files,
    _normalize_sha256,
    _publish,
    _tmp_beside,
    _Verification,
    _verify,
)
from tuneloop.storage.results import (
    InvalidUriError,
    NotFoundError,
    ObjectInfo,
    PreconditionFailedError,
    StorageError,
    VersionedBytes,
)

if TYPE_CHECKING:
    from tuneloop.api.spec import Storage as StorageSettings


class FileStorage(Storage):
    """Storage on a filesystem, for ``file:///absolute/path`` URIs (laptops, mounted volumes, tests).

    Same semantics as :class:`S3Storage`: writes and downloads are atomic (a temporary file in the
    target directory, then a rename); ``download_file`` checks the size and, when given,
    ``expected_sha256``. Files whose names start with ``.tuneloop-tmp-`` are in-flight writes
    and never listed.
    """

    scheme = "file"

    @classmethod
    def _open(cls, uri: str, settings: StorageSettings | None, env: Mapping[str, str] | None) -> FileStorage:
        _file_path(uri)
        return cls()

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


def _holds_objects(directory: Path) -> bool:
    """Whether a folder holds an object, as an S3 prefix exists only while objects are under it: a
    folder with nothing but empty folders or in-flight temporary files (a writer killed before its
    rename) is not listed, so a run a killed writer never finished claiming is not taken for one."""
    return any(f.is_file() and not f.name.startswith(_TMP_PREFIX) for f in directory.rglob("*") if not f.is_symlink())


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


_register(FileStorage)
