"""Parquet: read a batch of rows at a time (a row group cannot be read a row at a time),
each row checked against ``maxRowBytes`` after reading; pyarrow is imported only when a
Parquet file is read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from tuneloop.text import first_line
from tuneloop_trainer.data.rows import Column, RawRow, missing_column, too_large, values_bytes
from tuneloop_trainer.errors import InvalidDataError

#: How much of pyarrow's error message a refusal quotes.
_ERROR_CHARS = 200


def read_parquet(path: Path, name: str, columns: Sequence[Column], limit: int) -> list[RawRow]:
    """Parquet is columnar: rows are read a batch at a time and checked against the limit
    after reading (a row group cannot be read a row at a time)."""
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # noqa: PLC0415 - only parquet users pay for pyarrow's import

    try:
        parquet = pq.ParquetFile(path)
        names = list(parquet.schema_arrow.names)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for broken files
        raise InvalidDataError(f"cannot read {name} as Parquet: {first_line(exc, _ERROR_CHARS)}") from None
    present = [c for c in columns if c.name in names]
    for column in columns:
        if column.required and column.name not in names:
            raise missing_column(column, name, names)
    rows: list[RawRow] = []
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[c.name for c in present]):
            data = {c.role: batch.column(c.name).to_pylist() for c in present}
            for j in range(batch.num_rows):
                rows.append(
                    _parquet_row(f"{name}:row {len(rows)}", {role: col[j] for role, col in data.items()}, limit)
                )
    except Exception as exc:
        raise InvalidDataError(f"cannot read {name} as Parquet: {first_line(exc, _ERROR_CHARS)}") from None
    return rows


#: Parquet rows decoded at a time.
_PARQUET_BATCH_ROWS: Final = 1024


def _parquet_row(ref: str, cells: dict[str, Any], limit: int) -> RawRow:
    size = values_bytes(cells.values())
    if size > limit:
        return too_large(ref, size, limit)
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
