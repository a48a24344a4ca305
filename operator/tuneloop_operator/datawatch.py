"""Watching a dataset location for new data (``spec.retrain.onNewData``): the operator's I/O edge.

Two questions, each answered without downloading anything that did not change:

* :meth:`DataWatch.listing` — what is under ``dataset.uri`` now: one paginated listing (keys,
  sizes, ETags) of its data files, as a :class:`Listing` with a fingerprint. Jobs that watch the
  same location with the same storage client share it: within ``max_age`` seconds one listing
  serves them all (and jobs asking while it is under way wait for it), so polling costs
  O(distinct prefixes) listings per interval, not O(jobs).
* :meth:`DataWatch.count_new_rows` — how many rows the objects added or changed since an earlier
  listing hold (the watermark: the listing the latest run trained on, ``runs/<n>/data-listing.json``).
  Objects whose (size, ETag) did not change are never read; an object counted once is not read
  again for as long as it stays the same (a bounded cache), whichever job asks.

What counts as a row follows the trainer's readers (``tuneloop_trainer.data.loading``):

* Only data files count: keys ending in one of :data:`tuneloop.contract.DATA_SUFFIXES` (case-insensitive), as the
  trainer picks them from a prefix.
* JSON lines (``.jsonl``, and ``.json`` unless it holds one array): lines that are not blank.
  A ``.json`` file whose first character is ``[``: the elements of that array. Streamed.
* CSV and TSV: records that are not empty, less the header line (CSV quoting: a quoted field may
  hold newlines and delimiters; TSV has no quoting). Streamed, one record in memory at a time. A
  file without a header line counts one row short.
* Parquet: ``num_rows`` from the file's footer, read with ranged GETs of its tail (the column
  data is never read).
* A *changed* object (same key, another size or ETag) counts with all its rows: a store does not
  say which rows an object held before it was replaced, and appended files are rare in object
  storage (a replacement is a new object version). Removed objects subtract nothing.
* ``file://`` locations have no ETags: the modification time stands in for them, so a file that
  is rewritten, even with the same content, counts as changed.

Reads stop at ``limit_bytes``: the count is then a lower bound (``exact=False``, only complete
records counted) and says how far it got. Parquet footers are read first (they are cheap), then
the other objects in key order; a footer is read whole even when it crosses the limit.

Storage errors (:class:`tuneloop.storage.StorageError`) propagate: the caller reports them as a
condition. An object that changed or vanished between the listing and the read, or that cannot
be parsed (not Parquet, a CSV the csv module refuses), is left uncounted with ``exact=False`` and
named in ``detail``; the next poll's listing sees it again.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import IO, Any, Final

from tuneloop.contract import DATA_SUFFIXES
from tuneloop.storage import NotFoundError, PreconditionFailedError, Storage, StorageError

log = logging.getLogger(__name__)

__all__ = [
    "DATA_SUFFIXES",
    "LISTING_FORMAT",
    "DataWatch",
    "DataWatchStats",
    "Listing",
    "ListingDiff",
    "RowCount",
]

#: The ``format`` of a serialized :class:`Listing` (``runs/<n>/data-listing.json``).
LISTING_FORMAT: Final = "tuneloop-data-listing/1"
#: Hex digits of a listing's fingerprint (128 bits).
FINGERPRINT_HEX: Final = 32

_CHUNK: Final = 1 << 20
_CSV_FIELD_LIMIT: Final = 2**31 - 1  # as the trainer: rows are bounded by bytes, not by field size
_MTIME_PREFIX: Final = "mtime:"
_PROBLEM_CHARS: Final = 200


# --- listings ---------------------------------------------------------------------------


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


def _take_listing(storage: Storage, uri: str) -> Listing:
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


# --- row counts -------------------------------------------------------------------------


@dataclass(frozen=True)
class RowCount:
    """Rows in the objects added or changed since a listing."""

    rows: int
    """Rows counted; a lower bound when ``exact`` is false."""
    objects: int
    """New or changed objects whose rows were all counted."""
    exact: bool
    """Every new or changed object was counted completely."""
    detail: str
    """What was counted, in words (for status and Events)."""
    new: int = 0
    """Objects added since the earlier listing."""
    changed: int = 0
    """Objects with the same key and another size or ETag."""
    removed: int = 0
    """Objects gone since the earlier listing (their rows are not subtracted)."""
    bytes_read: int = 0
    """Bytes read from storage for this count (objects served from the cache read none)."""


@dataclass
class _ObjectCount:
    rows: int
    bytes_read: int
    complete: bool
    problem: str | None = None


class _Budget(io.RawIOBase):
    """Reads at most ``limit`` bytes of ``stream``; ``truncated`` once more was there."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        super().__init__()
        self._stream = stream
        self._left = max(0, limit)
        self.bytes_read = 0
        self.truncated = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._left <= 0:
            if not self.truncated and self._stream.read(1):
                self.truncated = True
            return 0
        data = self._stream.read(min(len(view), self._left))
        view[: len(data)] = data
        self._left -= len(data)
        self.bytes_read += len(data)
        return len(data)

    def chunks(self) -> Iterator[bytes]:
        while chunk := self.read(_CHUNK):
            yield chunk


