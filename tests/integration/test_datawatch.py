"""The new-data watch (tuneloop_operator.datawatch) on moto S3 and file://: listings and their
fingerprints, one shared listing per prefix, row counts per format, only new or changed objects
read, and the read limit."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.harness.s3 import S3Harness
from tuneloop.storage import FileStorage, NotFoundError, S3Storage, Storage
from tuneloop_operator.datawatch import LISTING_FORMAT, DataWatch, Listing, RowCount

pytestmark = pytest.mark.integration

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# --- data, with the rows each file holds ----------------------------------------------------

JSONL = b'{"text": "a"}\n\n{"text": "b"}\n   \n{"text": "c"}'  # blank lines are not rows; no final newline
# 3 records, two of them over several lines (LF and CRLF inside quotes), and a blank line.
CSV = b'text,label\n"line one\nline two",1\n"has ""quotes"", and, commas",0\r\n"crlf\r\ninside",1\n\n'
TSV = b'text\tlabel\nhello\t1\n"not quoted\t0\n'  # TSV has no quoting: the quote is a character
JSON_ARRAY = (
    b'\xef\xbb\xbf [\n {"text": "x, ]} \\" [", "label": 1},\n {"text": "y", "tags": [1, 2, {"a": "}"}]},\n 3\n]\n'
)
JSON_LINES = b'{"text": "p"}\n{"text": "q"}\n'


def parquet_bytes(rows: int, *, row_group_size: int = 1000, width: int = 8) -> bytes:
    texts = [os.urandom(width).hex() for _ in range(rows)]  # incompressible: the file is large
    table = pa.table({"text": texts, "label": [i % 2 for i in range(rows)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, compression="none")
    return bytes(sink.getvalue().to_pybytes())


DATASET = {
    "train/a.jsonl": (JSONL, 3),
    "train/b.csv": (CSV, 3),
    "c.tsv": (TSV, 2),
    "d.json": (JSON_ARRAY, 3),
    "e.JSON": (JSON_LINES, 2),
}
IGNORED = {"README.md": b"# not data\n", "notes.txt": b"a\nb\n", "train/.jsonl": b"{}\n"}


# --- the two backends, each counting what it is asked -------------------------------------


class CountingFileStorage(FileStorage):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def list(self, uri: str) -> list[Any]:
        self.calls.append(("list", uri))
        return super().list(uri)

    def open_read(self, uri: str, *, etag: str | None = None) -> BinaryIO:
        self.calls.append(("read", uri))
        return super().open_read(uri, etag=etag)

    def read_range(self, uri: str, start: int, end: int, *, etag: str | None = None) -> bytes:
        self.calls.append(("range", uri))
        return super().read_range(uri, start, end, etag=etag)


@dataclass
class Backend:
    """A dataset prefix on one backend, and what its storage client was asked to do."""

    name: str
    prefix: str
    storage: Storage
    put: Callable[[str, bytes], None]
    remove: Callable[[str], None]
    calls: list[tuple[str, str]] = field(default_factory=list)

    def uri(self, key: str) -> str:
        return self.prefix + key

    def listings(self) -> int:
        return sum(1 for op, _ in self.calls if op == "list")

    def reads(self) -> list[str]:
        """Keys read (whole or by range), in order, relative to the prefix."""
        return [target.removeprefix(self.prefix) for op, target in self.calls if op in ("read", "range")]

    def reset(self) -> None:
        self.calls.clear()


def s3_backend(s3: S3Harness, prefix: str = "datasets/reviews/") -> Backend:
    storage = Storage.for_uri(s3.uri(prefix))
    assert isinstance(storage, S3Storage)
    backend = Backend(
        name="s3",
        prefix=s3.uri(prefix),
        storage=storage,
        put=lambda key, data: s3.put_bytes(prefix + key, data),
        remove=lambda key: s3.client.delete_object(Bucket=s3.bucket, Key=prefix + key),
    )

    def seen(params: dict[str, Any], model: Any, **_: Any) -> None:
        # One event per API call (retries are not counted): the requests S3 bills.
        if model.name == "ListObjectsV2":
            backend.calls.append(("list", f"s3://{params['Bucket']}/{params.get('Prefix', '')}"))
        elif model.name == "GetObject":
            op = "range" if "Range" in params else "read"
            backend.calls.append((op, f"s3://{params['Bucket']}/{params['Key']}"))
        else:
            backend.calls.append((model.name, ""))

    storage.client.meta.events.register("before-parameter-build.s3", seen)
    return backend


def file_backend(root: Path) -> Backend:
    storage = CountingFileStorage()
    directory = root / "reviews"
    directory.mkdir(parents=True)

    def put(key: str, data: bytes) -> None:
        path = directory / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return Backend(
        name="file",
        prefix=f"file://{directory}/",
        storage=storage,
        put=put,
        remove=lambda key: (directory / key).unlink(),
        calls=storage.calls,
    )


@pytest.fixture(params=["s3", "file"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "s3":
        return s3_backend(request.getfixturevalue("s3"))
    return file_backend(tmp_path)


def fill(backend: Backend, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        backend.put(key, data)


def listing(backend: Backend, watch: DataWatch | None = None) -> Listing:
    return run((watch or DataWatch()).listing(backend.storage, backend.prefix, max_age=0))


def count(
    backend: Backend, current: Listing, since: Listing | None, *, limit: int = 1 << 30, watch: DataWatch | None = None
) -> RowCount:
    return run(
        (watch or DataWatch()).count_new_rows(backend.storage, backend.prefix, current, since, limit_bytes=limit)
    )


# --- listings -----------------------------------------------------------------------------


def test_a_listing_holds_the_data_files_with_a_stable_fingerprint(backend: Backend) -> None:
    fill(backend, {key: data for key, (data, _) in DATASET.items()} | IGNORED)
    first = listing(backend)
    assert sorted(first.objects) == sorted(DATASET)  # README.md, notes.txt and a bare '.jsonl' are not data
    assert first.total_bytes == sum(len(data) for data, _ in DATASET.values())
    assert first.objects["train/a.jsonl"][0] == len(JSONL)
    assert all(etag for _, etag in first.objects.values())  # S3 ETags; file modification times
    assert first.base_uri == backend.prefix
    assert first.uri_of("train/b.csv") == backend.uri("train/b.csv")
    assert len(first.fingerprint) == 32
    int(first.fingerprint, 16)

    again = listing(backend)
    assert again.fingerprint == first.fingerprint
    assert again == first
    assert backend.reads() == []  # listing reads no object
    assert backend.listings() == 2


def test_the_fingerprint_changes_on_upload_replace_and_removal(backend: Backend) -> None:
    fill(backend, {"a.jsonl": b'{"text": "1"}\n', "b.jsonl": b'{"text": "2"}\n'})
    before = listing(backend)

    backend.put("c.jsonl", b'{"text": "3"}\n')
    added = listing(backend)
    assert added.fingerprint != before.fingerprint
    assert added.diff(before).new == ("c.jsonl",)
    assert added.diff(before).changed == ()

    backend.put("a.jsonl", b'{"text": "9"}\n')  # same size, other content
    replaced = listing(backend)
    assert replaced.objects["a.jsonl"][0] == added.objects["a.jsonl"][0]
    assert replaced.fingerprint != added.fingerprint
    assert replaced.diff(added).changed == ("a.jsonl",)
    assert replaced.diff(added).new == ()

    backend.remove("b.jsonl")
    removed = listing(backend)
    assert removed.diff(replaced).removed == ("b.jsonl",)
    assert removed.fingerprint != replaced.fingerprint

    backend.put("notes.txt", b"not data\n")  # a file the trainer does not read changes nothing
    assert listing(backend).fingerprint == removed.fingerprint


def test_a_single_object_uri_is_listed_as_that_object(backend: Backend) -> None:
    fill(backend, {"only.csv": CSV, "other.csv": CSV})
    uri = backend.uri("only.csv")
    single = run(DataWatch().listing(backend.storage, uri, max_age=0))
    assert dict(single.objects).keys() == {"only.csv"}
    assert single.uri_of("only.csv") == uri
    counted = run(DataWatch().count_new_rows(backend.storage, uri, single, None, limit_bytes=1 << 20))
    assert (counted.rows, counted.exact) == (3, True)


def test_a_listing_round_trips_through_json() -> None:
    original = Listing(objects={"b.csv": (10, "etag-b"), "a.jsonl": (5, None)}, base_uri="s3://bucket/data/")
    wire = json.loads(json.dumps(original.to_json()))
    assert wire["format"] == LISTING_FORMAT == "tuneloop-data-listing/1"
    assert [o["key"] for o in wire["objects"]] == ["a.jsonl", "b.csv"]
    back = Listing.from_json(wire)
    assert back == original
    assert back.fingerprint == original.fingerprint
    assert back.total_bytes == 15

    with pytest.raises(ValueError, match="does not match its objects"):
        Listing.from_json(wire | {"objects": [{"key": "a.jsonl", "size": 6, "etag": None}]})
    with pytest.raises(ValueError, match="unknown data listing format 'tuneloop-data-listing/2'"):
        Listing.from_json(wire | {"format": "tuneloop-data-listing/2"})
    with pytest.raises(ValueError, match="entry 0 of the data listing"):
        Listing.from_json(wire | {"objects": [{"key": "a", "size": -1}], "fingerprint": None})


def test_a_listing_written_to_storage_is_the_watermark_read_back(s3: S3Harness) -> None:
    backend = s3_backend(s3)
    fill(backend, {"a.jsonl": JSONL})
    current = listing(backend)
    uri = s3.uri("models/bot/runs/1/data-listing.json")
    backend.storage.write_json(uri, current.to_json())
    assert Listing.from_json(backend.storage.read_json(uri)) == current


# --- one listing per prefix ---------------------------------------------------------------


def test_jobs_watching_the_same_prefix_share_one_listing(s3: S3Harness) -> None:
    backend = s3_backend(s3)
    fill(backend, {"a.jsonl": JSONL})
    s3.put_bytes("other/x.csv", CSV)
    now = [1000.0]
    watch = DataWatch(clock=lambda: now[0])
    storage = backend.storage

    async def scenario() -> None:
        first = await watch.listing(storage, backend.prefix, max_age=60)
        second = await watch.listing(storage, backend.prefix, max_age=60)  # another job, same prefix
        assert second is first
        assert backend.listings() == 1

        now[0] += 59
        assert await watch.listing(storage, backend.prefix, max_age=60) is first
        assert await watch.listing(storage, backend.prefix, max_age=30) is not first  # a job polling faster
        assert backend.listings() == 2

        now[0] += 120
        many = await asyncio.gather(*(watch.listing(storage, backend.prefix, max_age=60) for _ in range(20)))
        assert all(item is many[0] for item in many)  # one listing under way serves all who ask meanwhile
        assert backend.listings() == 3

        await watch.listing(storage, s3.uri("other/"), max_age=60)  # another prefix: its own listing
        assert backend.listings() == 4

    run(scenario())
    assert watch.stats.listings == 4
    assert watch.stats.shared == 2 + 19


def test_listings_are_shared_per_storage_client_or_cache_key(s3: S3Harness) -> None:
    fill(s3_backend(s3), {"a.jsonl": JSONL})
    prefix = s3.uri("datasets/reviews/")
    watch = DataWatch()
    one, other = Storage.for_uri(prefix), Storage.for_uri(prefix)  # e.g. two jobs' credentials

    async def scenario() -> None:
        a = await watch.listing(one, prefix, max_age=60)
        b = await watch.listing(other, prefix, max_age=60)
        assert a is not b  # another client may see other objects (other credentials): its own listing
        c = await watch.listing(one, prefix, max_age=60, cache_key="digest-1")
        d = await watch.listing(other, prefix, max_age=60, cache_key="digest-1")
        assert d is c  # the caller says both clients are the same settings and credentials

    run(scenario())
    assert watch.stats.listings == 3


def test_the_listing_cache_is_bounded(s3: S3Harness) -> None:
    backend = s3_backend(s3, prefix="")
    for name in ("p1", "p2", "p3"):
        s3.put_bytes(f"{name}/a.jsonl", JSONL)
    watch = DataWatch(max_listings=2)

    async def scenario() -> None:
        for name in ("p1", "p2", "p3", "p3", "p1"):
            await watch.listing(backend.storage, s3.uri(f"{name}/"), max_age=3600)

    run(scenario())
    assert backend.listings() == 4  # p1 fell out when p3 came in; p3 was still cached


def test_a_storage_error_propagates(s3: S3Harness) -> None:
    uri = "s3://no-such-bucket-tuneloop/data/"
    with pytest.raises(NotFoundError, match="bucket no-such-bucket-tuneloop does not exist"):
        run(DataWatch().listing(Storage.for_uri(uri), uri, max_age=60))


# --- row counts ---------------------------------------------------------------------------


def test_rows_are_counted_per_format(backend: Backend) -> None:
    parquet = parquet_bytes(20_000, width=32)  # about 1.3 MB
    fill(backend, {key: data for key, (data, _) in DATASET.items()} | IGNORED | {"f.parquet": parquet})
    current = listing(backend)
    backend.reset()

    counted = count(backend, current, None)
    assert counted.rows == sum(rows for _, rows in DATASET.values()) + 20_000
    assert (counted.objects, counted.new, counted.changed, counted.exact) == (6, 6, 0, True)
    assert counted.detail == f"{counted.rows:,} rows in 6 new data objects under {backend.prefix}"

    reads = backend.reads()
    assert set(reads) == {*DATASET, "f.parquet"}  # nothing but the data files
    assert all(reads.count(key) == 1 for key in DATASET)  # text files: one streamed read each
    assert reads[0] == "f.parquet"  # footers first: they are cheap
    # Parquet: the footer only, by range, never the column data.
    assert {op for op, target in backend.calls if target.endswith("f.parquet")} == {"range"}
    text_bytes = sum(len(data) for data, _ in DATASET.values())
    assert counted.bytes_read - text_bytes < len(parquet) // 10


def test_only_new_or_changed_objects_are_read(backend: Backend) -> None:
    fill(backend, {"a.jsonl": JSONL, "b.csv": CSV, "c.parquet": parquet_bytes(50)})
    watermark = listing(backend)

    backend.put("new.jsonl", JSON_LINES)  # 2 rows
    backend.put("a.jsonl", JSONL + b"\n" + JSON_LINES)  # replaced: counts with all its 5 rows
    backend.remove("b.csv")
    current = listing(backend)
    backend.reset()

    watch = DataWatch()
    counted = count(backend, current, watermark, watch=watch)
    assert (counted.rows, counted.objects, counted.exact) == (7, 2, True)
    assert (counted.new, counted.changed, counted.removed) == (1, 1, 1)
    assert sorted(backend.reads()) == ["a.jsonl", "new.jsonl"]  # c.parquet unchanged: not read
    assert counted.detail == (
        f"7 rows in 1 new and 1 changed data objects under {backend.prefix}; "
        "a changed object counts with all its rows; 1 removed (not subtracted)"
    )

    # Asked again (the next poll, another job on the prefix): nothing is read again.
    backend.reset()
    again = count(backend, current, watermark, watch=watch)
    assert (again.rows, again.objects, again.exact, again.bytes_read) == (7, 2, True, 0)
    assert backend.reads() == []
    assert watch.stats.counts_cached == 2

    nothing = count(backend, current, current)
    assert (nothing.rows, nothing.objects, nothing.exact) == (0, 0, True)
    assert nothing.detail == f"no new or changed data objects under {backend.prefix}"


def test_reading_stops_at_the_limit_with_a_lower_bound(backend: Backend) -> None:
    line = b'{"text": "' + b"x" * 37 + b'"}\n'
    assert len(line) == 50
    fill(backend, {"big.jsonl": line * 2000, "z.jsonl": line * 10})
    current = listing(backend)
    backend.reset()

    counted = count(backend, current, None, limit=30_025)
    assert counted.rows == 600  # complete lines in the first 30,025 bytes; the cut line is not counted
    assert (counted.objects, counted.exact) == (0, False)
    assert counted.bytes_read <= 30_025
    assert backend.reads() == ["big.jsonl"]  # z.jsonl: not started, the limit was reached
    assert counted.detail.startswith(f"at least 600 rows in 2 new data objects under {backend.prefix}")
    assert "stopped after reading 30,025 bytes (the read limit), 2 objects not counted to the end" in counted.detail

    assert count(backend, current, None, limit=1 << 20).rows == 2010


def test_a_limit_inside_a_quoted_csv_record_counts_complete_records_only(backend: Backend) -> None:
    records = [f'"review {i}\nspans lines, with ""quotes""",{i % 2}\n'.encode() for i in range(10)]
    data = b"text,label\n" + b"".join(records)
    fill(backend, {"r.csv": data})
    current = listing(backend)
    cut = len(b"text,label\n" + b"".join(records[:3])) + 12  # inside the quoted field of record 4
    assert data[cut - 1 : cut] not in (b"\n", b'"')
    partial = count(backend, current, None, limit=cut)
    assert (partial.rows, partial.exact) == (3, False)
    whole = count(backend, current, None, limit=len(data))
    assert (whole.rows, whole.exact) == (10, True)


