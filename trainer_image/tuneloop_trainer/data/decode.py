"""From a raw row's cells to role values: text, a parsed conversation, a label name.

A row that cannot be read as its task needs (a list where text belongs, invalid UTF-8, a
conversation without an assistant turn, a blank part, no label) is dropped here with its
reason, before any cleaning rule looks at it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from tuneloop_trainer.data.report import SourceReport
from tuneloop_trainer.data.rows import has_bad_text, show_name

#: Roles whose values are plain text (``messages`` is a list, ``label`` a class).
TEXT_ROLES: Final = ("text", "prompt", "completion", "source", "target")
CHAT_ROLES: Final = frozenset({"system", "user", "assistant"})
#: Role prefix of ``evaluation.slices`` columns while reading (never a task role).
SLICE: Final = "slice:"


@dataclass
class Row:
    """A decoded row before labels, PII and duplicates are settled."""

    ref: str
    fields: dict[str, Any]
    label: str | None = None
    """The label's name as written (classification)."""
    group: str | None = None
    slices: dict[str, str] = field(default_factory=dict)


def decode_row(
    ref: str,
    values: dict[str, Any],
    src: SourceReport,
    roles: Iterable[str],
    *,
    drop_empty: bool,
    classify: bool,
) -> Row | None:
    """Role values as text (messages parsed); drops undecodable, empty and label-less rows."""
    fields: dict[str, Any] = {}
    chat_problem: str | None = None
    for role in roles:
        value = values.get(role)
        if role == "label":
            continue
        if role == "messages":
            messages, problem = _parse_messages(value)
            if messages is None:
                src.drop("undecodable", ref, problem)
                return None
            fields[role] = messages
            chat_problem = problem
            continue
        text = _as_text(value)
        if text is None:
            src.drop("undecodable", ref, f"{role} is a {type(value).__name__}, not text")
            return None
        if has_bad_text(text):
            src.drop("undecodable", ref, "invalid UTF-8")
            return None
        fields[role] = text
    if drop_empty and _is_empty(fields):
        src.drop("empty", ref)
        return None
    if chat_problem is not None:
        src.drop("undecodable", ref, chat_problem)
        return None
    label: str | None = None
    if classify:
        label, problem = _label_name(values.get("label"))
        if label is None:
            src.drop("unknown_label", ref, problem)
            return None
    group = values.get("group")
    group_name = None if group is None or (isinstance(group, str) and not group.strip()) else str(group).strip()
    slices = {
        key.removeprefix(SLICE): str(value).strip()
        for key, value in values.items()
        if key.startswith(SLICE) and value is not None and str(value).strip()
    }
    return Row(ref, fields, label, group_name, slices)


def quoted(value: str, limit: int = 30) -> str | None:
    """A cell value quoted for a drop detail when it reads as a name (a label, a role), else
    None: details reach error messages, and a cell may hold any file's content."""
    return repr(value) if value and show_name(value, max_chars=limit) == value else None


def _as_text(value: Any) -> str | None:
    """A cell as text; None when it is not text-like (a list, an object)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else str(value)
    return None


def _label_name(value: Any) -> tuple[str | None, str | None]:
    """A label cell as a class name, or (None, why not)."""
    if value is None:
        return None, "no label"
    if isinstance(value, bool):
        return ("true" if value else "false"), None
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float):
        if math.isnan(value):
            return None, "no label"
        if value.is_integer():
            return str(int(value)), None
        return None, f"label {value!r} is not a class"
    if isinstance(value, str):
        name = value.strip()
        if not name:
            return None, "no label"
        if has_bad_text(name):
            return None, "label is not valid UTF-8"
        return name, None
    return None, f"label is a {type(value).__name__}, not a class"


def _parse_messages(value: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """A chat conversation as ``[{role, content}]`` (other keys, such as ``name``, are dropped:
    chat templates disagree on them).

    Returns (None, why) when it cannot be read at all, (messages, why) when it reads but
    cannot be trained on (an unknown role, no assistant turn) — the caller decides whether
    an empty conversation is ``empty`` before calling the rest ``undecodable``.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        value = []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, "messages is not valid JSON"
    if not isinstance(value, list):
        return None, f"messages is a {type(value).__name__}, not a list of {{role, content}}"
    messages: list[dict[str, str]] = []
    problem: str | None = None
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            return None, f"message {i} is not an object"
        role, content = item.get("role"), item.get("content")
        content = "" if content is None else content
        if not isinstance(content, str):
            return None, f"message {i} content is a {type(content).__name__}, not text"
        if has_bad_text(content):
            return None, "invalid UTF-8"
        if not isinstance(role, str) or role not in CHAT_ROLES:
            shown = quoted(str(role))
            problem = problem or (
                f"message {i} has role {shown}; use system, user or assistant"
                if shown
                else f"message {i} has a role other than system, user or assistant (not shown: not a plain name)"
            )
        messages.append({"role": str(role), "content": content})
    if problem is None and not any(m["role"] == "assistant" for m in messages):
        problem = "no assistant turn to learn from"
    return messages, problem


def _is_empty(fields: dict[str, Any]) -> bool:
    """Whether any part of the row is blank. A conversation is empty when nothing in it has
    content, or when its assistant turns (what is learned) are all blank; one with user
    turns only is not empty but malformed, and reported as such."""
    for role, value in fields.items():
        if role == "messages":
            answers = [m["content"] for m in value if m["role"] == "assistant"]
            if not any(m["content"].strip() for m in value) or (answers and not any(a.strip() for a in answers)):
                return True
        elif isinstance(value, str) and not value.strip():
            return True
    return False
