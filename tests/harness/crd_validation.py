"""Structural-schema validation of custom objects, as the Kubernetes API server does it for CRDs.

Generic and reusable: nothing here knows about Tuneloop. The API-server emulator
(:mod:`tests.harness.k8s`) runs, for every create/update of a custom object::

    obj, pruned = prune_unknown_fields(schema, obj)   # unless fieldValidation=Strict
    obj = apply_defaults(schema, obj)                 # nulls of non-nullable fields dropped first
    errors = validate_custom_object(schema, obj, old)

which mirrors the order of the real server (decode → prune → default → validate).

Supported: the structural-schema subset of OpenAPI v3.0 that CRDs use — ``type``,
``nullable``, ``enum``, ``required``, ``properties``, ``additionalProperties`` (as a
schema), ``items``, ``minimum``/``maximum`` with the boolean ``exclusiveMinimum``/
``exclusiveMaximum``, ``multipleOf``, ``minLength``/``maxLength``, ``pattern`` (Python
``re``, unanchored like ECMA/RE2 ``search``), ``minItems``/``maxItems``, ``uniqueItems``,
``minProperties``/``maxProperties``, ``allOf``/``anyOf``/``oneOf``/``not`` (value
validations), ``x-kubernetes-int-or-string``, ``x-kubernetes-preserve-unknown-fields``,
``x-kubernetes-embedded-resource``, ``x-kubernetes-list-type`` (``set``/``map`` uniqueness),
``default`` and ``x-kubernetes-validations`` (CEL, via ``cel-python``).

Not supported (documented in tests/README.md): ``format`` checks, CEL cost limits,
``optionalOldSelf``, validation ratcheting, and the CEL type checker (rules are only
compiled, so a type error shows up when the rule runs, not when the CRD is created).
"""

from __future__ import annotations

import copy
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError

__all__ = [
    "REASON_UNKNOWN_FIELD",
    "FieldError",
    "apply_defaults",
    "check_schema_rules",
    "format_value",
    "invalid_message",
    "prune_unknown_fields",
    "validate_custom_object",
]

# The Kubernetes metav1.CauseType values used below (k8s.io/apimachinery/pkg/util/validation/field).
REASON_INVALID = "FieldValueInvalid"
REASON_REQUIRED = "FieldValueRequired"
REASON_NOT_SUPPORTED = "FieldValueNotSupported"
REASON_TYPE_INVALID = "FieldValueTypeInvalid"
REASON_FORBIDDEN = "FieldValueForbidden"
REASON_DUPLICATE = "FieldValueDuplicate"
REASON_TOO_LONG = "FieldValueTooLong"
REASON_TOO_MANY = "FieldValueTooMany"
#: Not a metav1 cause type: the real server reports unknown fields (fieldValidation=Strict)
#: as a 400 "strict decoding error" without causes. The emulator uses this reason to tell them apart.
REASON_UNKNOWN_FIELD = "FieldValueUnknown"

#: Keys every object may carry at its root (and at an ``x-kubernetes-embedded-resource`` node).
_RESOURCE_ROOT_KEYS = ("apiVersion", "kind", "metadata")

_CEL_REASONS = {
    REASON_INVALID: "Invalid value",
    REASON_FORBIDDEN: "Forbidden",
    REASON_REQUIRED: "Required value",
    REASON_DUPLICATE: "Duplicate value",
}


@dataclass(frozen=True)
class FieldError:
    """One cause of a 422 ``Invalid`` Status, as in ``details.causes[]`` of the real server.

    ``field`` is the Kubernetes field path (``spec.promotion.gates[0].metric``), ``reason`` a
    metav1 cause type (``FieldValueInvalid``...), ``message`` the cause message the API server
    puts next to it (``Invalid value: 2: spec.x in body should be less than or equal to 1``).
    """

    field: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


# --------------------------------------------------------------------------------------------
# Rendering, as k8s.io/apimachinery/pkg/util/validation/field does.
# --------------------------------------------------------------------------------------------