def test_a_limit_inside_a_json_array_counts_complete_elements_only(backend: Backend) -> None:
    elements = [json.dumps({"text": f'item {i}, with [brackets] and "quotes"'}).encode() for i in range(10)]
    data = b"[" + b",\n".join(elements) + b"]"
    fill(backend, {"items.json": data})
    current = listing(backend)
    cut = data.index(elements[4]) + 5
    assert count(backend, current, None, limit=cut).rows == 4
    assert count(backend, current, None, limit=len(data)).rows == 10


def test_an_object_replaced_after_the_listing_is_not_counted(s3: S3Harness) -> None:
    backend = s3_backend(s3)
    fill(backend, {"a.jsonl": JSONL, "b.jsonl": JSON_LINES})
    current = listing(backend)
    backend.put("a.jsonl", JSONL + b"\n" + JSONL)  # replaced between the listing and the count
    counted = count(backend, current, None)
    assert (counted.rows, counted.objects, counted.exact) == (2, 1, False)
    assert "not counted: a.jsonl changed or was removed while it was counted" in counted.detail


def test_a_file_that_is_not_parquet_is_named_not_counted(backend: Backend) -> None:
    fill(backend, {"bad.parquet": b"this is not parquet at all", "ok.jsonl": JSON_LINES})
    counted = count(backend, listing(backend), None)
    assert (counted.rows, counted.objects, counted.exact) == (2, 1, False)
    assert "not counted: bad.parquet not a readable Parquet file (" in counted.detail


def test_a_job_cancelled_while_waiting_does_not_cancel_the_shared_listing(tmp_path: Path) -> None:
    backend = file_backend(tmp_path)
    fill(backend, {"a.jsonl": JSONL})
    watch = DataWatch()

    async def scenario() -> None:
        first = asyncio.create_task(watch.listing(backend.storage, backend.prefix, max_age=60))
        second = asyncio.create_task(watch.listing(backend.storage, backend.prefix, max_age=60))
        await asyncio.sleep(0)  # both are waiting for the one listing under way
        first.cancel()
        listed = await second
        assert sorted(listed.objects) == ["a.jsonl"]
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await watch.listing(backend.storage, backend.prefix, max_age=60) is listed

    run(scenario())
    assert backend.listings() == 1
