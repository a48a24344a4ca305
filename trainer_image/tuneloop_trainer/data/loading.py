"""Reading data files into rows keyed by role: JSON lines, CSV/TSV and Parquet.

A bad row must not end the run, and must not be silently skipped either: every row that
cannot be read (invalid UTF-8, a line that is not JSON, a CSV record with the wrong number
of fields) comes back as a :class:`RawRow` with a ``problem``, so the cleaning step counts it
as ``undecodable`` with its file:line reference. A bad *file* (a missing column, an unknown
extension, an unreadable Parquet footer) is a configuration mistake and raises
:class:`InvalidDataError` at once, naming the file and what it does have.

Rows are bounded (``dataset.cleaning.maxRowBytes``): one 50 MB row would otherwise cost
gigabytes of memory and minutes of tokenization. JSON lines, CSV and TSV are read with
bounded reads, and the rest of an oversize line or CSV record is skipped without being
kept; Parquet and JSON arrays are checked per row after parsing. Oversize rows come back
with the reason ``too_large``.

Messages never quote file content: a data path may be a link to any file on the node, and
messages reach pod status and events. Columns are named only when they come from a header
that parsed as one (JSON keys, Parquet fields, a CSV first line that reads as names).

Rows carry their values by role (``text``, ``label``, …), never by column name, so nothing
downstream needs to know how a user named their columns.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, Any, Final

from tuneloop_trainer.errors import InvalidDataError

#: Extensions understood under ``format: auto`` and the reader each selects.
EXTENSIONS: Final[dict[str, str]] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # JSON lines, or one JSON array of objects
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
#: How many rows after the first are compared when deciding whether a CSV has a header.
_HEADER_SNIFF_ROWS: Final = 200
#: CSV fields may be whole documents: rows are bounded by ``maxRowBytes`` instead of the
#: csv module's own field limit (128 KiB by default).
_CSV_FIELD_LIMIT: Final = 2**31 - 1
#: ``dataset.cleaning.maxRowBytes`` when none is given.
DEFAULT_MAX_ROW_BYTES: Final = 1 << 20
#: The drop reason of a row over ``maxRowBytes``.
TOO_LARGE: Final = "too_large"
#: Characters read at a time while skipping the rest of an oversize line.
_SKIP_CHUNK: Final = 1 << 16
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
#: What a column, label or role name may be made of (no ':', '/', '=', quotes, controls...).
_NAME_CHARS = re.compile(r"[\w .()#%+&-]+")


@dataclass(frozen=True)
class Column:
    """A column to read: which role it fills and which setting names it (for error messages)."""

    role: str
    name: str
    setting: str
    """The spec field a user changes to point at another column, e.g. ``dataset.columns.label``."""
    required: bool = True


@dataclass
class RawRow:
    """One row as read: its reference for reports, and its values by role.

    A role is absent from ``values`` when the row has no such cell (a JSON object without
    the key); ``problem`` says why the row could not be read at all.
    """

    ref: str
    values: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    reason: str = "undecodable"
    """The drop reason when ``problem`` is set: ``undecodable``, or ``too_large``."""


@dataclass
class LoadedFile:
    """The rows of one file and how it was read."""

    name: str
    format: str
    rows: list[RawRow]
    header: bool = True
    """False when a CSV/TSV was read without a header row (columns taken by position)."""


def display_names(paths: Sequence[Path]) -> list[str]:
    """Short names for reports: the path below the files' common folder (a lone file: its name).

    Local paths are cache locations that mean nothing to the user; the part below the
    common folder is what they uploaded under their prefix.
    """
    if len(paths) == 1:
        return [paths[0].name]
    parts = [p.parts for p in paths]
    common = 0
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common += 1
    common = min(common, min(len(p) for p in parts) - 1)
    return [PurePath(*p[common:]).as_posix() for p in parts]


def file_format(path: Path, declared: str, name: str) -> str:
    """The reader for a file: by extension under ``auto``, else the declared format.

    ``csv`` covers TSV too: a ``.tsv`` file declared as ``csv`` is read tab-separated,
    since nobody means a comma delimiter for a file named ``.tsv``.
    """
    ext = path.suffix.lower()
    if declared == "auto":
        if ext not in EXTENSIONS:
            known = ", ".join(sorted(EXTENSIONS))
            raise InvalidDataError(
                f"cannot tell the format of {name}: its extension {ext or '(none)'!r} is not one of {known}; "
                "rename it or set dataset.format"
            )
        return EXTENSIONS[ext]
    if declared == "csv" and ext == ".tsv":
        return "tsv"
    return declared


def load_file(
    path: Path,
    name: str,
    declared_format: str,
    columns: Sequence[Column],
    *,
    allow_headerless: bool = False,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> LoadedFile:
    """Read one file's rows for ``columns``.

    ``allow_headerless``: a CSV/TSV whose first row names none of the columns may be a file
    without a header (SST-2 and many GLUE exports are); see :func:`_is_headerless`.
    ``max_row_bytes``: rows larger than this come back as ``too_large`` rows without values.
    """
    fmt = file_format(path, declared_format, name)
    if fmt != "parquet":
        _refuse_utf16(path, name)
    if fmt == "jsonl":
        return LoadedFile(name, fmt, _read_json(path, name, columns, max_row_bytes))
    if fmt in ("csv", "tsv"):
        delimiter = "\t" if fmt == "tsv" else ","
        rows, header = _read_delimited(
            path, name, columns, delimiter, allow_headerless=allow_headerless, limit=max_row_bytes
        )
        return LoadedFile(name, fmt, rows, header)
    if fmt == "parquet":
        return LoadedFile(name, fmt, _read_parquet(path, name, columns, max_row_bytes))
    raise InvalidDataError(f"unsupported data format {fmt!r} for {name}")


def _refuse_utf16(path: Path, name: str) -> None:
    """Text files are read as UTF-8. A UTF-16 file (what spreadsheets write as "Unicode text")
    would otherwise fail as a missing column or as rows of invalid UTF-8, which sends the user
    after the wrong cause; its byte-order mark says what it is."""
    with path.open("rb") as fh:
        start = fh.read(4)
    if start[:2] in (b"\xff\xfe", b"\xfe\xff") or start in (b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00"):
        raise InvalidDataError(
            f"{name} is UTF-16 or UTF-32 encoded (it starts with that byte-order mark); data files are read as "
            "UTF-8: save it again as UTF-8 (in a spreadsheet: CSV UTF-8)"
        )


def looks_like_name(text: str, *, max_chars: int = 40) -> bool:
    """Whether ``text`` reads as a name (a column header, a class label, a chat role) rather
    than content: short, at most three spaces, letters, digits and ``_ .()#%+&-`` only.

    Only such values are quoted in messages: anything else may be a line of whatever file
    a data path points to (``root:x:0:0:…``), and messages end up in pod status and events.
    """
    return 0 < len(text) <= max_chars and text.count(" ") <= 3 and _NAME_CHARS.fullmatch(text) is not None


def show_name(text: str, *, max_chars: int = 40) -> str:
    """A name for a message: as is when it looks like one, else repr-escaped and cut short."""
    if looks_like_name(text, max_chars=max_chars):
        return text
    shown = repr(text)
    return shown if len(shown) <= max_chars else shown[: max_chars - 1] + "…"


def _reads_as_header(cells: Sequence[str]) -> bool:
    """Whether a CSV/TSV first line names columns: every cell a name that does not start with
    a digit (data rows usually carry a number: a label, a score), or empty (an index column)."""
    return any(cells) and all(not c or (looks_like_name(c) and not c[0].isdigit()) for c in cells)


def _missing_column(column: Column, name: str, existing: Iterable[str], note: str = "") -> InvalidDataError:
    shown = [show_name(c) for c in existing]
    listed = ", ".join(shown[:20]) + (f", … ({len(shown)} in all)" if len(shown) > 20 else "")
    what = "fairness group" if column.role == "group" else column.role
    return InvalidDataError(
        f"{what} column {column.name!r} missing in {name} (columns: {listed or 'none'}){note}; "
        f"set {column.setting} to the column that holds it"
    )


def _too_large(ref: str, size: int, limit: int) -> RawRow:
    return RawRow(ref, problem=f"{size:,} bytes, over dataset.cleaning.maxRowBytes {limit:,}", reason=TOO_LARGE)


def _values_bytes(values: Iterable[Any]) -> int:
    """The size of already parsed cells (Parquet, JSON arrays), as UTF-8 (nested values as JSON)."""
    total = 0
    for value in values:
        if isinstance(value, str):
            total += len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, bytes | bytearray):
            total += len(value)
        elif isinstance(value, list | dict):
            total += len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))
        else:
            total += len(str(value))
    return total


def has_bad_text(value: str) -> bool:
    """Whether a string holds lone surrogates: invalid UTF-8 bytes read with ``surrogateescape``,
    or ``\\udXXX`` escapes in JSON. Tokenizers and the report writer would choke on them."""
    return _LONE_SURROGATE.search(value) is not None


# --- JSON lines -------------------------------------------------------------------------


def _read_json(path: Path, name: str, columns: Sequence[Column], limit: int) -> list[RawRow]:
    if _first_significant_byte(path) == b"[":
        return _read_json_array(path.read_bytes(), name, columns, limit)
    rows: list[RawRow] = []
    seen_keys: dict[str, None] = {}
    with path.open("rb") as fh:
        for lineno, raw, size in _bounded_lines(fh, limit):
            ref = f"{name}:{lineno}"
            if raw is None:
                rows.append(_too_large(ref, size, limit))
                continue
            if not raw.strip():
                continue  # blank lines (a trailing newline, spacing) are not rows
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                rows.append(RawRow(ref, problem="invalid UTF-8"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append(RawRow(ref, problem=f"unparsable JSON ({exc.msg})"))  # msg, never the document
                continue
            rows.append(_json_row(obj, ref, columns, seen_keys))
    _check_json_columns(rows, name, columns, seen_keys)
    return rows


def _first_significant_byte(path: Path) -> bytes:
    """The first byte after a byte-order mark and whitespace (``[`` for a JSON array)."""
    with path.open("rb") as fh:
        if fh.read(3) != b"\xef\xbb\xbf":
            fh.seek(0)
        while chunk := fh.read(_SKIP_CHUNK):
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1]
    return b""


def _bounded_lines(fh: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line without its newline or None when over ``limit`` bytes, its size).

    Each read takes at most ``limit + 1`` bytes; the rest of a longer line is read in chunks
    and dropped, so memory stays bounded whatever the file holds.
    """
    lineno = 0
    while line := fh.readline(limit + 1):
        lineno += 1
        if line.endswith(b"\n"):
            yield lineno, line[:-1], len(line) - 1
        elif len(line) <= limit:
            yield lineno, line, len(line)  # the last line, without a newline
        else:
            size = len(line)
            while chunk := fh.readline(_SKIP_CHUNK):
                if chunk.endswith(b"\n"):
                    size += len(chunk) - 1
                    break
                size += len(chunk)
            yield lineno, None, size


def _read_json_array(data: bytes, name: str, columns: Sequence[Column], limit: int) -> list[RawRow]:
    """A file holding one JSON array: parsed whole (the format has no row boundaries to read
    by), then each row checked against the limit."""
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise InvalidDataError(f"{name} is not valid UTF-8 (byte {exc.start}); re-encode it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidDataError(
            f"{name} starts with '[' but is not a valid JSON array ({exc.msg} at line {exc.lineno}); "
            "write one JSON object per line (JSON lines) instead"
        ) from None
    del data
    if not isinstance(items, list):
        raise InvalidDataError(f"{name} is not a JSON array of objects")
    seen_keys: dict[str, None] = {}
    rows: list[RawRow] = []
    for i, obj in enumerate(items):
        row = _json_row(obj, f"{name}:row {i}", columns, seen_keys)
        size = _values_bytes(row.values.values())
        rows.append(row if size <= limit else _too_large(row.ref, size, limit))
    _check_json_columns(rows, name, columns, seen_keys)
    return rows


def _json_row(obj: Any, ref: str, columns: Sequence[Column], seen_keys: dict[str, None]) -> RawRow:
    if not isinstance(obj, dict):
        return RawRow(ref, problem=f"not a JSON object ({type(obj).__name__})")
    seen_keys.update(dict.fromkeys(obj))
    return RawRow(ref, {c.role: obj[c.name] for c in columns if c.name in obj})


def _check_json_columns(rows: list[RawRow], name: str, columns: Sequence[Column], seen_keys: dict[str, None]) -> None:
    """A key missing from *every* object is a wrong column name; missing in some rows is bad rows."""
    if not any(r.problem is None for r in rows):
        return
    for column in columns:
        if column.required and column.name not in seen_keys:
            raise _missing_column(column, name, seen_keys)


# --- CSV / TSV --------------------------------------------------------------------------


def _read_delimited(
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
        raise _missing_column(missing, name, header, note)
    width = len(first_record)
    rows: list[RawRow] = []
    for lineno, record, size in body:
        ref = f"{name}:{lineno}"
        if record is None:
            rows.append(_too_large(ref, size, limit))
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
            text = self._readline(_SKIP_CHUNK)
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


# --- Parquet ----------------------------------------------------------------------------


def _read_parquet(path: Path, name: str, columns: Sequence[Column], limit: int) -> list[RawRow]:
    """Parquet is columnar: rows are read a batch at a time and checked against the limit
    after reading (a row group cannot be read a row at a time)."""
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # noqa: PLC0415 - only parquet users pay for pyarrow's import

    try:
        parquet = pq.ParquetFile(path)
        names = list(parquet.schema_arrow.names)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for broken files
        raise InvalidDataError(f"cannot read {name} as Parquet: {_first_line(exc)}") from None
    present = [c for c in columns if c.name in names]
    for column in columns:
        if column.required and column.name not in names:
            raise _missing_column(column, name, names)
    rows: list[RawRow] = []
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[c.name for c in present]):
            data = {c.role: batch.column(c.name).to_pylist() for c in present}
            for j in range(batch.num_rows):
                rows.append(
                    _parquet_row(f"{name}:row {len(rows)}", {role: col[j] for role, col in data.items()}, limit)
                )
    except Exception as exc:
        raise InvalidDataError(f"cannot read {name} as Parquet: {_first_line(exc)}") from None
    return rows


#: Parquet rows decoded at a time.
_PARQUET_BATCH_ROWS: Final = 1024


def _parquet_row(ref: str, cells: dict[str, Any], limit: int) -> RawRow:
    size = _values_bytes(cells.values())
    if size > limit:
        return _too_large(ref, size, limit)
    values: dict[str, Any] = {}
    for role, cell in cells.items():
        value = cell
        if isinstance(cell, bytes):  # binary columns: decode here, so bad bytes are a row problem
            try:
                value = cell.decode("utf-8")
            except UnicodeDecodeError:
                return RawRow(ref, problem="invalid UTF-8")
        values[role] = value
    return RawRow(ref, values)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """A library's error message for ours: its first line, cut short."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
