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

* Only data files count: keys ending in one of :data:`tuneloop.contract.DATA_SUFFIXES`
  (case-insensitive), as the trainer picks them from a prefix.
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

The package's modules: :mod:`~tuneloop_operator.datawatch.listing` (a listing, its fingerprint and
its JSON form), :mod:`~tuneloop_operator.datawatch.rows` (the rows of one object, within a byte
budget), :mod:`~tuneloop_operator.datawatch.watch` (the shared watcher, its caches and its words).
"""

from tuneloop_operator.datawatch.listing import LISTING_FORMAT, Listing
from tuneloop_operator.datawatch.watch import DataWatch, DataWatchStats, RowCount

__all__ = ["LISTING_FORMAT", "DataWatch", "DataWatchStats", "Listing", "RowCount"]
