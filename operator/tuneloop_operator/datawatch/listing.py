"""What is under a dataset location at one moment: :class:`Listing` (key → size and ETag, with a
fingerprint), compared with an earlier one as a :class:`ListingDiff`, stored as
``runs/<n>/data-listing.json`` (format :data:`LISTING_FORMAT`), taken by :func:`take_listing`.

Only data files are listed: keys ending in one of :data:`tuneloop.contract.DATA_SUFFIXES`
(case-insensitive), as the trainer picks them from a prefix. ``file://`` locations have no ETags:
the modification time stands in for them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any, Final

from tuneloop.contract import DATA_SUFFIXES
from tuneloop.storage import Storage

#: The ``format`` of a serialized :class:`Listing` (``runs/<n>/data-listing.json``).
LISTING_FORMAT: Final = "tuneloop-data-listing/1"
#: Hex digits of a listing's fingerprint (128 bits).
FINGERPRINT_HEX: Final = 32

_MTIME_PREFIX: Final = "mtime:"


@dataclass(frozen=True)
class ListingDiff:
    """Keys of a listing compared with an earlier one."""

    new: tuple[str, ...]
    changed: tuple[str, ...]
    """Same key, another size or ETag."""
    removed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.removed)


@dataclass(frozen=True)
class Listing:
    """The data files under a dataset location at one moment: key → (size, ETag).

    Keys are relative to the listed location (a single object's key is its name), as
    :meth:`tuneloop.storage.Storage.list` gives them. ``fingerprint`` and ``total_bytes`` are
    computed from ``objects``; two listings with the same objects have the same fingerprint.
    """

    objects: Mapping[str, tuple[int, str | None]]
    """Key → (size in bytes, S3 ETag without quotes; for files ``mtime:<ISO time>``)."""
    fingerprint: str = field(init=False)
    """SHA-256 (first 32 hex digits) of the sorted (key, size, ETag) triples."""
    total_bytes: int = field(init=False)
    """Sum of the sizes."""
    base_uri: str = ""
    """The URI the keys are relative to (ends with '/'): an object's URI is ``base_uri + key``."""

    def __post_init__(self) -> None:
        items = sorted((str(k), (int(v[0]), None if v[1] is None else str(v[1]))) for k, v in self.objects.items())
        object.__setattr__(self, "objects", MappingProxyType(dict(items)))
        triples = [[key, size, etag] for key, (size, etag) in items]
        digest = hashlib.sha256(json.dumps(triples, separators=(",", ":")).encode("ascii")).hexdigest()
        object.__setattr__(self, "fingerprint", digest[:FINGERPRINT_HEX])
        object.__setattr__(self, "total_bytes", sum(size for _, (size, _) in items))

    def __hash__(self) -> int:
        return hash((self.fingerprint, self.base_uri))

    @property
    def count(self) -> int:
        """Objects listed."""
        return len(self.objects)

    def uri_of(self, key: str) -> str:
        """The full URI of the object ``key``."""
        if not self.base_uri:
            raise ValueError(f"the listing has no base URI to locate {key!r} with; build it with base_uri")
        return self.base_uri + key

    def diff(self, since: Listing | None) -> ListingDiff:
        """What was added, changed and removed since ``since`` (everything is new when it is ``None``)."""
        before: Mapping[str, tuple[int, str | None]] = since.objects if since is not None else {}
        new = tuple(k for k in self.objects if k not in before)
        changed = tuple(k for k, v in self.objects.items() if k in before and before[k] != v)
        removed = tuple(k for k in before if k not in self.objects)
        return ListingDiff(new=new, changed=changed, removed=removed)

    def to_json(self) -> dict[str, Any]:
        """The listing as JSON (``runs/<n>/data-listing.json``), format :data:`LISTING_FORMAT`."""
        return {
            "format": LISTING_FORMAT,
            "baseUri": self.base_uri,
            "fingerprint": self.fingerprint,
            "totalBytes": self.total_bytes,
            "objects": [{"key": k, "size": size, "etag": etag} for k, (size, etag) in self.objects.items()],
        }

    @classmethod
    def from_json(cls, data: Any) -> Listing:
        """A listing read back from :meth:`to_json`'s output (parsed JSON).

        Raises ``ValueError`` naming what is wrong: another format (written by a newer operator),
        a malformed entry, or a fingerprint that does not match the objects (the file was edited).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a data listing is a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != LISTING_FORMAT:
            raise ValueError(
                f"unknown data listing format {fmt!r} (this operator reads {LISTING_FORMAT!r}); "
                "it was written by another version of the operator"
            )
        base = data.get("baseUri", "")
        entries = data.get("objects")
        if not isinstance(base, str) or not isinstance(entries, list):
            raise ValueError("a data listing needs 'baseUri' (a string) and 'objects' (a list)")
        objects: dict[str, tuple[int, str | None]] = {}
        for i, entry in enumerate(entries):
            key = entry.get("key") if isinstance(entry, Mapping) else None
            size = entry.get("size") if isinstance(entry, Mapping) else None
            etag = entry.get("etag") if isinstance(entry, Mapping) else None
            if (
                not isinstance(key, str)
                or not isinstance(size, int)
                or isinstance(size, bool)
                or size < 0
                or not (etag is None or isinstance(etag, str))
            ):
                raise ValueError(f"entry {i} of the data listing is not {{key: str, size: int >= 0, etag: str|null}}")
            if key in objects:
                raise ValueError(f"the data listing names {key!r} twice")
            objects[key] = (size, etag)
        listing = cls(objects=objects, base_uri=base)
        stored = data.get("fingerprint")
        if stored is not None and stored != listing.fingerprint:
            raise ValueError(
                f"the data listing's fingerprint {stored!r} does not match its objects ({listing.fingerprint}); "
                "the file was edited or damaged"
            )
        return listing


def is_data_key(key: str) -> bool:
    """Whether the trainer reads an object with this key as data."""
    return PurePosixPath(key).suffix.lower() in DATA_SUFFIXES


def take_listing(storage: Storage, uri: str) -> Listing:
    """The data files under ``uri`` now: one paginated listing, no object read (raises
    :class:`tuneloop.storage.StorageError`)."""
    objects: dict[str, tuple[int, str | None]] = {}
    base = uri if uri.endswith("/") else uri + "/"
    for info in storage.list(uri):
        if not is_data_key(info.key):
            continue
        etag = info.etag
        if etag is None and info.last_modified is not None:
            etag = _MTIME_PREFIX + info.last_modified.isoformat()
        objects[info.key] = (info.size, etag)
        base = info.uri[: len(info.uri) - len(info.key)]
    return Listing(objects=objects, base_uri=base)
