"""Acto-style misoperation: every field of a FineTuneJob's spec, mutated (issue #13, scenario 6).

:func:`spec_fields` walks the CRD's structural schema (every property, list item and map value
under ``spec``); :func:`mutations` is a hypothesis strategy drawing one (field, kind, value) at
a time: ``null``, a wrong type, an invalid enum value, a huge or negative number, a huge, empty
or unicode string, ``../`` in a URI or path, a deep nesting, an unknown sibling field.
:func:`admit` does what the API server does with the result (``fieldValidation=Strict`` as kubectl
sends it, pruning, defaulting, schema and CEL validation, via ``tests/harness/crd_validation``),
and :func:`related` tells whether a reported field path points at the mutated field.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from hypothesis import strategies as st

from tests.harness import crd_validation as cv

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "finetunejobs.tuneloop.dev.yaml"

Path_ = tuple[str | int, ...]


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@dataclass(frozen=True)
class SpecField:
    path: Path_
    """From the object's root: ``("spec", "promotion", "gates", 0, "metric")``."""
    schema: dict[str, Any]

    @property
    def type(self) -> str:
        if self.schema.get("x-kubernetes-int-or-string"):
            return "int-or-string"
        return str(self.schema.get("type", "any"))

    @property
    def name(self) -> str:
        return format_path(self.path)


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def spec_fields(schema: dict[str, Any]) -> list[SpecField]:
    """Every node under ``spec``: objects, lists (their first item), maps (a key ``k``), leaves."""
    out: list[SpecField] = []

    def walk(node: dict[str, Any], path: Path_) -> None:
        out.append(SpecField(path, node))
        for key, child in (node.get("properties") or {}).items():
            walk(child, (*path, key))
        if isinstance(node.get("items"), dict):
            walk(node["items"], (*path, 0))
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], (*path, "k"))

    walk(schema["properties"]["spec"], ("spec",))
    return out


HUGE_STRING: Final = "x" * 100_000
UNICODE: Final = ("модель-😀", "\u202eevil\u202c", "a\u200bb", "\x00", "é" * 300, "\ud7ff\ufffd")
TRAVERSAL: Final = (
    "../../etc/passwd",
    "s3://bucket/../other-bucket/",
    "s3://bucket/data/../../x/",
    "file:///../../etc/",
    "hf://org/../../model",
    "s3://bucket/%2e%2e/other/",
    "..",
)


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value


#: Mutation kinds; each draws a value for a field of a given schema type.
KINDS: Final = (
    "null",
    "wrong-type",
    "invalid-enum",
    "huge-number",
    "negative",
    "float-for-int",
    "huge-string",
    "empty-string",
    "unicode",
    "traversal",
    "deep-nesting",
    "unknown-field",
)


def _values(kind: str, field: SpecField) -> st.SearchStrategy[Any]:
    t = field.type
    wrong = {
        "string": [12345, True, {"a": 1}, ["x"], 1.5],
        "integer": ["3", True, {"a": 1}, [1], "1e3"],
        "number": ["0.1", False, {"a": 1}, [0.1]],
        "boolean": ["true", 1, "yes", {"a": 1}],
        "object": ["text", [1, 2], 7, True],
        "array": ["text", {"a": 1}, 7],
        "int-or-string": [True, {"a": 1}, [1], 1.5],
    }.get(t, ["text", 7, {"a": 1}])
    match kind:
        case "null":
            return st.just(None)
        case "wrong-type":
            return st.sampled_from(wrong)
        case "invalid-enum":
            return st.sampled_from(["not-a-value", "LoRA", " full", "full ", "\u0000"])
        case "huge-number":
            return st.sampled_from([10**30, -(10**30), 2**63, 1e308, 10**18, 2**31])
        case "negative":
            return st.sampled_from([-1, -1.5, 0, -(2**31)])
        case "float-for-int":
            return st.floats(min_value=0.01, max_value=1e6, allow_nan=False, allow_infinity=False)
        case "huge-string":
            return st.sampled_from([HUGE_STRING, "y" * 1000, "z" * 254, "q" * 64])
        case "empty-string":
            return st.sampled_from(["", " ", "\n"])
        case "unicode":
            return st.one_of(st.sampled_from(UNICODE), st.text(min_size=1, max_size=40))
        case "traversal":
            return st.sampled_from(TRAVERSAL)
        case "deep-nesting":
            return st.sampled_from([_deep(10), _deep(60), [[[[[[[[[[["x"]]]]]]]]]]]])
        case "unknown-field":
            return st.just({"$unknown": 1})
    raise AssertionError(kind)