class _LineCounter:
    """Lines that are not blank (JSON lines; the trainer skips blank ones)."""

    def __init__(self) -> None:
        self.rows = 0
        self._content = False

    def feed(self, chunk: bytes) -> None:
        *complete, rest = chunk.split(b"\n")
        for line in complete:
            if self._content or line.strip():
                self.rows += 1
            self._content = False
        if rest.strip():
            self._content = True

    def result(self, *, whole: bool) -> int:
        return self.rows + (1 if whole and self._content else 0)


_JSON_STRUCTURE: Final = re.compile(rb'[\[\]{},"]')
_JSON_STRING_STOP: Final = re.compile(rb'["\\]')
_JSON_SPACE: Final = b" \t\r\n"


class _JsonArrayCounter:
    """Elements of one top-level JSON array, counted as the bytes stream by: commas at depth 1,
    plus one for a non-empty array. Strings (with escapes) are skipped whole."""

    def __init__(self) -> None:
        self.depth = 0
        self.commas = 0
        self.has_element = False
        self.in_string = False
        self.escaped = False
        self.closed = False

    def feed(self, chunk: bytes) -> None:
        i, n = 0, len(chunk)
        while i < n and not self.closed:
            if self.escaped:
                self.escaped, i = False, i + 1
                continue
            if self.in_string:
                m = _JSON_STRING_STOP.search(chunk, i)
                if m is None:
                    return
                i = m.end()
                if m.group() == b"\\":
                    self.escaped = True
                else:
                    self.in_string = False
                continue
            if self.depth == 1 and not self.has_element:
                while i < n and chunk[i] in _JSON_SPACE:
                    i += 1
                if i == n:
                    return
                self.has_element = chunk[i] != ord("]")
            m = _JSON_STRUCTURE.search(chunk, i)
            if m is None:
                return
            i, c = m.end(), m.group()
            if c == b'"':
                self.in_string = True
            elif c in (b"[", b"{"):
                self.depth += 1
            elif c in (b"]", b"}"):
                self.depth -= 1
                self.closed = self.depth <= 0
            elif self.depth == 1:  # a comma between elements
                self.commas += 1

    def result(self, *, whole: bool) -> int:
        # Cut short, each comma still ends a complete element.
        return self.commas + (1 if whole and self.has_element else 0)


def _count_json(budget: _Budget, *, json_suffix: bool) -> int:
    chunks = budget.chunks()
    counter: _LineCounter | _JsonArrayCounter = _LineCounter()
    if json_suffix:
        # Decide by the first character after a byte-order mark and whitespace, as the trainer
        # does. Leading whitespace holds no rows for either reader, so it need not be kept.
        first = True
        for chunk in chunks:
            significant = (chunk.removeprefix(codecs.BOM_UTF8) if first else chunk).lstrip(_JSON_SPACE)
            first = False
            if significant:
                if significant.startswith(b"["):
                    counter = _JsonArrayCounter()
                counter.feed(chunk)
                break
    for chunk in chunks:
        counter.feed(chunk)
    return counter.result(whole=not budget.truncated)


