"""The watcher every job of one operator shares: :class:`DataWatch` answers "what is under this
dataset location now" (:meth:`~DataWatch.listing`, shared between jobs on one location) and "how
many rows arrived since that listing" (:meth:`~DataWatch.count_new_rows`, each version of an object
counted once), with bounded caches, and says in words what it counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tuneloop.storage import NotFoundError, PreconditionFailedError, Storage
from tuneloop_operator.datawatch.listing import Listing, ListingDiff, take_listing
from tuneloop_operator.datawatch.rows import count_object

log = logging.getLogger("tuneloop_operator.datawatch")


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


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB" if size >= 1 << 20 else f"{size:,} bytes"


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
            listing = await asyncio.to_thread(take_listing, storage, uri)
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
                        functools.partial(count_object, key=key, size=size, etag=etag, budget=budget),
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
