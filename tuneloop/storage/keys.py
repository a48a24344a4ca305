"""URIs and keys: parsing ``s3://`` and ``file://`` URIs, and the safety checks that keep every key
strictly under the prefix or directory it is meant for.

:func:`safe_join` builds a URI under an output prefix and refuses anything that could climb out of
it ('..', absolute keys, backslashes, empty or '.' segments, control characters, percent-encoded
traversal); :func:`_plan_local_paths` refuses, before anything is downloaded, listed objects whose
keys would land outside the destination directory.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Final
from urllib.parse import unquote

from tuneloop.storage.results import InvalidUriError, ObjectInfo, UnsafeKeyError
from tuneloop.text import clip

_BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_KEY_MAX_BYTES: Final = 1024
_NAME_MAX_BYTES: Final = 255
# Characters that re-order how a name is displayed; a name using them can pass for another one.
_BIDI_CONTROLS: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


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
    return clip(repr(value), limit)


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
