"""The local side of a transfer: files written atomically and verified before they are published.

A download or ``file://`` write lands in a temporary file (``.tuneloop-tmp-…``) beside its
destination, is checked against a :class:`_Verification` (size and SHA-256 digests from named
sources), and only then renamed onto the destination; a failed check leaves the destination as it
was. :func:`_local_files` walks a directory the way :meth:`Storage.upload_dir` uploads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from tuneloop.storage.keys import _show
from tuneloop.storage.results import StorageError

MiB: Final = 1024 * 1024
#: Name prefix of in-flight temporary files; listings never show them.
_TMP_PREFIX: Final = ".tuneloop-tmp-"
_HEX_SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path | str) -> str:
    """The hex SHA-256 of a file's content, read in chunks."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def _local_files(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, '/'-separated relative key) for every file under ``root``, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames):
            path = base / name
            if path.is_file():
                yield path, PurePosixPath(*path.relative_to(root).parts).as_posix()
