"""Validate FineTuneJob manifests and explain every problem: where, what, what to do.

Used by ``tuneloop validate``, ``tuneloop run`` and the operator, so a manifest is judged
the same way on a laptop, in CI and in the cluster.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from tuneloop.api import API_VERSION, KIND, FineTuneJob


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest."""

    path: str
    """Field path, Kubernetes style: ``spec.promotion.gates[0].metric``."""
    message: str
    """What is wrong."""
    hint: str = ""
    """What to do about it."""

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return f"{text}\n    hint: {self.hint}" if self.hint else text


def format_path(loc: tuple[int | str, ...]) -> str:
    """``("spec", "gates", 0, "metric")`` → ``spec.gates[0].metric``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _unwrap(annotation: Any) -> Any:
    """The model class (or container element) behind Optional/Annotated/list/dict."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = options[0] if len(options) == 1 else annotation
            if len(options) != 1:
                return annotation
        else:
            return annotation


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that owns the last element of ``loc`` (walking by wire names)."""
    model: Any = FineTuneJob
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = next(
            (f for name, f in model.model_fields.items() if part in (name, f.alias)),
            None,
        )
        if field is None:
            return None
        target = _unwrap(field.annotation)
        origin = typing.get_origin(target)
        if origin in (list, tuple):
            target = _unwrap(typing.get_args(target)[0])
        elif origin is dict:
            target = _unwrap(typing.get_args(target)[1])
        model = target
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _describe_field(loc: tuple[int | str, ...]) -> str:
    model = _model_at(loc)
    if model is None or not isinstance(loc[-1], str):
        return ""
    for name, field in model.model_fields.items():
        if loc[-1] in (name, field.alias):
            return " ".join((field.description or "").replace("``", "`").split())
    return ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_BUILTIN_HINTS: Final = {
    "missing": "add this required field",
    "literal_error": "use one of the allowed values",
    "string_type": "write a string (quote it if YAML reads it as a number or boolean)",
    "int_type": "write a whole number",
    "int_parsing": "write a whole number",
    "int_from_float": "write a whole number",
    "float_type": "write a number",
    "float_parsing": "write a number",
    "bool_type": "write true or false",
    "bool_parsing": "write true or false",
    "model_type": "write a mapping of fields (key: value)",
    "model_attributes_type": "write a mapping of fields (key: value)",
    "dict_type": "write a mapping (key: value)",
    "list_type": "write a list (- item)",
}


def problems_from_error(error: ValidationError) -> list[Problem]:
    """Turn pydantic errors into Problems with Kubernetes-style paths and hints."""
    return [_problem(detail) for detail in error.errors(include_url=False)]


def _problem(detail: ErrorDetails) -> Problem:
    loc = tuple(detail["loc"])
    path = format_path(loc)
    kind = detail["type"]
    got = detail.get("input")
    if kind == "tuneloop_rule":
        return Problem(path, detail["msg"])
    if kind == "extra_forbidden":
        model = _model_at(loc)
        known = _field_names(model) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif known:
            hint = f"remove it; fields here are: {', '.join(known)}"
        else:
            hint = "remove it"
        return Problem(path, f"unknown field {loc[-1]!r}", hint)
    message = detail["msg"]
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
        return Problem(path, message)
    message = message[0].lower() + message[1:] if message else message
    message = message.replace("input should", "must").replace("Input should", "must")
    if kind != "missing" and got is not None and not isinstance(got, dict | list):
        message += f" (got {_short(got)})"
    hint = _BUILTIN_HINTS.get(kind, "")
    if kind == "string_pattern_mismatch":
        message = f"{_short(got)} does not have the expected format"
    described = _describe_field(loc)
    if described and kind in ("string_pattern_mismatch", "missing", "literal_error", "string_too_long"):
        hint = f"{hint + '; ' if hint else ''}this field is: {described}"
    return Problem(path, message, hint)


def validate_manifest(body: Any) -> tuple[FineTuneJob | None, list[Problem]]:
    """Validate one parsed manifest. Returns the job (when valid) and the problems."""
    if not isinstance(body, dict):
        return None, [Problem("", f"a manifest must be a mapping, not {type(body).__name__}")]
    kind, api_version = body.get("kind"), body.get("apiVersion")
    if kind != KIND:
        return None, [
            Problem(
                "kind",
                f"{kind!r} is not a FineTuneJob" if kind else "kind is missing",
                f"tuneloop validates kind: {KIND} with apiVersion: {API_VERSION}",
            )
        ]
    if api_version != API_VERSION:
        return None, [
            Problem(
                "apiVersion",
                f"{api_version!r} is not a served version of FineTuneJob",
                f"write apiVersion: {API_VERSION}",
            )
        ]
    try:
        return FineTuneJob.model_validate(body), []
    except ValidationError as exc:
        return None, problems_from_error(exc)