def format_value(value: Any) -> str:
    """Render a value like ``field.Invalid`` does: strings quoted, numbers bare, objects by type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(str(value))


def invalid_message(kind: str, group: str, name: str, errors: Iterable[FieldError]) -> str:
    """The top message of a 422 Status: ``Kind.group "name" is invalid: field: message``."""
    qualified = f"{kind}.{group}" if group else kind
    rendered = [str(error) for error in errors]
    body = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
    return f'{qualified} "{name}" is invalid: {body}'


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _index(path: str, index: int) -> str:
    return f"{path}[{index}]"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_type(value: Any, expected: str) -> bool:
    if isinstance(value, bool):
        return expected == "boolean"
    match expected:
        case "object":
            return isinstance(value, dict)
        case "array":
            return isinstance(value, list)
        case "string":
            return isinstance(value, str)
        case "integer":
            return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        case "number":
            return isinstance(value, int | float)
        case "boolean":
            return False
    return True  # an unknown type name: not ours to judge


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: ``True != 1`` and ``1 == 1.0``, unlike Python's ``==`` on mixed types."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(type(a) is type(b) and a == b) or (isinstance(a, int | float) and isinstance(b, int | float) and a == b)


# --------------------------------------------------------------------------------------------
# Pruning and defaulting (what the server does before validation).
# --------------------------------------------------------------------------------------------


def _allows_unknown(schema: Mapping[str, Any]) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields"))


def _additional(schema: Mapping[str, Any]) -> Mapping[str, Any] | None:
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        return extra
    if extra is True:
        return {}
    return None


def _unknown_keys(schema: Mapping[str, Any], value: Mapping[str, Any], *, root: bool) -> list[str]:
    if _allows_unknown(schema) or _additional(schema) is not None:
        return []
    known = set(schema.get("properties", {}))
    if root or schema.get("x-kubernetes-embedded-resource"):
        known.update(_RESOURCE_ROOT_KEYS)
    return sorted(key for key in value if key not in known)


def prune_unknown_fields(schema: Mapping[str, Any], obj: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop fields the schema does not declare, like the API server's structural pruning.

    Returns a pruned deep copy and the paths of what was dropped (``spec.foo``). The root's
    ``apiVersion``/``kind``/``metadata`` are kept; ``x-kubernetes-preserve-unknown-fields``
    stops pruning below its node (but declared properties under it are still walked).
    """
    pruned: list[str] = []
    result = copy.deepcopy(obj)
    _prune(schema, result, "", pruned, root=True)
    return result, pruned


def _prune(schema: Mapping[str, Any], value: Any, path: str, pruned: list[str], *, root: bool = False) -> None:
    if isinstance(value, dict):
        for key in _unknown_keys(schema, value, root=root):
            pruned.append(_child(path, key))
            del value[key]
        properties = schema.get("properties", {})
        extra = _additional(schema)
        for key, sub in value.items():
            if root and key in _RESOURCE_ROOT_KEYS:
                continue
            if key in properties:
                _prune(properties[key], sub, _child(path, key), pruned)
            elif extra is not None:
                _prune(extra, sub, _child(path, key), pruned)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            _prune(schema["items"], item, _index(path, i), pruned)


