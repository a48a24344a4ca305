"""Validate FineTuneJob manifests and explain every problem: where, what, what to do.

Used by ``tuneloop validate``, ``tuneloop run`` and the operator, so a manifest is judged
the same way on a laptop, in CI and in the cluster.

Validation is as strict about types as the API server is with the CRD's schema: the manifest
is turned into JSON (as kubectl does before sending it) and validated in pydantic's strict
mode, so ``epochs: true``, ``epochs: "3"`` or ``learningRate: "5e-3"`` are refused instead of
being coerced. Strict JSON still accepts what JSON and the API server accept: an integer where a
number is expected, ISO strings for times and enum values, and (like the API server) a number
with no fractional part, such as ``3.0``, where an integer is expected.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import math
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
        # "apiVersion is missing" names its field already: not "apiVersion: apiVersion is missing".
        named = not self.path or self.message.startswith(f"{self.path} ")
        text = self.message if named else f"{self.path}: {self.message}"
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


def _is_union_member(loc: tuple[int | str, ...]) -> bool:
    """Whether the last element of ``loc`` names a member of a union (``int`` or ``str`` of an
    int-or-string quantity), which pydantic appends to the path of each member's error."""
    if len(loc) < 2 or not isinstance(loc[-1], str) or not isinstance(loc[-2], str):
        return False
    model = _model_at(loc[:-1])
    if model is None:
        return False
    field = next((f for name, f in model.model_fields.items() if loc[-2] in (name, f.alias)), None)
    if field is None:
        return False
    return typing.get_origin(_unwrap(field.annotation)) in (typing.Union, types.UnionType)


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
    """A value as the manifest spells it: ``true``, ``null``, ``'3'`` (quoted: it is a string)."""
    text = json.dumps(value) if isinstance(value, bool) or value is None else repr(value)
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


_MEMBER_NAMES: Final = {"int": "an integer", "str": "a string", "float": "a number", "bool": "true or false"}


def problems_from_error(error: ValidationError) -> list[Problem]:
    """Turn pydantic errors into Problems with Kubernetes-style paths and hints.

    A value that fits no member of a union (an int-or-string quantity given ``true``) is one
    problem at the field, not one per member."""
    problems: list[Problem] = []
    unions: dict[tuple[int | str, ...], tuple[int, list[str]]] = {}
    for detail in error.errors(include_url=False):
        loc = tuple(detail["loc"])
        if detail["type"].endswith("_type") and _is_union_member(loc):
            field = loc[:-1]
            if field not in unions:
                unions[field] = (len(problems), [])
                problems.append(Problem(format_path(field), ""))
            unions[field][1].append(_MEMBER_NAMES.get(str(loc[-1]), str(loc[-1])))
            got = detail.get("input")
            index, names = unions[field]
            message = f"must be {' or '.join(names)}"
            if not isinstance(got, dict | list):
                message += f" (got {_short(got)})"
            problems[index] = Problem(format_path(field), message, f"write {' or '.join(names)}")
            continue
        problems.append(_problem(detail))
    return problems


def _type_hint(kind: str, got: Any) -> str:
    """What to write instead of a value of the wrong type."""
    if kind in ("int_type", "float_type") and isinstance(got, str):
        return "write the number without quotes (3, not '3'); quoted, YAML makes it a string"
    if kind in ("int_type", "float_type") and isinstance(got, bool):
        return "write a number; true and false are not numbers"
    if kind == "bool_type" and isinstance(got, str):
        return "write true or false, without quotes"
    if kind == "bool_type" and isinstance(got, int | float):
        return "write true or false; numbers are not booleans"
    return _BUILTIN_HINTS.get(kind, "")


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
    hint = _type_hint(kind, got)
    if kind == "string_pattern_mismatch":
        message = f"{_short(got)} does not have the expected format"
    described = _describe_field(loc)
    if described and kind in ("string_pattern_mismatch", "missing", "literal_error", "string_too_long"):
        hint = f"{hint + '; ' if hint else ''}this field is: {described}"
    return Problem(path, message, hint)


def as_json(value: Any, loc: tuple[int | str, ...] = ()) -> tuple[Any, list[Problem]]:
    """A parsed YAML document as kubectl sends it to the API server: JSON values only.

    Dates and times (unquoted ``2024-01-31``) become ISO strings, non-string keys become strings,
    a float with no fractional part becomes an integer (the API server accepts ``3.0`` for an
    integer field; every number field accepts an integer). What JSON cannot carry (``.nan``,
    ``.inf``, ``!!binary``, ``!!set``) is a problem at its path.
    """
    problems: list[Problem] = []

    def convert(node: Any, at: tuple[int | str, ...]) -> Any:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, sub in node.items():
                name = _json_key(key)
                if name is None:
                    what = f"a key of type {type(key).__name__} is not supported"
                    problems.append(Problem(format_path(at), what, "quote the key"))
                    continue
                out[name] = convert(sub, (*at, name))
            return out
        if isinstance(node, list | tuple):
            return [convert(sub, (*at, i)) for i, sub in enumerate(node)]
        if node is None or isinstance(node, str | bool | int):
            return node
        if isinstance(node, float):
            if not math.isfinite(node):
                problems.append(
                    Problem(format_path(at), f"must be a finite number (got {node})", "write a finite number")
                )
                return None
            return int(node) if node.is_integer() and abs(node) < 2**63 else node
        if isinstance(node, dt.date):  # datetime too: an unquoted YAML timestamp
            return node.isoformat()
        what = {"bytes": "binary data (!!binary)", "set": "a set (!!set)"}.get(type(node).__name__, type(node).__name__)
        problems.append(Problem(format_path(at), f"{what} is not supported here", "write a plain YAML value"))
        return None

    return convert(value, loc), problems


def _json_key(key: Any) -> str | None:
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or key is None:
        return json.dumps(key)
    if isinstance(key, int | float):
        return str(key)
    if isinstance(key, dt.date):
        return key.isoformat()
    return None


def validate_manifest(body: Any) -> tuple[FineTuneJob | None, list[Problem]]:
    """Validate one parsed manifest. Returns the job (when valid) and the problems."""
    if not isinstance(body, dict):
        return None, [Problem("", f"a manifest must be a mapping, not {type(body).__name__}")]
    kind, api_version = body.get("kind"), body.get("apiVersion")
    if kind != KIND:
        return None, [
            Problem(
                "kind",
                "kind is missing" if kind is None or kind == "" else f"{_short(kind)} is not a FineTuneJob",
                f"tuneloop validates kind: {KIND} with apiVersion: {API_VERSION}",
            )
        ]
    if api_version != API_VERSION:
        return None, [
            Problem(
                "apiVersion",
                "apiVersion is missing"
                if api_version is None or api_version == ""
                else f"{_short(api_version)} is not a served version of FineTuneJob",
                f"write apiVersion: {API_VERSION}",
            )
        ]
    wire, problems = as_json(body)
    if problems:
        return None, problems
    try:
        return FineTuneJob.model_validate_json(json.dumps(wire), strict=True), []
    except ValidationError as exc:
        return None, problems_from_error(exc)