class _Lines:
    """The lines of a text stream for ``csv.reader``; once the stream was cut short, an unterminated
    last line is held back, and ``exhausted`` tells a record completed only by the end of the data."""

    def __init__(self, text: IO[str], budget: _Budget) -> None:
        self._text = text
        self._budget = budget
        self.exhausted = False

    def __iter__(self) -> Iterator[str]:
        previous: str | None = None
        for line in self._text:
            if previous is not None:
                yield previous
            previous = line
        if previous is not None and (not self._budget.truncated or previous.endswith(("\n", "\r"))):
            yield previous
        self.exhausted = True


def _count_delimited(budget: _Budget, *, tsv: bool) -> int:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    buffered = io.BufferedReader(budget, buffer_size=_CHUNK)
    text = io.TextIOWrapper(buffered, encoding="utf-8", errors="surrogateescape", newline="")
    lines = _Lines(text, budget)
    reader = csv.reader(
        iter(lines), delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    )
    records = 0
    for record in reader:
        if lines.exhausted and budget.truncated:
            break  # a quoted record cut short by the limit
        if record:
            records += 1
    return max(0, records - 1)


class _RangeFile(io.RawIOBase):
    """A seekable read-only file over ranged reads of one object, for ``pyarrow``'s footer reader."""

    def __init__(self, storage: Storage, uri: str, size: int, etag: str | None) -> None:
        super().__init__()
        self._storage = storage
        self._uri = uri
        self._size = size
        self._etag = etag
        self._pos = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._size, self._pos + len(view))
        if end <= self._pos:
            return 0
        data = self._storage.read_range(self._uri, self._pos, end, etag=self._etag)
        view[: len(data)] = data
        self._pos += len(data)
        self.bytes_read += len(data)
        return len(data)


def _count_parquet(storage: Storage, uri: str, size: int, etag: str | None) -> _ObjectCount:
    import pyarrow.parquet as pq  # noqa: PLC0415 - about 40 MB of memory, paid once a Parquet file is counted

    source = _RangeFile(storage, uri, size, etag)
    try:
        metadata = pq.read_metadata(source)
    except StorageError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
        return _ObjectCount(
            0, source.bytes_read, complete=False, problem=f"not a readable Parquet file ({_brief(exc)})"
        )
    return _ObjectCount(int(metadata.num_rows), source.bytes_read, complete=True)


def _count_object(storage: Storage, uri: str, *, key: str, size: int, etag: str | None, budget: int) -> _ObjectCount:
    """Rows in one object, reading at most ``budget`` bytes (a Parquet footer: whole)."""
    suffix = PurePosixPath(key).suffix.lower()
    read_etag = etag if storage.scheme == "s3" else None
    if suffix == ".parquet":
        return _count_parquet(storage, uri, size, read_etag)
    with storage.open_read(uri, etag=read_etag) as stream:
        bounded = _Budget(stream, budget)
        try:
            if suffix in (".csv", ".tsv"):
                rows = _count_delimited(bounded, tsv=suffix == ".tsv")
            else:
                rows = _count_json(bounded, json_suffix=suffix == ".json")
        except csv.Error as exc:  # the csv module's messages name the problem, never the text
            return _ObjectCount(0, bounded.bytes_read, complete=False, problem=f"cannot be parsed as CSV ({exc})")
        return _ObjectCount(rows, bounded.bytes_read, complete=not bounded.truncated)