def apply_defaults(schema: Mapping[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """Apply schema ``default``s the way the API server does on create and update.

    Defaults are set only where the parent object exists, recursively (a defaulted object
    is defaulted further). Before that, ``null`` values of fields that are not ``nullable``
    are dropped (k8s ≥ 1.20), so a default can replace them. Returns a new dict.
    """
    result = copy.deepcopy(obj)
    _default(schema, result, root=True)
    return result


def _default(schema: Mapping[str, Any], value: Any, *, root: bool = False) -> None:
    if isinstance(value, dict):
        properties: Mapping[str, Any] = schema.get("properties", {})
        for key, sub in properties.items():
            if root and key in _RESOURCE_ROOT_KEYS:
                continue
            if key in value and value[key] is None and not sub.get("nullable"):
                del value[key]
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        extra = _additional(schema)
        for key, sub_value in value.items():
            if root and key in _RESOURCE_ROOT_KEYS:
                continue
            if key in properties:
                _default(properties[key], sub_value)
            elif extra is not None:
                _default(extra, sub_value)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            _default(schema["items"], item)


# --------------------------------------------------------------------------------------------
# CEL (x-kubernetes-validations).
# --------------------------------------------------------------------------------------------

_NUMERIC = (celtypes.IntType, celtypes.UintType, celtypes.DoubleType)
_OLDSELF = re.compile(r"\boldSelf\b")


def _numeric_comparison(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], celtypes.BoolType]:
    """Cross-type numeric comparisons (``1 < 1.5``), which Kubernetes' CEL environment allows."""

    def compare(a: Any, b: Any) -> celtypes.BoolType:
        if isinstance(a, _NUMERIC) and isinstance(b, _NUMERIC) and type(a) is not type(b):
            return celtypes.BoolType(op(float(a), float(b)))
        return celtypes.BoolType(op(a, b))

    return compare


def _cel_list(items: Iterable[Any]) -> celtypes.ListType:
    return celtypes.ListType(list(items))


def _sum(items: Any) -> Any:
    if not items:
        return celtypes.IntType(0)
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


# A few functions of the Kubernetes CEL libraries (strings, lists) that plain CEL lacks.
_CEL_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "_<_": _numeric_comparison(operator.lt),
    "_<=_": _numeric_comparison(operator.le),
    "_>_": _numeric_comparison(operator.gt),
    "_>=_": _numeric_comparison(operator.ge),
    "lowerAscii": lambda s: celtypes.StringType(str(s).lower()),
    "upperAscii": lambda s: celtypes.StringType(str(s).upper()),
    "trim": lambda s: celtypes.StringType(str(s).strip()),
    "split": lambda s, sep: _cel_list(celtypes.StringType(p) for p in str(s).split(str(sep))),
    "join": lambda items, sep="": celtypes.StringType(str(sep).join(str(i) for i in items)),
    "replace": lambda s, old, new: celtypes.StringType(str(s).replace(str(old), str(new))),
    "indexOf": lambda s, sub: celtypes.IntType(str(s).find(str(sub))),
    "lastIndexOf": lambda s, sub: celtypes.IntType(str(s).rfind(str(sub))),
    "isSorted": lambda items: celtypes.BoolType(list(items) == sorted(items)),
    "sum": _sum,
    "min": min,
    "max": max,
}


_CEL_ENV = celpy.Environment()


@lru_cache(maxsize=4096)
def _compile_rule(rule: str) -> celpy.Runner:
    """Compile a CEL rule once (raises ``CELParseError`` on syntax errors)."""
    return _CEL_ENV.program(_CEL_ENV.compile(rule), functions=_CEL_FUNCTIONS)


def _as_cel_json(value: Any, schema: Mapping[str, Any] | None) -> Any:
    """The value as the API server hands it to CEL: a nullable field set to null is absent (``has()``
    is false, kubernetes/kubernetes#106051), and an integer in a ``type: number`` field is a double."""
    schema = schema or {}
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = _additional(schema)
        return {k: _as_cel_json(v, props.get(k, extra)) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        items = schema.get("items")
        return [_as_cel_json(v, items if isinstance(items, Mapping) else None) for v in value]
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _to_cel(value: Any, schema: Mapping[str, Any] | None = None) -> Any:
    return json_to_cel(_as_cel_json(value, schema))


def _field_path_suffix(field_path: str) -> str:
    """Turn a rule's ``fieldPath`` (``.a.b``, ``.a['b']``, ``.a[0]``) into a path suffix."""
    suffix = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", field_path.strip())
    return suffix.lstrip(".")


def _cel_errors(
    schema: Mapping[str, Any], value: Any, *, old: Any, has_old: bool, path: str, errors: list[FieldError]
) -> None:
    rules = schema.get("x-kubernetes-validations") or []
    type_name = schema.get("type") or _json_type(value)
    for rule in rules:
        expression = str(rule.get("rule", ""))
        transition = bool(_OLDSELF.search(expression))
        if transition and not has_old:
            continue  # transition rules run only on updates where the old value exists
        field = path
        if rule.get("fieldPath"):
            field = _child(path, _field_path_suffix(str(rule["fieldPath"])))
        reason = str(rule.get("reason") or REASON_INVALID)
        activation = {"self": _to_cel(value, schema)}
        if transition:
            activation["oldSelf"] = _to_cel(old, schema)
        try:
            program = _compile_rule(expression)
            result = program.evaluate(activation)
            if isinstance(result, CELEvalError):
                raise result
        except (CELEvalError, CELParseError) as exc:
            detail = exc.args[0] if exc.args else exc
            errors.append(FieldError(field, REASON_INVALID, f'Invalid value: "{type_name}": {expression}: {detail}'))
            continue
        if isinstance(result, celtypes.BoolType) and bool(result):
            continue
        message = str(rule.get("message") or f"failed rule: {expression}")
        if rule.get("messageExpression"):
            try:
                computed = _compile_rule(str(rule["messageExpression"])).evaluate(activation)
                if isinstance(computed, str) and computed.strip():
                    message = str(computed)
            except (CELEvalError, CELParseError):
                pass  # like the real server: fall back to message / the default
        prefix = _CEL_REASONS.get(reason, "Invalid value")
        if reason == REASON_INVALID:
            errors.append(FieldError(field, reason, f'{prefix}: "{type_name}": {message}'))
        else:
            errors.append(FieldError(field, reason, f"{prefix}: {message}"))


def check_schema_rules(schema: Mapping[str, Any], path: str = "openAPIV3Schema") -> list[FieldError]:
    """Compile every CEL rule of a schema; what the API server checks when a CRD is created."""
    errors: list[FieldError] = []

    def walk(node: Any, where: str) -> None:
        if not isinstance(node, Mapping):
            return
        for i, rule in enumerate(node.get("x-kubernetes-validations") or []):
            for key in ("rule", "messageExpression"):
                if key in rule:
                    try:
                        _compile_rule(str(rule[key]))
                    except CELParseError as exc:
                        errors.append(
                            FieldError(
                                f"{where}.x-kubernetes-validations[{i}].{key}",
                                REASON_INVALID,
                                f"Invalid value: {format_value(rule[key])}: compilation failed: {exc}",
                            )
                        )
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{where}.properties[{name}]")
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key), f"{where}.{key}")
        for key in ("allOf", "anyOf", "oneOf"):
            for i, sub in enumerate(node.get(key) or []):
                walk(sub, f"{where}.{key}[{i}]")

    walk(schema, path)
    return errors


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------

