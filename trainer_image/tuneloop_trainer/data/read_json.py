"""JSON lines, and files holding one JSON array of objects.

Lines are read with bounded reads (``maxRowBytes``), and the rest of an oversize line is
skipped without being kept; an array has no row boundaries to read by, so it is parsed
whole and each row checked after parsing. A key missing from every object is a wrong
column name; missing in some rows is bad rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from tuneloop_trainer.data.rows import SKIP_CHUNK, Column, RawRow, missing_column, too_large, values_bytes
from tuneloop_trainer.errors import InvalidDataError


def read_json(path: Path, name: str, columns: Sequence[Column], limit: int) -> list[RawRow]:
    """The rows of a JSON lines file (or of a JSON array, when the file starts with ``[``)."""
    if _first_significant_byte(path) == b"[":
        return _read_json_array(path.read_bytes(), name, columns, limit)
    rows: list[RawRow] = []
    seen_keys: dict[str, None] = {}
    with path.open("rb") as fh:
        for lineno, raw, size in _bounded_lines(fh, limit):
            ref = f"{name}:{lineno}"
            if raw is None:
                rows.append(too_large(ref, size, limit))
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
        while chunk := fh.read(SKIP_CHUNK):
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
            while chunk := fh.readline(SKIP_CHUNK):
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
        size = values_bytes(row.values.values())
        rows.append(row if size <= limit else too_large(row.ref, size, limit))
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
            raise missing_column(column, name, seen_keys)
