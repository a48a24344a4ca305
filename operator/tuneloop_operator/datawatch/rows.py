"""Counting the rows of one data object as the trainer's readers would see them, reading at most a
byte budget: JSON lines and JSON arrays and CSV/TSV records streamed, a Parquet file's footer read
with ranged GETs. The rules per format are in :mod:`tuneloop_operator.datawatch`.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any, Final

from tuneloop.storage import Storage, StorageError
from tuneloop.text import first_line

_CHUNK: Final = 1 << 20
_CSV_FIELD_LIMIT: Final = 2**31 - 1  # as the trainer: rows are bounded by bytes, not by field size
_PROBLEM_CHARS: Final = 200


@dataclass
class ObjectCount:
    """Rows counted in one object."""

    rows: int
    bytes_read: int
    complete: bool
    problem: str | None = None


class _CountingReader(io.RawIOBase):
    """A raw binary reader that counts the bytes it read; :meth:`_next` says where they come from."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._next(len(view))
        view[: len(data)] = data
        self.bytes_read += len(data)
        return len(data)

    def _next(self, size: int) -> bytes:
        """At most ``size`` more bytes; none at the end."""
        raise NotImplementedError


class _Budget(_CountingReader):
    """Reads at most ``limit`` bytes of ``stream``; ``truncated`` once more was there."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        super().__init__()
        self._stream = stream
        self._left = max(0, limit)
        self.truncated = False

    def _next(self, size: int) -> bytes:
        if self._left <= 0:
            if not self.truncated and self._stream.read(1):
                self.truncated = True
            return b""
        data = self._stream.read(min(size, self._left))
        self._left -= len(data)
        return data

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


class _RangeFile(_CountingReader):
    """A seekable read-only file over ranged reads of one object, for ``pyarrow``'s footer reader."""

    def __init__(self, storage: Storage, uri: str, size: int, etag: str | None) -> None:
        super().__init__()
        self._storage = storage
        self._uri = uri
        self._size = size
        self._etag = etag
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _next(self, size: int) -> bytes:
        end = min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        data = self._storage.read_range(self._uri, self._pos, end, etag=self._etag)
        self._pos += len(data)
        return data


def _count_parquet(storage: Storage, uri: str, size: int, etag: str | None) -> ObjectCount:
    import pyarrow.parquet as pq  # noqa: PLC0415 - about 40 MB of memory, paid once a Parquet file is counted

    source = _RangeFile(storage, uri, size, etag)
    try:
        metadata = pq.read_metadata(source)
    except StorageError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
        return ObjectCount(
            0,
            source.bytes_read,
            complete=False,
            problem=f"not a readable Parquet file ({first_line(exc, _PROBLEM_CHARS)})",
        )
    return ObjectCount(int(metadata.num_rows), source.bytes_read, complete=True)


def count_object(storage: Storage, uri: str, *, key: str, size: int, etag: str | None, budget: int) -> ObjectCount:
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
            return ObjectCount(0, bounded.bytes_read, complete=False, problem=f"cannot be parsed as CSV ({exc})")
        return ObjectCount(rows, bounded.bytes_read, complete=not bounded.truncated)
