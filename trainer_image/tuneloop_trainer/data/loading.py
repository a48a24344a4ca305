"""Reading data files into rows keyed by role: JSON lines, CSV/TSV and Parquet.

A bad row must not end the run, and must not be silently skipped either: every row that
cannot be read (invalid UTF-8, a line that is not JSON, a CSV record with the wrong number
of fields) comes back as a :class:`RawRow` with a ``problem``, so the cleaning step counts it
as ``undecodable`` with its file:line reference. A bad *file* (a missing column, an unknown
extension, an unreadable Parquet footer) is a configuration mistake and raises
:class:`InvalidDataError` at once, naming the file and what it does have.

Rows are bounded (``dataset.cleaning.maxRowBytes``): one 50 MB row would otherwise cost
gigabytes of memory and minutes of tokenization. Oversize rows come back with the reason
``too_large``.

This module picks the reader for a file; the readers live beside it (:mod:`.read_json`,
:mod:`.read_delimited`, :mod:`.read_parquet`), with what they share in :mod:`.rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Final

from tuneloop_trainer.data.read_delimited import read_delimited
from tuneloop_trainer.data.read_json import read_json
from tuneloop_trainer.data.read_parquet import read_parquet
from tuneloop_trainer.data.rows import DEFAULT_MAX_ROW_BYTES, Column, RawRow
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
    without a header (SST-2 and many GLUE exports are); see :mod:`.read_delimited`.
    ``max_row_bytes``: rows larger than this come back as ``too_large`` rows without values.
    """
    fmt = file_format(path, declared_format, name)
    if fmt != "parquet":
        _refuse_utf16(path, name)
    if fmt == "jsonl":
        return LoadedFile(name, fmt, read_json(path, name, columns, max_row_bytes))
    if fmt in ("csv", "tsv"):
        delimiter = "\t" if fmt == "tsv" else ","
        rows, header = read_delimited(
            path, name, columns, delimiter, allow_headerless=allow_headerless, limit=max_row_bytes
        )
        return LoadedFile(name, fmt, rows, header)
    if fmt == "parquet":
        return LoadedFile(name, fmt, read_parquet(path, name, columns, max_row_bytes))
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