_MISSING = object()


def validate_custom_object(
    schema: dict[str, Any], obj: dict[str, Any], old: dict[str, Any] | None = None
) -> list[FieldError]:
    """Validate a custom object against a CRD version's ``openAPIV3Schema``.

    Mirrors the API server: schema errors (type, enum, bounds, patterns, required, unknown
    fields) and ``x-kubernetes-validations`` CEL rules (``self`` bound to the node's value,
    ``oldSelf`` to the old value for transition rules, which run only when ``old`` has a value
    at that node). ``metadata`` is not validated here. Errors come back in document order.
    A node's CEL rules are skipped when the node or its children already failed the schema.
    """
    errors: list[FieldError] = []
    has_old = old is not None
    _validate(schema, obj, old=old if has_old else _MISSING, has_old=has_old, path="", errors=errors, root=True)
    return errors


def _number_errors(schema: Mapping[str, Any], value: float, path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    shown = format_value(value)
    if "maximum" in schema:
        maximum = schema["maximum"]
        if schema.get("exclusiveMaximum") is True:
            if value >= maximum:
                errors.append(
                    FieldError(
                        path,
                        REASON_INVALID,
                        f"Invalid value: {shown}: {path} in body should be less than {format_value(maximum)}",
                    )
                )
        elif value > maximum:
            errors.append(
                FieldError(
                    path,
                    REASON_INVALID,
                    f"Invalid value: {shown}: {path} in body should be less than or equal to {format_value(maximum)}",
                )
            )
    if "minimum" in schema:
        minimum = schema["minimum"]
        if schema.get("exclusiveMinimum") is True:
            if value <= minimum:
                errors.append(
                    FieldError(
                        path,
                        REASON_INVALID,
                        f"Invalid value: {shown}: {path} in body should be greater than {format_value(minimum)}",
                    )
                )
        elif value < minimum:
            errors.append(
                FieldError(
                    path,
                    REASON_INVALID,
                    f"Invalid value: {shown}: {path} in body should be greater than or equal to "
                    f"{format_value(minimum)}",
                )
            )
    if schema.get("multipleOf"):
        ratio = value / schema["multipleOf"]
        if not math.isclose(ratio, round(ratio), rel_tol=0, abs_tol=1e-9):
            errors.append(
                FieldError(
                    path,
                    REASON_INVALID,
                    f"Invalid value: {shown}: {path} in body should be a multiple of "
                    f"{format_value(schema['multipleOf'])}",
                )
            )
    return errors


def _string_errors(schema: Mapping[str, Any], value: str, path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    shown = format_value(value)
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(FieldError(path, REASON_TOO_LONG, f"Too long: may not be more than {schema['maxLength']} bytes"))
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(
            FieldError(
                path,
                REASON_INVALID,
                f"Invalid value: {shown}: {path} in body should be at least {schema['minLength']} chars long",
            )
        )
    if "pattern" in schema and re.search(schema["pattern"], value) is None:
        errors.append(
            FieldError(
                path,
                REASON_INVALID,
                f"Invalid value: {shown}: {path} in body should match '{schema['pattern']}'",
            )
        )
    return errors


def _list_key(item: Any, keys: list[str]) -> tuple[str, ...] | None:
    if not isinstance(item, dict):
        return None
    return tuple(json.dumps(item.get(key), sort_keys=True) for key in keys)


def _array_errors(schema: Mapping[str, Any], value: list[Any], path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(
            FieldError(path, REASON_TOO_MANY, f"Too many: {len(value)}: must have at most {schema['maxItems']} items")
        )
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(
            FieldError(
                path,
                REASON_INVALID,
                f"Invalid value: {len(value)}: {path} in body should have at least {schema['minItems']} items",
            )
        )
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "set" or schema.get("uniqueItems"):
        for i, item in enumerate(value):
            if any(_json_equal(item, earlier) for earlier in value[:i]):
                errors.append(FieldError(_index(path, i), REASON_DUPLICATE, f"Duplicate value: {format_value(item)}"))
    elif list_type == "map":
        keys = list(schema.get("x-kubernetes-list-map-keys") or [])
        seen: set[tuple[str, ...]] = set()
        for i, item in enumerate(value):
            key = _list_key(item, keys)
            if key is None:
                continue
            if key in seen:
                shown = "{" + ", ".join(f'"{k}":{v}' for k, v in zip(keys, key, strict=True)) + "}"
                errors.append(FieldError(_index(path, i), REASON_DUPLICATE, f"Duplicate value: {shown}"))
            seen.add(key)
    return errors


def _old_items(schema: Mapping[str, Any], old: Any) -> dict[tuple[str, ...], Any]:
    """Correlate list items with old ones by key, only for ``x-kubernetes-list-type: map``."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(old, list):
        return {}
    keys = list(schema.get("x-kubernetes-list-map-keys") or [])
    result: dict[tuple[str, ...], Any] = {}
    for item in old:
        key = _list_key(item, keys)
        if key is not None:
            result[key] = item
    return result


def _validate(
    schema: Mapping[str, Any],
    value: Any,
    *,
    old: Any,
    has_old: bool,
    path: str,
    errors: list[FieldError],
    root: bool = False,
) -> None:
    start = len(errors)
    _validate_node(schema, value, old=old, has_old=has_old, path=path, errors=errors, root=root)
    if len(errors) == start and value is not None:
        _cel_errors(schema, value, old=old, has_old=has_old and old is not _MISSING, path=path, errors=errors)


def _validate_node(
    schema: Mapping[str, Any],
    value: Any,
    *,
    old: Any,
    has_old: bool,
    path: str,
    errors: list[FieldError],
    root: bool,
) -> None:
    expected = schema.get("type")
    if value is None:
        if schema.get("nullable") or (expected is None and not schema.get("x-kubernetes-int-or-string")):
            return
        shown = expected or "integer or string"
        errors.append(
            FieldError(
                path, REASON_TYPE_INVALID, f'Invalid value: "null": {path} in body must be of type {shown}: "null"'
            )
        )
        return

    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or _is_type(value, "integer")):
            actual = _json_type(value)
            errors.append(
                FieldError(
                    path,
                    REASON_TYPE_INVALID,
                    f'Invalid value: "{actual}": {path} in body must be of type integer,string: "{actual}"',
                )
            )
            return
    elif expected and not _is_type(value, expected):
        actual = _json_type(value)
        errors.append(
            FieldError(
                path,
                REASON_TYPE_INVALID,
                f'Invalid value: "{actual}": {path} in body must be of type {expected}: "{actual}"',
            )
        )
        return

    if "enum" in schema and not any(_json_equal(value, choice) for choice in schema["enum"]):
        choices = ", ".join(format_value(choice) for choice in schema["enum"])
        errors.append(
            FieldError(
                path,
                REASON_NOT_SUPPORTED,
                f"Unsupported value: {format_value(value)}: supported values: {choices}",
            )
        )

    if isinstance(value, int | float) and not isinstance(value, bool):
        errors.extend(_number_errors(schema, value, path))
    elif isinstance(value, str):
        errors.extend(_string_errors(schema, value, path))
    elif isinstance(value, list):
        errors.extend(_array_errors(schema, value, path))
        items = schema.get("items")
        if isinstance(items, Mapping):
            correlated = _old_items(schema, old if has_old else None)
            keys = list(schema.get("x-kubernetes-list-map-keys") or [])
            for i, item in enumerate(value):
                key = _list_key(item, keys) if correlated else None
                item_old = correlated.get(key, _MISSING) if key is not None else _MISSING
                _validate(
                    items,
                    item,
                    old=item_old,
                    has_old=item_old is not _MISSING,
                    path=_index(path, i),
                    errors=errors,
                )
    elif isinstance(value, dict):
        _object_errors(schema, value, old=old, has_old=has_old, path=path, errors=errors, root=root)

    _combinator_errors(schema, value, path, errors)


def _object_errors(
    schema: Mapping[str, Any],
    value: dict[str, Any],
    *,
    old: Any,
    has_old: bool,
    path: str,
    errors: list[FieldError],
    root: bool,
) -> None:
    properties: Mapping[str, Any] = schema.get("properties", {})
    extra = _additional(schema)
    for name in schema.get("required") or []:
        if name not in value:
            errors.append(FieldError(_child(path, name), REASON_REQUIRED, "Required value"))
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errors.append(
            FieldError(
                path,
                REASON_TOO_MANY,
                f"Too many: {len(value)}: must have at most {schema['maxProperties']} items",
            )
        )
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        errors.append(
            FieldError(
                path,
                REASON_INVALID,
                f"Invalid value: {len(value)}: {path} in body should have at least "
                f"{schema['minProperties']} properties",
            )
        )
    for name in _unknown_keys(schema, value, root=root):
        field = _child(path, name)
        errors.append(FieldError(field, REASON_UNKNOWN_FIELD, f'unknown field "{field}"'))
    old_map = old if has_old and isinstance(old, dict) else None
    for name, sub_value in value.items():
        if (root or schema.get("x-kubernetes-embedded-resource")) and name in _RESOURCE_ROOT_KEYS:
            if name != "metadata" and name not in properties and not isinstance(sub_value, str):
                errors.append(
                    FieldError(
                        _child(path, name),
                        REASON_TYPE_INVALID,
                        f'Invalid value: "{_json_type(sub_value)}": {_child(path, name)} in body must be of '
                        f'type string: "{_json_type(sub_value)}"',
                    )
                )
            continue
        sub_schema = properties.get(name) if name in properties else extra
        if sub_schema is None:
            continue  # unknown (reported above) or preserved
        sub_old = old_map.get(name, _MISSING) if old_map is not None else _MISSING
        _validate(
            sub_schema,
            sub_value,
            old=sub_old,
            has_old=sub_old is not _MISSING,
            path=_child(path, name),
            errors=errors,
        )


def _passes(schema: Mapping[str, Any], value: Any, path: str) -> bool:
    probe: list[FieldError] = []
    _validate(schema, value, old=_MISSING, has_old=False, path=path, errors=probe)
    return not [e for e in probe if e.reason != REASON_UNKNOWN_FIELD]


def _combinator_errors(schema: Mapping[str, Any], value: Any, path: str, errors: list[FieldError]) -> None:
    for sub in schema.get("allOf") or []:
        sub_errors: list[FieldError] = []
        _validate(sub, value, old=_MISSING, has_old=False, path=path, errors=sub_errors)
        errors.extend(e for e in sub_errors if e.reason != REASON_UNKNOWN_FIELD)
    any_of = schema.get("anyOf")
    if any_of and not any(_passes(sub, value, path) for sub in any_of):
        errors.append(
            FieldError(
                path,
                REASON_INVALID,
                f"Invalid value: {format_value(value)}: {path} in body must validate at least one schema (anyOf)",
            )
        )
    one_of = schema.get("oneOf")
    if one_of and sum(1 for sub in one_of if _passes(sub, value, path)) != 1:
        errors.append(
            FieldError(
                path,
                REASON_INVALID,
                f"Invalid value: {format_value(value)}: {path} in body must validate one and only one schema (oneOf)",
            )
        )
    if isinstance(schema.get("not"), Mapping) and _passes(schema["not"], value, path):
        errors.append(
            FieldError(
                path,
                REASON_INVALID,
                f"Invalid value: {format_value(value)}: {path} in body must not validate the schema (not)",
            )
        )
