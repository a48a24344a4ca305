"""What a format reader returns, and the checks every reader shares.

Rows carry their values by role (``text``, ``label``, …), never by column name, so nothing
downstream needs to know how a user named their columns. Messages never quote file content:
a data path may be a link to any file on the node, and messages reach pod status and events;
only values that read as names (:func:`looks_like_name`) are shown as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from tuneloop_trainer.errors import InvalidDataError

#: ``dataset.cleaning.maxRowBytes`` when none is given.
DEFAULT_MAX_ROW_BYTES: Final = 1 << 20
#: The drop reason of a row over ``maxRowBytes``.
TOO_LARGE: Final = "too_large"
#: Characters read at a time while skipping the rest of an oversize line.
SKIP_CHUNK: Final = 1 << 16
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


def missing_column(column: Column, name: str, existing: Iterable[str], note: str = "") -> InvalidDataError:
    """The error for a column the file lacks, listing (as names only) the columns it has."""
    shown = [show_name(c) for c in existing]
    listed = ", ".join(shown[:20]) + (f", … ({len(shown)} in all)" if len(shown) > 20 else "")
    what = "fairness group" if column.role == "group" else column.role
    return InvalidDataError(
        f"{what} column {column.name!r} missing in {name} (columns: {listed or 'none'}){note}; "
        f"set {column.setting} to the column that holds it"
    )


def too_large(ref: str, size: int, limit: int) -> RawRow:
    """The row that stands for one over ``maxRowBytes``: a reference and a drop reason, no values."""
    return RawRow(ref, problem=f"{size:,} bytes, over dataset.cleaning.maxRowBytes {limit:,}", reason=TOO_LARGE)


def values_bytes(values: Iterable[Any]) -> int:
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
