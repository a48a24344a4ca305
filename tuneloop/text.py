"""Text helpers shared by the core, the operator and the trainer."""

from __future__ import annotations


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, the last one an ellipsis (``…``) when cut:
    condition messages, causes and events stay readable in ``kubectl describe``."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(exc: BaseException, limit: int) -> str:
    """A library's error message for ours: its first line (its type's name when it has no
    text), clipped to ``limit`` characters."""
    text = str(exc).strip()
    return clip(text.splitlines()[0] if text else type(exc).__name__, limit)
