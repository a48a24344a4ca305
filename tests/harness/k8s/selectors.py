"""Label and field selectors, as LIST, WATCH and DELETE-collection requests filter with them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Fields the real API server accepts in field selectors, besides metadata.name/namespace.
FIELD_SELECTABLE: dict[tuple[str, str], frozenset[str]] = {
    ("", "pods"): frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        }
    ),
    ("", "events"): frozenset(
        {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        }
    ),
    ("events.k8s.io", "events"): frozenset(
        {
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        }
    ),
    ("", "secrets"): frozenset({"type"}),
    ("", "namespaces"): frozenset({"status.phase"}),
    ("", "nodes"): frozenset({"spec.unschedulable"}),
    ("", "replicationcontrollers"): frozenset({"status.replicas"}),
    ("batch", "jobs"): frozenset({"status.successful"}),
    ("", "services"): frozenset({"spec.clusterIP", "spec.type"}),
}


@dataclass(frozen=True)
class LabelRequirement:
    """One term of a label selector: ``key op values``."""

    key: str
    op: str  # one of: = != in notin exists !exists > <
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.op:
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "exists":
                return present
            case "!exists":
                return not present
            case ">" | "<":
                try:
                    number = int(str(value))
                except ValueError:
                    return False
                limit = int(self.values[0])
                return present and (number > limit if self.op == ">" else number < limit)
        return False


_LABEL_KEY = r"[A-Za-z0-9][A-Za-z0-9./_-]*"


_LABEL_VALUE = r"[A-Za-z0-9._-]*"


_SET_TERM = re.compile(rf"\s*({_LABEL_KEY})\s+(in|notin)\s+\(([^)]*)\)\s*")


_EQ_TERM = re.compile(rf"\s*({_LABEL_KEY})\s*(==|=|!=|>|<)\s*({_LABEL_VALUE})\s*")


_EXISTS_TERM = re.compile(rf"\s*(!?)\s*({_LABEL_KEY})\s*")


def _split_terms(selector: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b`` → two terms)."""
    terms: list[str] = []
    depth = 0
    current = ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term for term in terms if term.strip()]


def parse_label_selector(selector: str) -> list[LabelRequirement]:
    """Parse a label selector (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``, ``>``, ``<``).

    Raises ``ValueError`` on a malformed selector (the server answers 400).
    """
    requirements: list[LabelRequirement] = []
    for term in _split_terms(selector):
        if match := _SET_TERM.fullmatch(term):
            values = tuple(v.strip() for v in match[3].split(",") if v.strip())
            requirements.append(LabelRequirement(match[1], match[2], values))
        elif match := _EQ_TERM.fullmatch(term):
            op = "=" if match[2] == "==" else match[2]
            if op in (">", "<") and not re.fullmatch(r"-?\d+", match[3]):
                raise ValueError(f"couldn't parse the selector string {selector!r}: {match[3]!r} is not an integer")
            requirements.append(LabelRequirement(match[1], op, (match[3],)))
        elif match := _EXISTS_TERM.fullmatch(term):
            requirements.append(LabelRequirement(match[2], "!exists" if match[1] else "exists"))
        else:
            raise ValueError(f"unable to parse requirement: {term.strip()!r}")
    return requirements


def match_label_selector(requirements: Iterable[LabelRequirement], labels: Mapping[str, str] | None) -> bool:
    """Whether labels satisfy all requirements (an empty selector matches everything)."""
    return all(requirement.matches(labels or {}) for requirement in requirements)


def parse_field_selector(selector: str) -> list[tuple[str, str, str]]:
    """Parse a field selector into ``(path, op, value)`` terms, ``op`` being ``=`` or ``!=``."""
    terms: list[tuple[str, str, str]] = []
    for term in re.split(r"(?<!\\),", selector):
        if not term.strip():
            continue
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(==|=|!=)(.*)", term)
        if not match:
            raise ValueError(f"invalid selector: {term!r}; can't understand {term!r}")
        value = re.sub(r"\\(.)", r"\1", match[3].strip())
        terms.append((match[1], "!=" if match[2] == "!=" else "=", value))
    return terms


def field_value(obj: Mapping[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ""
        node = node[part]
    if isinstance(node, bool):
        return "true" if node else "false"
    if node is None:
        return ""
    return node if isinstance(node, str) else json.dumps(node)


@dataclass
class Selector:
    labels: list[LabelRequirement]
    fields: list[tuple[str, str, str]]

    def matches(self, obj: Mapping[str, Any]) -> bool:
        if not match_label_selector(self.labels, obj.get("metadata", {}).get("labels")):
            return False
        return all((field_value(obj, path) == value) == (op == "=") for path, op, value in self.fields)
