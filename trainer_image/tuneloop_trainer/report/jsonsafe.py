"""The JSON form of what a run reports: the API's camelCase keys, and no NaN or infinity
(JSON has neither; they are written as ``null``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def camel(name: str) -> str:
    """``snake_case`` → ``camelCase``."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities with ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
