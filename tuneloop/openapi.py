"""The CRD's ``openAPIV3Schema``, generated from the pydantic models.

Plain pydantic JSON Schema is not a *structural* schema, which the API server requires.
:func:`structural` turns one into the other: ``$ref`` inlined, ``title`` dropped,
``anyOf``-with-null turned into ``nullable``, ``int | str`` into
``x-kubernetes-int-or-string``, JSON-Schema-2020 ``exclusiveMinimum: x`` into the
OpenAPI-3.0 ``minimum: x, exclusiveMinimum: true``, object and array defaults dropped
(the API server would apply them and rewrite every manifest), and
``additionalProperties: false`` removed (the API server rejects unknown fields itself
under ``fieldValidation=Strict``, kubectl's default). The CEL rules of :mod:`tuneloop.cel` are
placed at their nodes. Both the CRD (:mod:`tuneloop.crd`) and the API reference
(:mod:`tuneloop.apidoc`) are rendered from it.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Final

from tuneloop.api import FineTuneJobSpec, FineTuneJobStatus
from tuneloop.cel import CEL_RULES

Schema = dict[str, Any]


def _clean_text(text: str) -> str:
    text = text.replace("``", "`")
    return re.sub(r"\s*\n\s*", " ", text).strip()


def structural(schema: Schema, defs: dict[str, Schema] | None = None) -> Schema:
    """Turn a pydantic JSON Schema node into a Kubernetes structural schema node."""
    defs = schema.get("$defs", {}) if defs is None else defs
    node = dict(schema)
    node.pop("$defs", None)
    node.pop("title", None)

    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        resolved = structural(target, defs)
        if "description" in node:  # the field's own description wins over the class's
            resolved["description"] = node.pop("description")
        resolved.update({k: v for k, v in node.items() if k not in ("default",)})
        if "default" in node:
            resolved["default"] = node["default"]
        node = resolved

    for key in ("anyOf", "oneOf"):
        if key not in node:
            continue
        options = node.pop(key)
        non_null = [o for o in options if o.get("type") != "null"]
        nullable = len(non_null) < len(options)
        if len(non_null) == 1:
            inner = structural(non_null[0], defs)
            desc = node.get("description")
            merged = {**inner, **{k: v for k, v in node.items() if k != "description"}}
            if desc or "description" in inner:
                merged["description"] = desc or inner["description"]
            node = merged
        elif {o.get("type") for o in non_null} == {"integer", "string"}:
            node["x-kubernetes-int-or-string"] = True
        else:
            raise ValueError(f"cannot express union {options!r} in a structural schema")
        if nullable:
            node["nullable"] = True
            if node.get("default") is None:
                node.pop("default", None)

    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, inclusive, step in (("exclusiveMinimum", "minimum", 1), ("exclusiveMaximum", "maximum", -1)):
        if bound in node and not isinstance(node[bound], bool):
            value = node.pop(bound)
            if node.get("type") == "integer":  # x > 0 reads better as x >= 1
                node[inclusive] = value + step
            else:
                node[inclusive] = value
                node[bound] = True
    if isinstance(node.get("default"), dict | list):
        node.pop("default")
    if "description" in node:
        node["description"] = _clean_text(node["description"])
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.pop("default", None)

    if "properties" in node:
        node["type"] = "object"
        node.pop("additionalProperties", None)
        node["properties"] = {k: structural(v, defs) for k, v in node["properties"].items()}
    elif isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = structural(node["additionalProperties"], defs)
    if "items" in node:
        node["items"] = structural(node["items"], defs)
    return _ordered(node)


_KEY_ORDER: Final = (
    "description",
    "type",
    "nullable",
    "x-kubernetes-int-or-string",
    "enum",
    "default",
    "format",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "maxProperties",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-validations",
)


def _ordered(node: Schema) -> Schema:
    known: Schema = {k: node[k] for k in _KEY_ORDER if k in node}
    return {**known, **{k: v for k, v in node.items() if k not in known}}


def _node_at(root: Schema, path: tuple[str, ...]) -> Schema:
    node = root
    for part in path:
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def openapi_schema() -> Schema:
    """The ``openAPIV3Schema`` of the CRD's one version."""
    spec = structural(FineTuneJobSpec.model_json_schema(by_alias=True, mode="validation"))
    status = structural(FineTuneJobStatus.model_json_schema(by_alias=True, mode="validation"))
    root: Schema = {
        "description": "A fine-tuning job that retrains, evaluates and promotes continuously. "
        "`kubectl explain finetunejob.spec` describes every field.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "description": "APIVersion of this object: tuneloop.dev/v1alpha1.",
                "type": "string",
            },
            "kind": {"description": "Kind of this object: FineTuneJob.", "type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    for rule in CEL_RULES:
        node = _node_at(root, rule.at)
        node.setdefault("x-kubernetes-validations", []).append(rule.render())
    return copy.deepcopy(root)
