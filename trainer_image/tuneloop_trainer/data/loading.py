"""Reading data files into rows keyed by role: JSON lines, CSV/TSV and Parquet.

A bad row must not end the run, and must not be silently skipped either: every row that
cannot be read (invalid UTF-8, a line that is not JSON, a CSV record with the wrong number
of fields) comes back as a :class:`RawRow` with a ``problem``, so the cleaning step counts it
as ``undecodable`` with its file:line reference. A bad *file* (a missing column, an unknown
extension, an unreadable Parquet footer) is a configuration mistake and raises
:class:`InvalidDataError` at once, naming the file and what it does have.

Rows carry their values by role (``text``, ``label``, …), never by column name, so nothing
downstream needs to know how a user named their columns.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Final

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
#: CSV fields may be whole documents; the csv module's default limit is 128 KiB.
_CSV_FIELD_LIMIT: Final = 2**31 - 1
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


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
    path: Path, name: str, declared_format: str, columns: Sequence[Column], *, allow_headerless: bool = False
) -> LoadedFile:
    """Read one file's rows for ``columns``.

    ``allow_headerless``: a CSV/TSV whose first row names none of the columns may be a file
    without a header (SST-2 and many GLUE exports are); see :func:`_is_headerless`.
    """
    fmt = file_format(path, declared_format, name)
    if fmt == "jsonl":
        return LoadedFile(name, fmt, _read_json(path, name, columns))
    if fmt in ("csv", "tsv"):
        rows, header = _read_delimited(path, name, columns, "\t" if fmt == "tsv" else ",", allow_headerless)
        return LoadedFile(name, fmt, rows, header)
    if fmt == "parquet":
        return LoadedFile(name, fmt, _read_parquet(path, name, columns))
    raise InvalidDataError(f"unsupported data format {fmt!r} for {name}")


def _missing_column(column: Column, name: str, existing: Iterable[str], note: str = "") -> InvalidDataError:
    shown = [c if len(c) <= 40 else c[:37] + "..." for c in existing]
    listed = ", ".join(shown[:20]) + (f", … ({len(shown)} in all)" if len(shown) > 20 else "")
    what = "fairness group" if column.role == "group" else column.role
    return InvalidDataError(
        f"{what} column {column.name!r} missing in {name} (columns: {listed or 'none'}){note}; "
        f"set {column.setting} to the column that holds it"
    )


def has_bad_text(value: str) -> bool:
    """Whether a string holds lone surrogates: invalid UTF-8 bytes read with ``surrogateescape``,
    or ``\\udXXX`` escapes in JSON. Tokenizers and the report writer would choke on them."""
    return _LONE_SURROGATE.search(value) is not None


# --- JSON lines -------------------------------------------------------------------------


def _read_json(path: Path, name: str, columns: Sequence[Column]) -> list[RawRow]:
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":
        return _read_json_array(data, name, columns)
    rows: list[RawRow] = []
    seen_keys: dict[str, None] = {}
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline, spacing) are not rows
        ref = f"{name}:{lineno}"
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            rows.append(RawRow(ref, problem="invalid UTF-8"))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            rows.append(RawRow(ref, problem=f"unparsable JSON ({exc.msg})"))
            continue
        rows.append(_json_row(obj, ref, columns, seen_keys))
    _check_json_columns(rows, name, columns, seen_keys)
    return rows


def _read_json_array(data: bytes, name: str, columns: Sequence[Column]) -> list[RawRow]:
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise InvalidDataError(f"{name} is not valid UTF-8 (byte {exc.start}); re-encode it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidDataError(
            f"{name} starts with '[' but is not a valid JSON array ({exc.msg} at line {exc.lineno}); "
            "write one JSON object per line (JSON lines) instead"
        ) from None
    if not isinstance(items, list):
        raise InvalidDataError(f"{name} is not a JSON array of objects")
    seen_keys: dict[str, None] = {}
    rows = [_json_row(obj, f"{name}:row {i}", columns, seen_keys) for i, obj in enumerate(items)]
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
    path: Path, name: str, columns: Sequence[Column], delimiter: str, allow_headerless: bool
) -> tuple[list[RawRow], bool]:
    """Read a CSV (RFC 4180 quoting) or TSV (IANA: no quoting, tabs never inside fields).

    Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) so that one
    bad row is reported as undecodable instead of aborting the whole file.
    """
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    records: list[tuple[int, list[str]]] = []
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        start = 1
        try:
            for record in reader:
                if record:
                    records.append((start, record))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise InvalidDataError(f"cannot parse {name} at line {start}: {exc}") from None
    if not records:
        return [], True
    first_record = records[0][1]
    first_record[0] = first_record[0].lstrip("\ufeff")  # a byte-order mark is not part of the first cell
    header = [h.strip() for h in first_record]
    names = [c.name for c in columns]
    positions: dict[str, int]
    if all(c.name in header for c in columns if c.required):
        positions = {c.role: header.index(c.name) for c in columns if c.name in header}
        body, has_header = records[1:], True
    elif allow_headerless and _is_headerless(header, records[1 : 1 + _HEADER_SNIFF_ROWS], names):
        positions = {c.role: i for i, c in enumerate(columns)}
        body, has_header = records, False
    else:
        missing = next(c for c in columns if c.required and c.name not in header)
        note = "" if any(n in header for n in names) else " (the first row is read as the header)"
        raise _missing_column(missing, name, header, note)
    width = len(records[0][1])
    rows: list[RawRow] = []
    for lineno, record in body:
        ref = f"{name}:{lineno}"
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


def _read_parquet(path: Path, name: str, columns: Sequence[Column]) -> list[RawRow]:
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # noqa: PLC0415 - only parquet users pay for pyarrow's import

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for broken files
        raise InvalidDataError(f"cannot read {name} as Parquet: {exc}") from None
    present = [c for c in columns if c.name in schema.names]
    for column in columns:
        if column.required and column.name not in schema.names:
            raise _missing_column(column, name, schema.names)
    try:
        table = pq.read_table(path, columns=[c.name for c in present])
    except Exception as exc:
        raise InvalidDataError(f"cannot read {name} as Parquet: {exc}") from None
    data = {c.role: table.column(c.name).to_pylist() for c in present}
    rows: list[RawRow] = []
    for i in range(table.num_rows):
        values: dict[str, Any] = {}
        problem = None
        for role, col in data.items():
            value = col[i]
            if isinstance(value, bytes):  # binary columns: decode here, so bad bytes are a row problem
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    problem = "invalid UTF-8"
                    break
            values[role] = value
        rows.append(RawRow(f"{name}:row {i}", values if problem is None else {}, problem))
    return rows
