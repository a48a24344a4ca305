"""CSV (RFC 4180 quoting) and TSV (IANA: no quoting, tabs never inside fields).

Records are read with bounded reads (``maxRowBytes``): the rest of an oversize record is
skipped without being kept, so one 50 MB row costs no more memory than the limit. The first
record is the header, unless it names none of the columns and the file reads as headerless
(SST-2 and many GLUE exports are): see :func:`_is_headerless`.
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Final

from tuneloop_trainer.data.rows import (
    SKIP_CHUNK,
    Column,
    RawRow,
    has_bad_text,
    looks_like_name,
    missing_column,
    too_large,
)
from tuneloop_trainer.errors import InvalidDataError

#: How many rows after the first are compared when deciding whether a CSV has a header.
_HEADER_SNIFF_ROWS: Final = 200
#: CSV fields may be whole documents: rows are bounded by ``maxRowBytes`` instead of the
#: csv module's own field limit (128 KiB by default).
_CSV_FIELD_LIMIT: Final = 2**31 - 1


def read_delimited(
    path: Path, name: str, columns: Sequence[Column], delimiter: str, *, allow_headerless: bool, limit: int
) -> tuple[list[RawRow], bool]:
    """Read a CSV (RFC 4180 quoting) or TSV (IANA: no quoting, tabs never inside fields).

    Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) so that one
    bad row is reported as undecodable instead of aborting the whole file.
    """
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    records: list[tuple[int, list[str] | None, int]] = []
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as fh:
        lines = _RecordLines(fh, limit, None if delimiter == "\t" else delimiter)
        try:
            records.extend(_records(lines, delimiter))
        except csv.Error as exc:  # the csv module's messages name the problem, never the text
            raise InvalidDataError(f"cannot parse {name} at line {lines.record_start}: {exc}") from None
    if not records:
        return [], True
    _, first_record, first_size = records[0]
    if first_record is None:
        raise InvalidDataError(
            f"the first line of {name} is {first_size:,} bytes, over dataset.cleaning.maxRowBytes {limit:,}, so it "
            "cannot be read as its header; check dataset.format, or raise maxRowBytes if rows are this big on purpose"
        )
    first_record[0] = first_record[0].lstrip("\ufeff")  # a byte-order mark is not part of the first cell
    header = [h.strip() for h in first_record]
    names = [c.name for c in columns]
    positions: dict[str, int]
    following = [(n, r) for n, r, _ in records[1 : 1 + _HEADER_SNIFF_ROWS] if r is not None]
    if all(c.name in header for c in columns if c.required):
        positions = {c.role: header.index(c.name) for c in columns if c.name in header}
        body, has_header = records[1:], True
    elif allow_headerless and _is_headerless(header, following, names):
        positions = {c.role: i for i, c in enumerate(columns)}
        body, has_header = records, False
    else:
        missing = next(c for c in columns if c.required and c.name not in header)
        if not _reads_as_header(header):
            what = "fairness group" if missing.role == "group" else missing.role
            fields = f"{len(header)} field{'s' if len(header) != 1 else ''}"
            raise InvalidDataError(
                f"{what} column {missing.name!r} missing in {name}: the first row is read as the header, but it does "
                f"not look like a header ({fields}); start the file with a header line naming its columns, check "
                f"dataset.format, or set {missing.setting} to the column that holds it"
            )
        note = "" if any(n in header for n in names) else " (the first row is read as the header)"
        raise missing_column(missing, name, header, note)
    width = len(first_record)
    rows: list[RawRow] = []
    for lineno, record, size in body:
        ref = f"{name}:{lineno}"
        if record is None:
            rows.append(too_large(ref, size, limit))
            continue
        if len(record) != width:
            rows.append(
                RawRow(
                    ref, problem=f"{len(record)} fields where the {'header' if has_header else 'first row'} has {width}"
                )
            )
            continue
        if any(has_bad_text(cell) for cell in record):
            rows.append(RawRow(ref, problem="invalid UTF-8"))
            continue
        rows.append(RawRow(ref, {role: record[i] for role, i in positions.items()}))
    return rows, has_header


class _RecordTooLarge(Exception):
    """Raised through ``csv.reader`` when the record being read passes the limit."""


#: CSV parser states, as in CPython's _csv.c: at the start of a field, inside an unquoted
#: field, inside a quoted field, just after a quote inside a quoted field.
_START, _FIELD, _QUOTED, _QUOTE = range(4)


class _RecordLines:
    """The physical lines of a delimited file, for ``csv.reader``, each read with a bounded
    ``readline``, counting the size of the record being read. When a record passes the
    limit, :meth:`skip_record` reads on to its end without keeping it."""

    def __init__(self, fh: IO[str], limit: int, delimiter: str | None) -> None:
        self.fh = fh
        self.limit = limit
        self.delimiter = delimiter
        """None for TSV: no quoting, so every line is a record."""
        self.lineno = 0
        """The number of the last line handed out."""
        self.record_start = 1
        self.record_lines = 0
        self.record_bytes = 0
        self._pending = ""
        self._overflow = ""

    def _readline(self, size: int) -> str:
        """One line, or its first ``size`` characters; a CRLF split by the size limit is
        put back together, so line numbers stay right."""
        if self._pending:
            line, self._pending = self._pending, ""
            if line not in ("\r", "\n"):
                line += self.fh.readline(size - 1)
        else:
            line = self.fh.readline(size)
        if line.endswith("\r"):
            after = self.fh.readline(1)
            if after == "\n":
                line += after
            else:
                self._pending = after
        return line

    def __iter__(self) -> _RecordLines:
        return self

    def __next__(self) -> str:
        line = self._readline(self.limit + 1)
        if not line:
            raise StopIteration
        self.lineno += 1
        if not self.record_lines:
            self.record_start = self.lineno
        self.record_lines += 1
        # Characters are 1 to 4 bytes: encode only when the line could be over the limit.
        self.record_bytes += len(line) if 4 * len(line) <= self.limit else len(line.encode("utf-8", "surrogateescape"))
        if self.record_bytes > self.limit:
            self._overflow = line
            raise _RecordTooLarge
        return line

    def next_record(self) -> None:
        self.record_lines = 0
        self.record_bytes = 0

    def skip_record(self) -> int:
        """Read on to the end of the record that passed the limit; returns its size in bytes."""
        # A record goes on past a line only inside a quoted field, so a record's later line
        # starts inside quotes (TSV has no quoting: every line is a record).
        state = _START if self.record_lines == 1 or self.delimiter is None else _QUOTED
        text, size = self._overflow, self.record_bytes
        self._overflow = ""
        while True:
            if self.delimiter is not None:
                state = _state_after(text, state, self.delimiter)
            if text.endswith(("\n", "\r")) and state != _QUOTED:
                break
            ended_line = text.endswith(("\n", "\r"))
            text = self._readline(SKIP_CHUNK)
            if not text:
                break
            if ended_line:
                self.lineno += 1
            size += len(text.encode("utf-8", "surrogateescape"))
        return size


def _state_after(text: str, state: int, delimiter: str) -> int:
    """The CSV parser state after ``text``, as CPython's csv module (default dialect, not
    strict) would have it: ``"`` quotes, doubled inside a quoted field, and opens a quoted
    field only at the start of a field. Complete fields are consumed by one regular
    expression and quoted runs by another, so even a field of many megabytes full of
    quotes and delimiters costs C-speed scans, not a Python step per character."""
    fields = _complete_fields(delimiter)
    i, n = 0, len(text)
    while i < n:
        if state == _START:
            if text[i] == '"':  # quoted fields, whole, in one call (plain ones go faster below)
                i = _end(fields.match(text, i, i + _REGEX_WINDOW), i)
                if i >= n:
                    return _START
            c = text[i]
            state = _QUOTED if c == '"' else _START if c in (delimiter, "\r", "\n") else _FIELD
            i += 1
        elif state == _QUOTED:
            i = _end(_QUOTED_RUN.match(text, i, i + _REGEX_WINDOW), i)
            if i >= n:
                return _QUOTED
            if text[i] == '"':  # a lone quote: the closing one, or the first of a pair split by the window
                state, i = _QUOTE, i + 1
        elif state == _QUOTE:
            c = text[i]
            state = _QUOTED if c == '"' else _START if c in (delimiter, "\r", "\n") else _FIELD
            i += 1
        else:  # _FIELD: quotes are plain characters; only a field opening with a quote matters
            j = text.find(delimiter + '"', i)
            if j < 0:
                return _START if text.endswith(delimiter) else _FIELD
            state, i = _QUOTED, j + 2
    return state


#: The inside of a quoted field up to its next lone quote (pairs are escaped quotes).
_QUOTED_RUN: Final = re.compile(r'[^"]*(?:""[^"]*)*')
#: Characters one regex call may look at: a repeated group costs the regex engine memory
#: per repetition, so a 1 MiB line of one-character fields must be taken in windows.
_REGEX_WINDOW: Final = 4096


def _end(match: re.Match[str] | None, default: int) -> int:
    return match.end() if match is not None else default


@functools.cache
def _complete_fields(delimiter: str) -> re.Pattern[str]:
    """Any number of whole fields, each followed by ``delimiter``: quoted (with any text
    after the closing quote, which the csv module keeps) or plain (not starting with a quote)."""
    d = re.escape(delimiter)
    plain = f'(?:[^{d}"\\r\\n][^{d}\\r\\n]*)?'
    quoted = f'"[^"]*(?:""[^"]*)*"{plain}'
    return re.compile(f"(?:(?:{quoted}|{plain}){d})*")


def _records(lines: _RecordLines, delimiter: str) -> Iterator[tuple[int, list[str] | None, int]]:
    """(first line number, record or None when over the limit, size of an oversize record)."""
    while True:
        # A fresh reader after each oversize record: the old one holds a partial record.
        reader = csv.reader(
            lines, delimiter=delimiter, quoting=csv.QUOTE_NONE if lines.delimiter is None else csv.QUOTE_MINIMAL
        )
        try:
            for record in reader:
                start = lines.record_start
                lines.next_record()
                if record:
                    yield start, record, 0
            return
        except _RecordTooLarge:
            start = lines.record_start
            size = lines.skip_record()
            lines.next_record()
            yield start, None, size


def _is_headerless(first: list[str], following: list[tuple[int, list[str]]], names: list[str]) -> bool:
    """Whether a delimited file has no header row, its columns being the roles in order.

    Guessing wrong either way is costly (a header read as a training row, or the first row
    lost), so this says yes only when the evidence is clear: the first row names none of
    the expected columns, has exactly one cell per role, and its last cell (the label) is a
    value that recurs in the following rows, as labels do and header names do not.
    """
    if len(first) != len(names) or any(cell in names for cell in first) or not following:
        return False
    label = first[-1].strip()
    return any(len(rec) == len(first) and rec[-1].strip() == label for _, rec in following)


def _reads_as_header(cells: Sequence[str]) -> bool:
    """Whether a CSV/TSV first line names columns: every cell a name that does not start with
    a digit (data rows usually carry a number: a label, a score), or empty (an index column)."""
    return any(cells) and all(not c or (looks_like_name(c) and not c[0].isdigit()) for c in cells)