def _brief(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= _PROBLEM_CHARS else text[: _PROBLEM_CHARS - 1] + "…"


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB" if size >= 1 << 20 else f"{size:,} bytes"


# --- the watcher ------------------------------------------------------------------------


@dataclass
class DataWatchStats:
    """What a :class:`DataWatch` did since it was made (for metrics and benchmarks)."""

    listings: int = 0
    """Listings made (each one paginated LIST of a location)."""
    shared: int = 0
    """Listing requests served by a cached or in-flight listing."""
    objects_read: int = 0
    """Objects read to count rows (Parquet: footers only)."""
    bytes_read: int = 0
    """Bytes read to count rows."""
    counts_cached: int = 0
    """Objects whose row count came from the cache."""


@dataclass
class _CachedListing:
    listing: Listing
    taken_at: float
    storage: weakref.ref[Storage]


class DataWatch:
    """Listings and row counts of dataset locations, shared by every job of one operator.

    Listings are cached per (storage client, URI) — or per (``cache_key``, URI) where the caller
    passes a digest of the storage settings and credentials — in a bounded LRU; so are the row
    counts of objects, per (client, object URI, size, ETag). At most ``max_concurrent_reads``
    objects are read at a time, each in a worker thread (``asyncio.to_thread``).
    """

    def __init__(
        self,
        *,
        max_listings: int = 1024,
        max_counted_objects: int = 50_000,
        max_concurrent_reads: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_listings < 1 or max_counted_objects < 0 or max_concurrent_reads < 1:
            raise ValueError("max_listings and max_concurrent_reads must be >= 1, max_counted_objects >= 0")
        self.max_listings = max_listings
        self.max_counted_objects = max_counted_objects
        self.clock = clock
        self.stats = DataWatchStats()
        self._listings: OrderedDict[tuple[str, str], _CachedListing] = OrderedDict()
        self._inflight: dict[tuple[str, str], tuple[asyncio.Task[Listing], float, weakref.ref[Storage]]] = {}
        self._counts: OrderedDict[bytes, int] = OrderedDict()  # 16-byte digests: ~10 MB when full
        self._reads = asyncio.Semaphore(max_concurrent_reads)

    @staticmethod
    def _storage_key(storage: Storage, cache_key: str | None) -> str:
        return f"key:{cache_key}" if cache_key is not None else f"id:{id(storage)}"

    @staticmethod
    def _same_client(ref: weakref.ref[Storage], storage: Storage, cache_key: str | None) -> bool:
        # An id() can be reused once a client is gone: without a cache_key, only the very same
        # client object may use what another call cached.
        return cache_key is not None or ref() is storage

    async def listing(self, storage: Storage, uri: str, *, max_age: float, cache_key: str | None = None) -> Listing:
        """The data files under ``uri`` (a prefix or one object, ``s3://`` or ``file://``).

        A listing of the same location through the same client (or ``cache_key``) taken at most
        ``max_age`` seconds ago is returned as is; one under way is waited for. Otherwise one
        paginated listing is made (no object is read). Raises :class:`StorageError`.
        """
        key = (self._storage_key(storage, cache_key), uri)
        now = self.clock()
        cached = self._listings.get(key)
        if (
            cached is not None
            and self._same_client(cached.storage, storage, cache_key)
            and now - cached.taken_at <= max_age
        ):
            self._listings.move_to_end(key)
            self.stats.shared += 1
            return cached.listing
        inflight = self._inflight.get(key)
        if inflight is not None:
            task, started, ref = inflight
            if now - started <= max_age and self._same_client(ref, storage, cache_key):
                self.stats.shared += 1
                return await asyncio.shield(task)
        task = asyncio.create_task(self._list(storage, uri, key, now), name=f"tuneloop-list {uri}")
        task.add_done_callback(_retrieve)
        self._inflight[key] = (task, now, weakref.ref(storage))
        return await asyncio.shield(task)

    async def _list(self, storage: Storage, uri: str, key: tuple[str, str], started: float) -> Listing:
        try:
            self.stats.listings += 1
            listing = await asyncio.to_thread(_take_listing, storage, uri)
            self._listings[key] = _CachedListing(listing, started, weakref.ref(storage))
            self._listings.move_to_end(key)
            while len(self._listings) > self.max_listings:
                self._listings.popitem(last=False)
            log.debug("listed %s: %d data objects, %s", uri, listing.count, _mib(listing.total_bytes))
            return listing
        finally:
            current = self._inflight.get(key)
            if current is not None and current[0] is asyncio.current_task():
                del self._inflight[key]

    async def count_new_rows(
        self,
        storage: Storage,
        uri: str,
        current: Listing,
        since: Listing | None,
        *,
        limit_bytes: int,
        cache_key: str | None = None,
    ) -> RowCount:
        """Rows in the objects of ``current`` that are new or changed since ``since`` (all of them
        when ``since`` is ``None``), reading at most about ``limit_bytes`` bytes.

        ``uri`` is the location ``current`` lists (used when ``current`` has no ``base_uri``, and
        in messages). Raises :class:`StorageError` when the storage fails.
        """
        diff = current.diff(since)
        base = current.base_uri or (uri if uri.endswith("/") else uri + "/")
        skey = self._storage_key(storage, cache_key)
        todo = sorted((*diff.new, *diff.changed), key=lambda k: (not k.lower().endswith(".parquet"), k))
        rows = complete = bytes_read = 0
        problems: list[str] = []
        unread = partial = 0
        for key in todo:
            size, etag = current.objects[key]
            object_uri = base + key
            cache_entry = _count_key(skey, object_uri, size, etag) if etag is not None else None
            if cache_entry is not None and (known := self._counts.get(cache_entry)) is not None:
                self._counts.move_to_end(cache_entry)
                self.stats.counts_cached += 1
                rows += known
                complete += 1
                continue
            budget = limit_bytes - bytes_read
            if budget <= 0:
                unread += 1
                continue
            async with self._reads:
                try:
                    counted = await asyncio.to_thread(
                        functools.partial(_count_object, key=key, size=size, etag=etag, budget=budget),
                        storage,
                        object_uri,
                    )
                except (PreconditionFailedError, NotFoundError):
                    problems.append(f"{key} changed or was removed while it was counted")
                    continue
            self.stats.objects_read += 1
            self.stats.bytes_read += counted.bytes_read
            bytes_read += counted.bytes_read
            rows += counted.rows
            if counted.problem is not None:
                problems.append(f"{key} {counted.problem}")
            elif counted.complete:
                complete += 1
                self._remember(cache_entry, counted.rows)
            else:
                partial += 1
        exact = complete == len(todo)
        detail = _describe(
            uri,
            diff,
            rows=rows,
            complete=complete,
            total=len(todo),
            exact=exact,
            limit_bytes=limit_bytes,
            cut=unread + partial,
            problems=problems,
        )
        return RowCount(
            rows=rows,
            objects=complete,
            exact=exact,
            detail=detail,
            new=len(diff.new),
            changed=len(diff.changed),
            removed=len(diff.removed),
            bytes_read=bytes_read,
        )

    def _remember(self, entry: bytes | None, rows: int) -> None:
        if entry is None or self.max_counted_objects == 0:
            return
        self._counts[entry] = rows
        self._counts.move_to_end(entry)
        while len(self._counts) > self.max_counted_objects:
            self._counts.popitem(last=False)


def _count_key(storage_key: str, uri: str, size: int, etag: str) -> bytes:
    """The row-count cache's key of one version of one object."""
    return hashlib.blake2b(json.dumps([storage_key, uri, size, etag]).encode(), digest_size=16).digest()


def _retrieve(task: asyncio.Task[Listing]) -> None:
    """Mark a listing's failure as seen even when every caller waiting for it was cancelled."""
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _describe(
    uri: str,
    diff: ListingDiff,
    *,
    rows: int,
    complete: int,
    total: int,
    exact: bool,
    limit_bytes: int,
    cut: int,
    problems: list[str],
) -> str:
    parts = []
    if diff.new:
        parts.append(f"{len(diff.new):,} new")
    if diff.changed:
        parts.append(f"{len(diff.changed):,} changed")
    if not total:
        text = f"no new or changed data objects under {uri}"
    elif exact:
        text = f"{_plural(rows, 'row')} in {' and '.join(parts)} data object{'s' if total != 1 else ''} under {uri}"
    else:
        text = (
            f"at least {_plural(rows, 'row')} in {' and '.join(parts)} data object{'s' if total != 1 else ''} "
            f"under {uri} ({complete:,} of {total:,} counted completely)"
        )
    if diff.changed:
        text += "; a changed object counts with all its rows"
    if diff.removed:
        text += f"; {len(diff.removed):,} removed (not subtracted)"
    if cut:
        text += (
            f"; stopped after reading {_mib(limit_bytes)} (the read limit), "
            f"{_plural(cut, 'object')} not counted to the end"
        )
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        text += f"; not counted: {shown}"
    return text