@dataclass(frozen=True)
class Mutation:
    field: SpecField
    kind: str
    value: Any

    def describe(self) -> str:
        shown = repr(self.value)
        return f"{self.field.name} <- {self.kind}: {shown[:60] + '...' if len(shown) > 60 else shown}"

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``manifest`` with the mutation: the value set at the field (missing parents
        made), or, for ``unknown-field``, an unknown key added next to the field."""
        out = copy.deepcopy(manifest)
        path = self.field.path
        if self.kind == "unknown-field":
            path = (*path, "xUnknownField") if self.field.type == "object" else (*path[:-1], "xUnknownField")
            value: Any = 1
        else:
            value = copy.deepcopy(self.value)
        node: Any = out
        for part, nxt in itertools.pairwise(path):
            if isinstance(part, int):
                while len(node) <= part:
                    node.append({} if not isinstance(nxt, int) else [])
                if not isinstance(node[part], (dict, list)):
                    node[part] = {} if not isinstance(nxt, int) else []
                node = node[part]
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        last = path[-1]
        if isinstance(last, int):
            while len(node) <= last:
                node.append(None)
        node[last] = value
        return out


def mutations(fields: list[SpecField]) -> st.SearchStrategy[Mutation]:
    """One mutation of one field."""

    @st.composite
    def draw(data: st.DrawFn) -> Mutation:
        field = data(st.sampled_from(fields))
        kind = data(st.sampled_from(KINDS))
        return Mutation(field, kind, data(_values(kind, field)))

    return draw()


@dataclass(frozen=True)
class Admission:
    accepted: bool
    stored: dict[str, Any] | None
    """The object as stored (pruned, defaulted) when accepted."""
    fields: tuple[str, ...]
    """The field paths the refusal names."""
    message: str


INT64: Final = (-(2**63), 2**63 - 1)


def as_decoded(value: Any) -> Any:
    """A JSON value as the API server's decoder holds it: an integer beyond int64 becomes a
    float64 (then refused where an integer is expected), as in ``k8s.io/apimachinery``'s JSON."""
    if isinstance(value, dict):
        return {k: as_decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_decoded(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
        return float(value)
    return value


def admit(schema: dict[str, Any], manifest: dict[str, Any], old: dict[str, Any] | None = None) -> Admission:
    """What the API server does with a create (or, with ``old``, an update) sent by kubectl."""
    obj, pruned = cv.prune_unknown_fields(schema, as_decoded(manifest))
    if pruned:
        return Admission(False, None, tuple(pruned), "strict decoding error: unknown field " + ", ".join(pruned))
    obj = cv.apply_defaults(schema, obj)
    errors = cv.validate_custom_object(schema, obj, old)
    if errors:
        return Admission(False, None, tuple(e.field for e in errors), "; ".join(str(e)[:200] for e in errors))
    return Admission(True, obj, (), "")


def related(reported: str, mutated: str) -> bool:
    """Whether a reported field path points at the mutated field: the field itself, a field
    inside it, the object holding it (a required field or a rule of that object), or a sibling."""
    parent = mutated[: mutated.rindex("[")] if mutated.endswith("]") else mutated.rsplit(".", 1)[0]
    return (
        reported == mutated
        or reported.startswith((mutated + ".", mutated + "["))
        or mutated.startswith((reported + ".", reported + "["))
        or reported.startswith(parent + ".")
    )
