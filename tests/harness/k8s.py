"""A Kubernetes API-server emulator for tests, built on ``kmock==0.8``'s ``KubernetesEmulator``.

Stock kmock stores objects and streams watch events, but it is not an API server: no
resourceVersion/uid/generation, no conflicts, no status subresource, no selectors, no
PUT, no garbage collection, no CRD registration or validation, and core discovery that real
kubectl cannot read. :class:`KubernetesApiEmulator` keeps kmock's HTTP server, request
recording, reaction DSL (``emu['get /x'] << 500`` still overrides anything) and object
store (``emu.objects[...]`` with history), and serves the Kubernetes API itself with the
semantics listed in tests/README.md ("The Kubernetes API emulator"), including what it
still does not do.

Everything that changes state runs synchronously on the server's event loop, so each API
call is atomic, like a single etcd transaction. :class:`EmulatorThread` runs the server in
a background thread for synchronous tests (Kopf's ``KopfRunner``, kubectl subprocesses).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import concurrent.futures
import contextlib
import copy
import datetime
import gzip
import importlib.metadata
import importlib.resources
import json
import random
import re
import threading
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml
from kmock._internal import apps, enums, rendering
from multidict import CIMultiDict

from tests.harness import crd_validation as cv

KMOCK_VERSION = "0.8"
if importlib.metadata.version("kmock") != KMOCK_VERSION:  # pragma: no cover - a guard for upgrades
    raise ImportError(
        f"tests.harness.k8s subclasses kmock=={KMOCK_VERSION}; found {importlib.metadata.version('kmock')}"
    )

__all__ = [
    "ApiError",
    "EmulatorThread",
    "KubernetesApiEmulator",
    "LabelRequirement",
    "ResourceDef",
    "json_merge_patch",
    "match_label_selector",
    "parse_field_selector",
    "parse_label_selector",
    "strategic_merge_patch",
]

T = TypeVar("T")
Obj = dict[str, Any]

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")
FOREGROUND = "foregroundDeletion"
CRD_CLEANUP = "customresourcecleanup.apiextensions.k8s.io"
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
# API groups of the bundled discovery data (a k3s cluster) that a plain API server does not serve.
_SKIPPED_GROUPS = {"metrics.k8s.io", "gateway.networking.k8s.io"}
_OBJECT_META_KEYS = {
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
}
_SYSTEM_META_KEYS = (
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "resourceVersion",
    "selfLink",
)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the API server uses for generateName

# Fields the real API server accepts in field selectors, besides metadata.name/namespace.
_FIELD_SELECTABLE: dict[tuple[str, str], frozenset[str]] = {
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

# Strategic merge patch: list fields merged by a key, by field name (the real server uses
# the Go types' patchMergeKey tags; a name-based table covers what Kopf and kubectl touch).
_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "conditions": "type",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
}
_MERGED_PRIMITIVE_LISTS = {"finalizers"}


# --------------------------------------------------------------------------------------------
# Errors: the Status objects of the real API server.
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An API error rendered as a ``kind: Status`` body with the HTTP code, like the real server."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details) if details else None

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(rd: ResourceDef | None, name: str | None, **extra: Any) -> Obj:
    details: Obj = {}
    if name:
        details["name"] = name
    if rd is not None:
        if rd.group:
            details["group"] = rd.group
        details["kind"] = rd.plural
    details.update(extra)
    return details


def _not_found(rd: ResourceDef, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rd.group_resource} "{name}" not found', _details(rd, name))


def _no_route() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _conflict(rd: ResourceDef, name: str, detail: str) -> ApiError:
    return ApiError(
        409, "Conflict", f'Operation cannot be fulfilled on {rd.group_resource} "{name}": {detail}', _details(rd, name)
    )


def _stale(rd: ResourceDef, name: str) -> ApiError:
    return _conflict(
        rd, name, "the object has been modified; please apply your changes to the latest version and try again"
    )


def _invalid(rd: ResourceDef, name: str, errors: list[cv.FieldError]) -> ApiError:
    details: Obj = {"name": name, "kind": rd.kind}
    if rd.group:
        details["group"] = rd.group
    details["causes"] = [{"reason": e.reason, "message": e.message, "field": e.field} for e in errors]
    return ApiError(422, "Invalid", cv.invalid_message(rd.kind, rd.group, name, errors), details)


def _unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: "
        f"application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml "
        f"(got {content_type or 'none'})",
    )


# --------------------------------------------------------------------------------------------
# Resources.
# --------------------------------------------------------------------------------------------


@dataclass
class ResourceDef:
    """What discovery says about one served group/version/resource, plus its CRD schema if any."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()
    verbs: tuple[str, ...] = ALL_VERBS
    list_kind: str = ""
    storage_version: str = ""
    crd_name: str | None = None
    schema: Obj | None = None
    printer_columns: list[Obj] = field(default_factory=list)
    selectable_fields: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.singular = self.singular or self.kind.lower()
        self.list_kind = self.list_kind or f"{self.kind}List"
        self.storage_version = self.storage_version or self.version

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_api_version(self) -> str:
        return f"{self.group}/{self.storage_version}" if self.group else self.storage_version

    @property
    def group_resource(self) -> str:
        """How error messages name the resource: ``configmaps``, ``finetunejobs.tuneloop.dev``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def storage(self) -> kmock.resource:
        """The key of the objects in ``emu.objects`` (all served versions share one storage)."""
        return kmock.resource(self.group, self.storage_version, self.plural)

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


def _version_priority(version: str) -> tuple[int, int, int, str]:
    """Kube-aware version order: v2 > v1 > v1beta2 > v1beta1 > v1alpha1 > anything else."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, 0, 0, version)
    stage = {None: 0, "beta": 1, "alpha": 2}[match[2]]
    return (stage, -int(match[1]), -int(match[3] or 0), version)


def _bundled_resources() -> list[ResourceDef]:
    """Built-in resources from kmock's bundled discovery data of a real cluster."""
    data = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
    docs: list[Obj] = json.loads(gzip.decompress(data))
    result: list[ResourceDef] = []
    for doc in docs:
        group_version: str = doc["groupVersion"]
        group, _, version = group_version.rpartition("/")
        if group in _SKIPPED_GROUPS:
            continue
        subresources: dict[str, set[str]] = {}
        for entry in doc["resources"]:
            if "/" in entry["name"]:
                parent, sub = entry["name"].split("/", 1)
                subresources.setdefault(parent, set()).add(sub)
        for entry in doc["resources"]:
            if "/" in entry["name"]:
                continue
            result.append(
                ResourceDef(
                    group=group,
                    version=version,
                    plural=entry["name"],
                    kind=entry["kind"],
                    namespaced=bool(entry.get("namespaced")),
                    singular=entry.get("singularName") or "",
                    short_names=tuple(entry.get("shortNames") or ()),
                    categories=tuple(entry.get("categories") or ()),
                    subresources=frozenset(subresources.get(entry["name"], ())),
                    verbs=tuple(entry.get("verbs") or ALL_VERBS),
                )
            )
    return result


def _crd_resource_defs(crd: Mapping[str, Any]) -> list[ResourceDef]:
    spec = crd["spec"]
    names = spec["names"]
    versions = spec["versions"]
    storage = next(v["name"] for v in versions if v.get("storage"))
    result: list[ResourceDef] = []
    for version in versions:
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or spec.get("subresources") or {}
        schema = (version.get("schema") or spec.get("validation") or {}).get("openAPIV3Schema")
        result.append(
            ResourceDef(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular") or "",
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                subresources=frozenset(key for key in ("status", "scale") if key in subresources),
                list_kind=names.get("listKind") or "",
                storage_version=storage,
                crd_name=crd["metadata"]["name"],
                schema=copy.deepcopy(schema) if schema else None,
                printer_columns=list(version.get("additionalPrinterColumns") or []),
                selectable_fields=frozenset(
                    str(item["jsonPath"]).lstrip(".") for item in version.get("selectableFields") or []
                ),
            )
        )
    return result


def _validate_crd(crd: Obj) -> list[cv.FieldError]:
    """The checks of the real server on a CRD that matter for tests (names, versions, schemas, CEL)."""
    errors: list[cv.FieldError] = []
    spec = crd.get("spec")
    if not isinstance(spec, dict):
        return [cv.FieldError("spec", cv.REASON_REQUIRED, "Required value")]
    group = spec.get("group")
    names = spec.get("names") or {}
    if not group:
        errors.append(cv.FieldError("spec.group", cv.REASON_REQUIRED, "Required value"))
    elif "." not in group:
        errors.append(
            cv.FieldError(
                "spec.group", cv.REASON_INVALID, f'Invalid value: "{group}": should be a domain with at least one dot'
            )
        )
    for key in ("plural", "kind"):
        if not names.get(key):
            errors.append(cv.FieldError(f"spec.names.{key}", cv.REASON_REQUIRED, "Required value"))
    plural = names.get("plural")
    if plural and group and crd.get("metadata", {}).get("name") != f"{plural}.{group}":
        errors.append(
            cv.FieldError(
                "metadata.name",
                cv.REASON_INVALID,
                f'Invalid value: "{crd.get("metadata", {}).get("name")}": must be spec.names.plural+"."+spec.group',
            )
        )
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        errors.append(
            cv.FieldError(
                "spec.scope",
                cv.REASON_NOT_SUPPORTED,
                f'Unsupported value: {cv.format_value(spec.get("scope"))}: supported values: "Cluster", "Namespaced"',
            )
        )
    versions = spec.get("versions") or []
    if not versions:
        errors.append(
            cv.FieldError(
                "spec.versions",
                cv.REASON_INVALID,
                "Invalid value: null: must have exactly one version marked as storage version",
            )
        )
    elif sum(1 for v in versions if v.get("storage")) != 1:
        errors.append(
            cv.FieldError(
                "spec.versions",
                cv.REASON_INVALID,
                f"Invalid value: {cv.format_value(versions)}: must have exactly one version marked as storage version",
            )
        )
    for i, version in enumerate(versions):
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        where = f"spec.versions[{i}].schema.openAPIV3Schema"
        if not isinstance(schema, dict):
            errors.append(cv.FieldError(where, cv.REASON_REQUIRED, "Required value: schemas are required"))
            continue
        if schema.get("type") != "object":
            errors.append(
                cv.FieldError(f"{where}.type", cv.REASON_REQUIRED, 'Required value: must be "object" at the root')
            )
        errors.extend(cv.check_schema_rules(schema, where))
    return errors


# --------------------------------------------------------------------------------------------
# Paths, selectors, patches.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiPath:
    """A parsed resource URL: ``/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}[/{sub}]]``."""

    group: str
    version: str
    plural: str
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_api_path(path: str) -> ApiPath | None:
    """Parse a resource URL, including the cluster-scoped ``/api/v1/namespaces[/{name}[/status]]``."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace: str | None = None
    namespace_subresource = group == "" and len(rest) == 3 and rest[2] in ("status", "finalize")
    if rest[0] == "namespaces" and len(rest) >= 3 and not namespace_subresource:
        namespace, rest = rest[1], rest[2:]
    return ApiPath(
        group=group,
        version=version,
        plural=rest[0],
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else None,
        subresource="/".join(rest[2:]) or None,
    )


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


def _field_value(obj: Mapping[str, Any], path: str) -> str:
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


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, ``null`` deletes, the rest replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


_DELETE = object()


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch for built-in types, in the subset kubectl and controllers use.

    Like a merge patch, plus: lists of known fields (``containers``, ``env``, ``volumes``,
    ``ownerReferences``, ``conditions``...) are merged by their key instead of replaced;
    ``finalizers`` merge as a set; the ``$patch: replace|delete|merge``,
    ``$deleteFromPrimitiveList/<field>`` directives work; ``$setElementOrder``/``$retainKeys``
    are accepted and ignored.
    """
    result = _smp(target, patch)
    return {} if result is _DELETE else result


def _smp(target: Any, patch: Any) -> Any:
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return _DELETE
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = copy.deepcopy(dict(target)) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if key in {"$patch", "$retainKeys"} or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [item for item in result.get(name) or [] if item not in (value or [])]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _smp_list(key, result.get(key), value)
        else:
            merged = _smp(result.get(key), value)
            if merged is _DELETE:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _smp_list(field_name: str, current: Any, patch: list[Any]) -> list[Any]:
    existing = list(current) if isinstance(current, list) else []
    if field_name in _MERGED_PRIMITIVE_LISTS:
        return existing + [item for item in patch if item not in existing]
    key = _MERGE_KEYS.get(field_name)
    if field_name == "ports":
        key = "containerPort" if any(isinstance(i, dict) and "containerPort" in i for i in patch) else "port"
    if key is None or not all(isinstance(item, dict) for item in patch):
        return copy.deepcopy(patch)
    if any(item.get("$patch") == "replace" for item in patch):
        return [copy.deepcopy(item) for item in patch if "$patch" not in item]
    for item in patch:
        position = next(
            (i for i, old in enumerate(existing) if isinstance(old, dict) and old.get(key) == item.get(key)),
            None,
        )
        if item.get("$patch") == "delete":
            if position is not None:
                del existing[position]
            continue
        if position is None:
            existing.append({k: copy.deepcopy(v) for k, v in item.items() if not k.startswith("$")})
        else:
            existing[position] = _smp(existing[position], item)
    return existing


# --------------------------------------------------------------------------------------------
# OpenAPI: the least that real kubectl needs.
# --------------------------------------------------------------------------------------------


def _openapi_v3_document(defs: Iterable[ResourceDef], server_version: str) -> Obj:
    """A minimal OpenAPI v3 group-version document: PATCH operations, no schemas.

    kubectl (≥ 1.27) validates on the server (``fieldValidation=Strict``) when OpenAPI v3
    shows, for the object's kind, a PATCH operation with a ``fieldValidation`` query
    parameter; without any OpenAPI, ``kubectl apply``/``create`` fail with "failed to
    download openapi" unless ``--validate=false``. kubectl's patch computation needs no
    OpenAPI (built-in kinds: strategic merge from the Go structs; custom resources: a JSON
    merge patch), so no request bodies or schemas are described; ``kubectl explain`` has
    nothing to explain.
    """
    paths: Obj = {}
    for rd in defs:
        if "patch" not in rd.verbs:
            continue
        prefix = f"/apis/{rd.group}/{rd.version}" if rd.group else f"/api/{rd.version}"
        scope = "/namespaces/{namespace}" if rd.namespaced else ""
        paths[f"{prefix}{scope}/{rd.plural}/{{name}}"] = {
            "patch": {
                "operationId": f"patch{rd.kind}",
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                ],
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": rd.group, "version": rd.version, "kind": rd.kind},
            }
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (tests.harness.k8s emulator)", "version": server_version},
        "paths": paths,
        "components": {"schemas": {}},
    }


# --------------------------------------------------------------------------------------------
# Protobuf: just enough for kubectl's imperative `create namespace|configmap|secret`.
# --------------------------------------------------------------------------------------------


def _pb_fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """Protobuf wire format: ``(field number, value)`` with varints as ints and the rest as bytes."""
    position = 0

    def varint() -> int:
        nonlocal position
        result = shift = 0
        while True:
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while position < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 2:
            length = varint()
            yield number, data[position : position + length]
            position += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, data[position : position + size]
            position += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _pb_map(entries: Iterable[bytes], *, binary: bool = False) -> dict[str, str]:
    result: dict[str, str] = {}
    for entry in entries:
        fields = dict(_pb_fields(entry))
        value = fields.get(2, b"")
        result[fields.get(1, b"").decode()] = base64.b64encode(value).decode() if binary else value.decode()
    return result


def _pb_object_meta(data: bytes) -> Obj:
    meta: Obj = {}
    labels: list[bytes] = []
    annotations: list[bytes] = []
    finalizers: list[str] = []
    for number, value in _pb_fields(data):
        if number in (1, 2, 3) and value:
            meta[("name", "generateName", "namespace")[number - 1]] = value.decode()
        elif number == 11:
            labels.append(value)
        elif number == 12:
            annotations.append(value)
        elif number == 14:
            finalizers.append(value.decode())
    if labels:
        meta["labels"] = _pb_map(labels)
    if annotations:
        meta["annotations"] = _pb_map(annotations)
    if finalizers:
        meta["finalizers"] = finalizers
    return meta


def _decode_protobuf(body: bytes) -> Obj:
    """Decode the Kubernetes protobuf envelope for Namespaces, ConfigMaps and Secrets (else 415).

    kubectl's typed commands (``kubectl create namespace x``) send protobuf and do not fall
    back to JSON; ``kubectl apply/create -f`` and every other client here send JSON.
    """
    if not body.startswith(b"k8s\x00"):
        raise _bad_request("the protobuf body lacks the k8s envelope")
    envelope = dict(_pb_fields(body[4:]))
    type_meta = dict(_pb_fields(envelope.get(1, b"")))
    api_version, kind = type_meta.get(1, b"").decode(), type_meta.get(2, b"").decode()
    if (api_version, kind) not in (("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "Secret")):
        raise _unsupported_media_type(f"application/vnd.kubernetes.protobuf ({api_version} {kind})")
    obj: Obj = {"apiVersion": api_version, "kind": kind, "metadata": {}}
    maps: dict[int, list[bytes]] = {}
    for number, value in _pb_fields(envelope.get(2, b"")):
        if number == 1:
            obj["metadata"] = _pb_object_meta(value)
        elif kind == "Namespace" and number == 2:
            finalizers = [v.decode() for n, v in _pb_fields(value) if n == 1]
            obj["spec"] = {"finalizers": finalizers} if finalizers else {}
        elif kind == "Secret" and number == 3 and value:
            obj["type"] = value.decode()
        elif (kind, number) in (("ConfigMap", 4), ("Secret", 5)):
            obj["immutable"] = bool(value)
        elif isinstance(value, bytes):
            maps.setdefault(number, []).append(value)
    names = {"ConfigMap": {2: "data", 3: "binaryData"}, "Secret": {2: "data", 4: "stringData"}}.get(kind, {})
    for number, entries in maps.items():
        if number in names:
            binary = (kind, number) in (("ConfigMap", 3), ("Secret", 2))
            obj[names[number]] = _pb_map(entries, binary=binary)
    return obj


# --------------------------------------------------------------------------------------------
# Time, names, printing.
# --------------------------------------------------------------------------------------------


#: Metadata fields whose change can give the garbage collector or a cleanup controller work.
_GC_FIELDS: Final = ("ownerReferences", "finalizers", "deletionTimestamp")


def _now(after_seconds: int = 0) -> str:
    """RFC 3339 with a ``Z``, at second precision, like ``metav1.Time`` (``after_seconds`` from now)."""
    at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=after_seconds)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _human_age(timestamp: Any) -> str:
    try:
        then = datetime.datetime.strptime(str(timestamp), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "<unknown>"
    seconds = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    return f"{hours}h" if hours < 48 else f"{hours // 24}d"


def _jsonpath(obj: Any, expression: str) -> Any:
    """The JSONPath subset of ``additionalPrinterColumns``: ``.a.b``, ``[0]``, ``[?(@.k=="v")]``."""
    token = re.compile(
        r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*[\"']([^\"']*)[\"']\)\]|\[[\"']([^\"']+)[\"']\]"
    )
    node: Any = obj
    rest = expression.strip().strip("{}").removeprefix("$")
    position = 0
    while position < len(rest) and node is not None:
        match = token.match(rest, position)
        if not match:
            return None
        position = match.end()
        if match[1] is not None or match[5] is not None:
            key = match[1] if match[1] is not None else match[5]
            node = node.get(key) if isinstance(node, dict) else None
        elif match[2] is not None:
            index = int(match[2])
            node = node[index] if isinstance(node, list) and index < len(node) else None
        else:
            node = next(
                (item for item in node or [] if isinstance(item, dict) and _field_value(item, match[3]) == match[4]),
                None,
            )
    return node


# --------------------------------------------------------------------------------------------
# The emulator.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str
    group: str
    plural: str
    namespace: str | None
    obj: Obj
    old: Obj | None


@dataclass
class _Selector:
    labels: list[LabelRequirement]
    fields: list[tuple[str, str, str]]

    def matches(self, obj: Mapping[str, Any]) -> bool:
        if not match_label_selector(self.labels, obj.get("metadata", {}).get("labels")):
            return False
        return all((_field_value(obj, path) == value) == (op == "=") for path, op, value in self.fields)


@attrs.define(kw_only=True)
class KubernetesApiEmulator(kmock.KubernetesEmulator):
    """kmock's ``KubernetesEmulator`` with the semantics of a real API server (see module docs).

    Knobs: ``require_namespaces`` (creating in a missing namespace is a 404, as for real),
    ``strict_field_selectors`` (only the fields the real server indexes are selectable),
    ``graceful_pod_deletion`` (a scheduled pod stays Terminating until deleted with
    ``gracePeriodSeconds=0``, as a kubelet does), ``max_events`` (watch history kept before
    a watch from an older resourceVersion gets ``410 Gone``).
    """

    require_namespaces: bool = True
    strict_field_selectors: bool = True
    graceful_pod_deletion: bool = False
    max_events: int = 100_000
    server_version: str = "v1.34.0"

    _defs: dict[tuple[str, str, str], ResourceDef] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _log: list[_Event] = attrs.field(factory=list, init=False)
    _log_rvs: list[int] = attrs.field(factory=list, init=False)
    _compacted_rv: int = attrs.field(default=0, init=False)
    _changed: asyncio.Future[None] | None = attrs.field(default=None, init=False)
    _epoch: int = attrs.field(default=0, init=False)
    _watchers: int = attrs.field(default=0, init=False)

    _BUILTINS: ClassVar[list[ResourceDef] | None] = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # The stock fallback reactions (kmock's simplistic API) are replaced by _serve_api().
        # User reactions added later (emu['get /x'] << ...) still take precedence over it.
        self._payloads.clear()
        self._load_builtins()

    # ---- kmock integration ------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve one HTTP request; like kmock's, but with a URL parser that knows namespaces."""
        await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            if self.limit is not None and len(self._requests) >= self.limit:
                raise apps.KMockError("Too many requests have been served so far.")
            request = await self._parse_request(raw_request, request_id=len(self._requests))
            self._requests.append(request)
            try:
                return await self._handle(request)
            except rendering.StreamingError as exc:  # a user reaction failed mid-stream
                raw_response = exc.args[0]
                raise exc.__cause__ or exc from None
        except Exception as exc:
            if not self._errors:
                raise
            self._errors[-1].append(exc)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _parse_request(self, raw: aiohttp.web.BaseRequest, *, request_id: int) -> rendering.Request:
        body = await raw.read()
        data: Any = None
        if body:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
        api_path = parse_api_path(raw.path)
        params = dict(raw.query)
        action: enums.action | None = None
        if api_path is not None:
            method = raw.method.upper()
            if method == "GET":
                is_watch = params.get("watch") in ("true", "1")
                action = enums.action.WATCH if is_watch else enums.action.FETCH if api_path.name else enums.action.LIST
            elif method == "POST" and not api_path.name:
                action = enums.action.CREATE
            elif method in ("PATCH", "PUT") and api_path.name:
                action = enums.action.UPDATE
            elif method == "DELETE":
                action = enums.action.DELETE
        return rendering.Request(
            id=request_id,
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=params,
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=body.decode("utf-8", "replace"),
            data=data,
            action=action,
            resource=None if api_path is None else kmock.resource(api_path.group, api_path.version, api_path.plural),
            namespace=None if api_path is None else api_path.namespace,
            name=None if api_path is None else api_path.name,
            subresource=None if api_path is None else api_path.subresource,
        )

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if self._payloads:  # user-defined reactions first, as in kmock
            with contextlib.suppress(NotImplementedError):
                return await apps.RawHandler._handle(self, request)
        return await self._serve_api(request)

    # ---- registry ----------------------------------------------------------------------------

    def _load_builtins(self) -> None:
        if KubernetesApiEmulator._BUILTINS is None:
            KubernetesApiEmulator._BUILTINS = _bundled_resources()
        self._defs.clear()
        self.resources.clear()
        for rd in KubernetesApiEmulator._BUILTINS:
            self.register_resource(copy.copy(rd))

    def register_resource(self, rd: ResourceDef) -> None:
        """Serve (and advertise in discovery) a resource; also mirrored into ``emu.resources``."""
        self._defs[rd.group, rd.version, rd.plural] = rd
        self.resources[kmock.resource(rd.group, rd.version, rd.plural)] = kmock.ResourceInfo(
            namespaced=rd.namespaced,
            kind=rd.kind,
            singular=rd.singular,
            verbs=set(rd.verbs),
            shortnames=set(rd.short_names),
            categories=set(rd.categories),
            subresources=set(rd.subresources),
        )

    def _unregister_crd(self, crd_name: str) -> None:
        for key, rd in list(self._defs.items()):
            if rd.crd_name == crd_name:
                del self._defs[key]
                with contextlib.suppress(KeyError):
                    del self.resources[kmock.resource(rd.group, rd.version, rd.plural)]

    def _register_crd(self, crd: Obj) -> None:
        self._unregister_crd(crd["metadata"]["name"])
        for rd in _crd_resource_defs(crd):
            self.register_resource(rd)

    def resource_for(self, api_version: str, kind_or_plural: str) -> ResourceDef:
        """Find a served resource by ``apiVersion`` and kind (``ConfigMap``) or plural (``configmaps``)."""
        group, _, version = api_version.rpartition("/")
        for rd in self._defs.values():
            if rd.group == group and rd.version == version and kind_or_plural in (rd.kind, rd.plural):
                return rd
        raise KeyError(f"no resource {kind_or_plural!r} is served in {api_version!r}")

    # ---- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget all objects, CRDs, watch history, requests and user reactions; end open watches.

        The resourceVersion counter keeps growing (as on a real server, RVs never go back).
        """
        self.close_watches()
        self._objects.clear()
        self._log.clear()
        self._log_rvs.clear()
        self._compacted_rv = self._rv
        self._payloads.clear()
        self._requests.clear()
        for errors in self._errors:
            errors.clear()
        self._load_builtins()
        for name in DEFAULT_NAMESPACES:
            self.create_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def close_watches(self) -> None:
        """End every open watch stream (a new epoch), e.g. before a reset or shutdown."""
        self._epoch += 1
        self._notify()

    def compact(self) -> None:
        """Drop the watch history, as etcd compaction does: older resourceVersions get ``410 Gone``."""
        self._log.clear()
        self._log_rvs.clear()
        self._compacted_rv = self._rv

    @property
    def resource_version(self) -> int:
        """The current (latest) resourceVersion of the whole store."""
        return self._rv

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _notify(self) -> None:
        future, self._changed = self._changed, None
        if future is not None and not future.done():
            future.set_result(None)

    async def _wait_for_change(self, timeout: float) -> None:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._changed), timeout)

    def _emit(self, rd: ResourceDef, event_type: str, obj: Obj, old: Obj | None) -> None:
        event = _Event(
            rv=int(obj["metadata"]["resourceVersion"]),
            type=event_type,
            group=rd.group,
            plural=rd.plural,
            namespace=obj["metadata"].get("namespace"),
            obj=copy.deepcopy(obj),
            old=copy.deepcopy(old) if old is not None else None,
        )
        self._log.append(event)
        self._log_rvs.append(event.rv)
        if len(self._log) > self.max_events:
            drop = len(self._log) - self.max_events
            self._compacted_rv = self._log_rvs[drop - 1]
            del self._log[:drop]
            del self._log_rvs[:drop]
        self._notify()

    def _key(self, rd: ResourceDef, namespace: str | None, name: str) -> tuple[kmock.resource, str | None, str]:
        return (rd.storage, namespace if rd.namespaced else None, name)

    def _load(self, rd: ResourceDef, namespace: str | None, name: str) -> Obj | None:
        key = self._key(rd, namespace, name)
        if key not in self._objects:
            return None
        stored = self._objects[key]
        if stored.deleted:
            return None
        return copy.deepcopy(stored.last.raw)

    def _store(self, rd: ResourceDef, obj: Obj) -> None:
        key = self._key(rd, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in self._objects:
            self._objects[key].history.append(copy.deepcopy(obj))
        else:
            self._objects[key] = copy.deepcopy(obj)

    def _forget(self, rd: ResourceDef, obj: Obj) -> None:
        self._objects[self._key(rd, obj["metadata"].get("namespace"), obj["metadata"]["name"])].delete()

    def _storage_defs(self) -> dict[tuple[str, str], ResourceDef]:
        """One resource per storage (group, plural): the storage version's definition."""
        result: dict[tuple[str, str], ResourceDef] = {}
        for rd in self._defs.values():
            if rd.version == rd.storage_version or (rd.group, rd.plural) not in result:
                result[rd.group, rd.plural] = rd
        return result

    def _live(self, rd: ResourceDef, namespace: str | None = None) -> list[Obj]:
        """Live objects of a resource (all namespaces if ``namespace`` is None), sorted like etcd keys.

        The dicts are the stored ones (not copies): callers copy before changing anything.
        """
        storage = (rd.group, rd.storage_version, rd.plural)
        result = [
            stored.last.raw
            for (resource, ns, _), stored in self._objects.items()
            if (resource.group, resource.version, resource.plural) == storage
            and not stored.deleted
            and (namespace is None or ns == namespace)
        ]
        result.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return result

    def _all_live(self) -> Iterator[tuple[ResourceDef, Obj]]:
        """Every live object with its storage resource (stored dicts, not copies)."""
        defs = self._storage_defs()
        for (resource, _, _), stored in self._objects.items():
            rd = defs.get((resource.group or "", resource.plural or ""))
            if rd is not None and not stored.deleted:
                yield rd, stored.last.raw

    def _present(self, rd: ResourceDef, obj: Obj) -> Obj:
        """An object as served by a given version (conversion strategy None: only apiVersion changes)."""
        result = copy.deepcopy(obj)
        result["apiVersion"] = rd.api_version
        result["kind"] = rd.kind
        return result

    # ---- HTTP routing ------------------------------------------------------------------------

    async def _serve_api(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        try:
            return await self._route(request)
        except ApiError as exc:
            return self._json(exc.status(), exc.code)

    @staticmethod
    def _json(body: Any, status: int = 200, warnings: Iterable[str] = ()) -> aiohttp.web.Response:
        headers: CIMultiDict[str] = CIMultiDict()
        for warning in warnings:
            headers.add("Warning", f"299 - {json.dumps(warning)}")
        return aiohttp.web.json_response(body, status=status, headers=headers)

    async def _route(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        path = "/" + request.url.path.strip("/")
        method = str(request.method.value).upper()
        if method == "GET":
            discovery = self._discovery(path, request)
            if discovery is not None:
                return discovery
        api_path = parse_api_path(path)
        if api_path is None:
            raise _no_route()
        rd = self._defs.get((api_path.group, api_path.version, api_path.plural))
        if rd is None or (api_path.namespace is not None and not rd.namespaced):
            raise _no_route()
        params = dict(request.params)
        namespace = api_path.namespace
        name = api_path.name
        sub = api_path.subresource
        if sub == "binding" and rd.group == "" and rd.plural == "pods" and name is not None:
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on pods/binding")
            return self._json(self._bind_pod(rd, namespace, name, self._body(request)), 201)
        if sub is not None and (sub != "status" or not rd.has_status):
            raise _no_route()  # only /status and pods/binding are served (no scale, log, exec, eviction)
        match method, name:
            case "GET", _ if params.get("watch") in ("true", "1"):
                return await self._serve_watch_stream(request, rd, namespace, name, params)
            case "GET", None:
                return self._json(self._list_response(rd, namespace, params, request.headers.get("Accept", "")))
            case "GET", str():
                obj = self._get_or_404(rd, namespace, name)
                return self._json(self._maybe_table(rd, [obj], request.headers.get("Accept", "")))
            case "POST", None:
                body = self._body(request)
                created, warnings = self._create(rd, namespace, body, params)
                return self._json(self._present(rd, created), 201, warnings)
            case "PUT", str():
                body = self._body(request)
                updated, warnings = self._replace(rd, namespace, name, body, subresource=sub, params=params)
                return self._json(self._present(rd, updated), 200, warnings)
            case "PATCH", str():
                content_type = request.headers.get("Content-Type", "")
                patched, warnings, was_created = self._patch(
                    rd, namespace, name, subresource=sub, content_type=content_type, body=request.body, params=params
                )
                return self._json(self._present(rd, patched), 201 if was_created else 200, warnings)
            case "DELETE", str():
                return self._json(self._delete_request(rd, namespace, name, self._delete_options(request)))
            case "DELETE", None:
                return self._json(self._delete_collection(rd, namespace, params, self._delete_options(request)))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _bind_pod(self, rd: ResourceDef, namespace: str | None, name: str, body: Obj) -> Obj:
        """``POST pods/<name>/binding``: what a scheduler does to put a pod on a node. Sets
        ``spec.nodeName`` (otherwise immutable) and ``PodScheduled=True``, once."""
        current = self._get_or_404(rd, namespace, name)
        target = body.get("target") or {}
        node = target.get("name")
        if not isinstance(node, str) or not node or target.get("kind", "Node") != "Node":
            raise _bad_request("a Binding needs target.kind Node and target.name")
        uid = (body.get("metadata") or {}).get("uid")
        if uid and uid != current["metadata"].get("uid"):
            raise _conflict(
                rd,
                name,
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                f"{current['metadata'].get('uid')}",
            )
        if current["metadata"].get("deletionTimestamp"):
            raise _conflict(rd, name, "pod is being deleted, cannot be assigned to a host")
        bound = (current.get("spec") or {}).get("nodeName")
        if bound:
            raise _conflict(rd, name, f'pod {name} is already assigned to node "{bound}"')
        new = copy.deepcopy(current)
        new.setdefault("spec", {})["nodeName"] = node
        status = new.setdefault("status", {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append(
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": _now()}
        )
        status["conditions"] = conditions
        self._commit_update(rd, current, new)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    @staticmethod
    def _body(request: rendering.Request) -> Obj:
        content_type = request.headers.get("Content-Type", "application/json").split(";", maxsplit=1)[0].strip()
        if "protobuf" in content_type:
            return _decode_protobuf(request.body)
        if "cbor" in content_type:
            raise _unsupported_media_type(content_type)
        try:
            data = yaml.safe_load(request.body) if "yaml" in content_type else json.loads(request.body or b"null")
        except (ValueError, yaml.YAMLError) as exc:
            raise _bad_request(f"the request body could not be decoded: {exc}") from exc
        if not isinstance(data, dict):
            raise _bad_request("the request body must be a JSON object")
        return data

    @staticmethod
    def _delete_options(request: rendering.Request) -> Obj:
        options: Obj = {}
        if request.body.strip():
            try:
                loaded = json.loads(request.body)
            except ValueError as exc:
                raise _bad_request(f"the DeleteOptions body could not be decoded: {exc}") from exc
            if isinstance(loaded, dict):
                options.update(loaded)
        for key in ("propagationPolicy", "gracePeriodSeconds", "orphanDependents", "dryRun"):
            if key in request.params:
                value: Any = request.params[key]
                if key == "gracePeriodSeconds":
                    value = int(value)
                elif key == "orphanDependents":
                    value = value == "true"
                options[key] = value
        return options

    def _get_or_404(self, rd: ResourceDef, namespace: str | None, name: str) -> Obj:
        obj = self._load(rd, namespace, name)
        if obj is None:
            raise _not_found(rd, name)
        return self._present(rd, obj)

    # ---- discovery ---------------------------------------------------------------------------

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = {}
        for rd in self._defs.values():
            groups.setdefault(rd.group, set()).add(rd.version)
        return {group: sorted(versions, key=_version_priority) for group, versions in groups.items()}

    def _api_group(self, group: str, versions: list[str]) -> Obj:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def _resource_list(self, group: str, version: str) -> Obj:
        resources: list[Obj] = []
        defs = sorted(
            (rd for rd in self._defs.values() if rd.group == group and rd.version == version), key=lambda r: r.plural
        )
        for rd in defs:
            entry: Obj = {
                "name": rd.plural,
                "singularName": rd.singular,
                "namespaced": rd.namespaced,
                "kind": rd.kind,
                "verbs": list(rd.verbs),
            }
            if rd.short_names:
                entry["shortNames"] = list(rd.short_names)
            if rd.categories:
                entry["categories"] = list(rd.categories)
            resources.append(entry)
            resources.extend(
                {
                    "name": f"{rd.plural}/{sub}",
                    "singularName": "",
                    "namespaced": rd.namespaced,
                    "kind": "Scale" if sub == "scale" else rd.kind,
                    "verbs": list(SUBRESOURCE_VERBS),
                }
                for sub in sorted(rd.subresources)
            )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _discovery(self, path: str, request: rendering.Request) -> aiohttp.web.StreamResponse | None:
        groups = self._groups()
        if path == "/":
            paths = {"/api", "/api/v1", "/apis", "/version", "/healthz", "/livez", "/readyz", "/openapi/v2"}
            for group, versions in groups.items():
                if group:
                    paths.add(f"/apis/{group}")
                    paths.update(f"/apis/{group}/{v}" for v in versions)
            return self._json({"paths": sorted(paths)})
        if path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok")
        if path == "/version":
            major, minor = self.server_version.lstrip("v").split(".")[:2]
            return self._json(
                {
                    "major": major,
                    "minor": minor,
                    "gitVersion": self.server_version,
                    "gitCommit": "0000000000000000000000000000000000000000",
                    "gitTreeState": "clean",
                    "buildDate": "2025-01-01T00:00:00Z",
                    "goVersion": "go1.24",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                }
            )
        if path == "/api":
            host = request.url.host or "127.0.0.1"
            address = f"{host}:{request.url.port}" if request.url.port else host
            return self._json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
                }
            )
        if path == "/apis":
            named = sorted((g for g in groups if g), key=lambda g: (g.endswith(".k8s.io") is False, g))
            return self._json(
                {"kind": "APIGroupList", "apiVersion": "v1", "groups": [self._api_group(g, groups[g]) for g in named]}
            )
        if match := re.fullmatch(r"/api/([^/]+)", path):
            if match[1] not in groups.get("", []):
                raise _no_route()
            return self._json(self._resource_list("", match[1]))
        if match := re.fullmatch(r"/apis/([^/]+)", path):
            if not match[1] or match[1] not in groups:
                raise _no_route()
            return self._json({"kind": "APIGroup", "apiVersion": "v1", **self._api_group(match[1], groups[match[1]])})
        if match := re.fullmatch(r"/apis/([^/]+)/([^/]+)", path):
            if match[2] not in groups.get(match[1], []):
                raise _no_route()
            return self._json(self._resource_list(match[1], match[2]))
        if path == "/openapi/v3":
            gvs = [f"api/{v}" if not g else f"apis/{g}/{v}" for g, versions in groups.items() for v in versions]
            return self._json({"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={self._rv}"} for gv in gvs}})
        if match := re.fullmatch(r"/openapi/v3/(?:api/([^/]+)|apis/([^/]+)/([^/]+))", path):
            group, version = ("", match[1]) if match[1] else (match[2], match[3])
            defs = [rd for rd in self._defs.values() if rd.group == group and rd.version == version]
            if not defs:
                raise _no_route()
            return self._json(_openapi_v3_document(defs, self.server_version))
        if path.startswith("/openapi/"):
            raise _no_route()  # no OpenAPI v2, no schemas: see tests/README.md
        return None

    # ---- reading -----------------------------------------------------------------------------

    def _selector(self, rd: ResourceDef, params: Mapping[str, str], name: str | None = None) -> _Selector:
        try:
            labels = parse_label_selector(params.get("labelSelector", ""))
            fields = parse_field_selector(params.get("fieldSelector", ""))
        except ValueError as exc:
            raise _bad_request(str(exc)) from exc
        if self.strict_field_selectors:
            allowed = (
                {"metadata.name", "metadata.namespace"}
                | _FIELD_SELECTABLE.get((rd.group, rd.plural), frozenset())
                | rd.selectable_fields
            )
            for path, _, _ in fields:
                if path not in allowed:
                    raise _bad_request(f"field label not supported: {path}")
        if name is not None:
            fields.append(("metadata.name", "=", name))
        return _Selector(labels, fields)

    def _select(self, rd: ResourceDef, namespace: str | None, selector: _Selector) -> list[Obj]:
        return [obj for obj in self._live(rd, namespace) if selector.matches(obj)]

    def _list_response(self, rd: ResourceDef, namespace: str | None, params: Mapping[str, str], accept: str) -> Obj:
        objs = self._select(rd, namespace, self._selector(rd, params))
        start_after: tuple[str, str] | None = None
        if params.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(params["continue"].encode()))
                start_after = (str(token["ns"]), str(token["name"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise _bad_request(f"invalid continue token: {exc}") from exc
        if start_after is not None:
            objs = [o for o in objs if (o["metadata"].get("namespace") or "", o["metadata"]["name"]) > start_after]
        metadata: Obj = {"resourceVersion": str(self._rv)}
        limit = int(params.get("limit") or 0)
        if limit > 0 and len(objs) > limit:
            last = objs[limit - 1]["metadata"]
            token_data = {"ns": last.get("namespace") or "", "name": last["name"], "rv": self._rv}
            metadata["continue"] = base64.urlsafe_b64encode(json.dumps(token_data).encode()).decode()
            metadata["remainingItemCount"] = len(objs) - limit
            objs = objs[:limit]
        items = [self._present(rd, obj) for obj in objs]
        if "as=Table" in accept:
            return self._table(rd, items, metadata)
        return {"apiVersion": rd.api_version, "kind": rd.list_kind, "metadata": metadata, "items": items}

    def _maybe_table(self, rd: ResourceDef, objs: list[Obj], accept: str) -> Obj:
        if "as=Table" in accept:
            return self._table(rd, objs, {"resourceVersion": objs[0]["metadata"]["resourceVersion"]})
        return objs[0]

    def _table(self, rd: ResourceDef, objs: list[Obj], metadata: Obj) -> Obj:
        """Server-side printing for ``kubectl get``: Name, then a CRD's printer columns, else Age.

        A few built-ins get a column more (pods: Status, configmaps/secrets: Data).
        """
        columns: list[Obj] = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
        getters: list[Callable[[Obj], Any]] = [lambda o: o["metadata"]["name"]]
        printer_columns = rd.printer_columns if rd.crd_name else []
        if rd.group == "" and rd.plural == "pods":
            printer_columns = [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}]
        for column in printer_columns:
            columns.append(
                {
                    "name": column["name"],
                    "type": column.get("type", "string"),
                    "format": column.get("format", ""),
                    "description": column.get("description", ""),
                    "priority": column.get("priority", 0),
                }
            )
            getters.append(self._column_getter(column))
        if rd.group == "" and rd.plural in ("configmaps", "secrets"):
            columns.append({"name": "Data", "type": "integer", "format": "", "description": "", "priority": 0})
            getters.append(lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {}))
        if not (rd.crd_name and printer_columns):  # CRDs with printer columns show only those
            columns.append({"name": "Age", "type": "string", "format": "", "description": "", "priority": 0})
            getters.append(lambda o: _human_age(o["metadata"].get("creationTimestamp")))
        rows = [
            {
                "cells": [getter(obj) for getter in getters],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
            for obj in objs
        ]
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata,
            "columnDefinitions": columns,
            "rows": rows,
        }

    @staticmethod
    def _column_getter(column: Mapping[str, Any]) -> Callable[[Obj], Any]:
        def getter(obj: Obj) -> Any:
            value = _jsonpath(obj, str(column.get("jsonPath", "")))
            if value is not None and column.get("type") == "date":
                return _human_age(value)
            return value

        return getter

    async def _serve_watch_stream(
        self,
        request: rendering.Request,
        rd: ResourceDef,
        namespace: str | None,
        name: str | None,
        params: Mapping[str, str],
    ) -> aiohttp.web.StreamResponse:
        """A watch: replay from ``resourceVersion`` (or synthetic ADDED for the current state), then live."""
        selector = self._selector(rd, params, name)
        since = params.get("resourceVersion") or ""
        initial = params.get("sendInitialEvents") == "true"
        try:
            cursor = int(since) if since else 0
            timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        except ValueError as exc:
            raise _bad_request(f"invalid watch parameter: {exc}") from exc
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(raw)
        except ConnectionError:
            return response  # the client went away before the stream began (e.g. a SIGKILLed operator)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        epoch = self._epoch
        self._watchers += 1
        try:
            if initial or cursor == 0:
                snapshot = self._select(rd, namespace, selector)
                cursor = self._rv
                for obj in snapshot:
                    await self._write_event(response, "ADDED", self._present(rd, obj))
                if initial:
                    bookmark = {
                        "apiVersion": rd.api_version,
                        "kind": rd.kind,
                        "metadata": {"resourceVersion": str(cursor), "annotations": {INITIAL_EVENTS_END: "true"}},
                    }
                    await self._write_event(response, "BOOKMARK", bookmark)
            while epoch == self._epoch:
                if cursor < self._compacted_rv:
                    gone = ApiError(410, "Expired", f"too old resource version: {cursor} ({self._compacted_rv})")
                    await self._write_event(response, "ERROR", gone.status())
                    break
                position = bisect.bisect_right(self._log_rvs, cursor)
                for event in self._log[position:]:
                    cursor = event.rv
                    event_type = self._watch_event_type(event, rd, namespace, selector)
                    if event_type is not None:
                        await self._write_event(response, event_type, self._present(rd, event.obj))
                if raw.transport is None or raw.transport.is_closing():
                    break
                wait = 1.0 if deadline is None else min(1.0, deadline - loop.time())
                if wait <= 0:
                    break
                if position == len(self._log) or self._log_rvs[-1] <= cursor:
                    await self._wait_for_change(wait)
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        except ConnectionError:
            pass
        finally:
            self._watchers -= 1
        return response

    @staticmethod
    async def _write_event(response: aiohttp.web.StreamResponse, event_type: str, obj: Obj) -> None:
        await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

    @staticmethod
    def _watch_event_type(event: _Event, rd: ResourceDef, namespace: str | None, selector: _Selector) -> str | None:
        """The event a selective watch sees: objects entering the selection are ADDED, leaving ones DELETED."""
        if (event.group, event.plural) != (rd.group, rd.plural):
            return None
        if namespace is not None and event.namespace != namespace:
            return None
        now = selector.matches(event.obj)
        if event.type != "MODIFIED":
            return event.type if now else None
        before = event.old is not None and selector.matches(event.old)
        if now:
            return "MODIFIED" if before else "ADDED"
        return "DELETED" if before else None

    # ---- writing: create ---------------------------------------------------------------------

    def _check_type_meta(self, rd: ResourceDef, body: Mapping[str, Any]) -> None:
        api_version = body.get("apiVersion")
        kind = body.get("kind")
        if api_version and api_version != rd.api_version:
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match "
                f"the expected API version ({rd.api_version})"
            )
        if kind and kind != rd.kind:
            raise _bad_request(f"the kind in the data ({kind}) does not match the expected kind ({rd.kind})")
        if not isinstance(body.get("metadata", {}), dict):
            raise _bad_request("metadata must be an object")

    def _check_namespace(self, rd: ResourceDef, namespace: str | None, name: str) -> None:
        if not rd.namespaced or not self.require_namespaces:
            return
        ns_def = self._defs["", "v1", "namespaces"]
        ns = self._load(ns_def, None, namespace or "")
        if ns is None:
            raise _not_found(ns_def, namespace or "")
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f'{rd.group_resource} "{name}" is forbidden: unable to create new content in namespace '
                f"{namespace} because it is being terminated",
                _details(rd, name),
            )

    def _generate_name(self, rd: ResourceDef, namespace: str | None, prefix: str) -> str:
        for _ in range(100):
            name = prefix + "".join(random.choices(_NAME_SUFFIX_ALPHABET, k=5))
            if self._load(rd, namespace, name) is None:
                return name
        raise ApiError(500, "InternalError", "could not generate a unique name")

    @staticmethod
    def _name_errors(rd: ResourceDef, name: str) -> list[cv.FieldError]:
        if rd.group == "" and rd.plural == "namespaces":
            ok, rule = len(name) <= 63 and _DNS_LABEL.fullmatch(name) is not None, "RFC 1123 label"
        else:
            ok, rule = len(name) <= 253 and _DNS_SUBDOMAIN.fullmatch(name) is not None, "RFC 1123 subdomain"
        if ok:
            return []
        return [
            cv.FieldError(
                "metadata.name",
                cv.REASON_INVALID,
                f"Invalid value: {json.dumps(name)}: a lowercase {rule} must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character",
            )
        ]

    @staticmethod
    def _metadata_errors(meta: Mapping[str, Any]) -> list[cv.FieldError]:
        """ObjectMeta validation: label/annotation syntax, owner references, finalizers."""
        errors: list[cv.FieldError] = []

        def bad_key(key: str) -> bool:
            prefix, _, rest = key.rpartition("/")
            if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
                return True
            return not rest or len(rest) > 63 or not _LABEL_NAME.fullmatch(rest)

        for key, value in (meta.get("labels") or {}).items():
            if bad_key(key):
                errors.append(
                    cv.FieldError(
                        "metadata.labels",
                        cv.REASON_INVALID,
                        f"Invalid value: {json.dumps(key)}: name part must consist of alphanumeric characters, "
                        "'-', '_' or '.', and must start and end with an alphanumeric character",
                    )
                )
            if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
                errors.append(
                    cv.FieldError(
                        "metadata.labels",
                        cv.REASON_INVALID,
                        f"Invalid value: {json.dumps(value)}: a valid label must be an empty string or consist of "
                        "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric "
                        "character (at most 63 characters)",
                    )
                )
        annotations = meta.get("annotations") or {}
        for key in annotations:
            if bad_key(key):
                errors.append(
                    cv.FieldError(
                        "metadata.annotations",
                        cv.REASON_INVALID,
                        f"Invalid value: {json.dumps(key)}: name part must consist of alphanumeric characters, "
                        "'-', '_' or '.', and must start and end with an alphanumeric character",
                    )
                )
        if sum(len(k) + len(v) for k, v in annotations.items()) > 256 * 1024:
            errors.append(
                cv.FieldError("metadata.annotations", cv.REASON_TOO_LONG, "Too long: must have at most 262144 bytes")
            )
        controllers = 0
        for i, ref in enumerate(meta.get("ownerReferences") or []):
            for key in ("apiVersion", "kind", "name", "uid"):
                if not ref.get(key):
                    errors.append(
                        cv.FieldError(f"metadata.ownerReferences[{i}].{key}", cv.REASON_REQUIRED, "Required value")
                    )
            controllers += 1 if ref.get("controller") else 0
        if controllers > 1:
            errors.append(
                cv.FieldError(
                    "metadata.ownerReferences",
                    cv.REASON_INVALID,
                    'Invalid value: "array": Only one reference can have Controller set to true',
                )
            )
        return errors

    @staticmethod
    def _check_metadata_types(meta: Mapping[str, Any]) -> None:
        """What the real server rejects while decoding (400), before validation."""
        for key in ("labels", "annotations"):
            value = meta.get(key)
            if value is None:
                continue
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise _bad_request(
                    f"json: cannot unmarshal into Go struct field ObjectMeta.metadata.{key} of type string"
                )
        for key in ("finalizers", "ownerReferences"):
            value = meta.get(key)
            if value is not None and not isinstance(value, list):
                raise _bad_request(f"json: cannot unmarshal into Go struct field ObjectMeta.metadata.{key}")
        if not all(isinstance(f, str) for f in meta.get("finalizers") or []):
            raise _bad_request(
                "json: cannot unmarshal into Go struct field ObjectMeta.metadata.finalizers of type string"
            )

    def _admit(self, rd: ResourceDef, obj: Obj, old: Obj | None, params: Mapping[str, str]) -> tuple[Obj, list[str]]:
        """Decode-time pruning (fieldValidation), defaulting and validation, in the server's order."""
        mode = params.get("fieldValidation") or "Warn"
        if mode not in ("Ignore", "Warn", "Strict"):
            raise _bad_request(f"fieldValidation must be one of Ignore, Warn, Strict; got {mode!r}")
        meta = obj["metadata"]
        self._check_metadata_types(meta)
        unknown = [f"metadata.{key}" for key in sorted(meta) if key not in _OBJECT_META_KEYS]
        for key in unknown:
            meta.pop(key.split(".", 1)[1])
        if rd.schema is not None:
            obj, pruned = cv.prune_unknown_fields(rd.schema, obj)
            unknown.extend(pruned)
        if unknown and mode == "Strict":
            fields = ", ".join(f'unknown field "{path}"' for path in unknown)
            raise _bad_request(
                f'{rd.kind} in version "{rd.version}" cannot be handled as a {rd.kind}: strict decoding error: {fields}'
            )
        warnings = [f'unknown field "{path}"' for path in unknown] if mode == "Warn" else []
        name = obj["metadata"]["name"]
        errors = self._metadata_errors(obj["metadata"])
        if rd.schema is not None:
            obj = cv.apply_defaults(rd.schema, obj)
            schema_errors = cv.validate_custom_object(rd.schema, obj, old)
            errors.extend(e for e in schema_errors if e.reason != cv.REASON_UNKNOWN_FIELD)
        if rd.group == "apiextensions.k8s.io" and rd.plural == "customresourcedefinitions":
            errors.extend(_validate_crd(obj))
        if errors:
            raise _invalid(rd, name, errors)
        return obj, warnings

    def _create(
        self, rd: ResourceDef, namespace: str | None, body: Obj, params: Mapping[str, str]
    ) -> tuple[Obj, list[str]]:
        """POST: fill system metadata, validate, store, emit ADDED."""
        if "create" not in rd.verbs:
            raise ApiError(405, "MethodNotAllowed", f"create is not supported on {rd.group_resource}")
        self._check_type_meta(rd, body)
        obj = copy.deepcopy(body)
        obj["apiVersion"] = rd.storage_api_version  # stored as the storage version; served as requested
        obj["kind"] = rd.kind
        meta: Obj = obj.setdefault("metadata", {})
        if rd.namespaced:
            if namespace is None:
                raise _no_route()
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise _bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = None
        if meta.get("resourceVersion"):
            raise _bad_request("resourceVersion should not be set on objects to be created")
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _invalid(
                    rd,
                    "",
                    [
                        cv.FieldError(
                            "metadata.name", cv.REASON_REQUIRED, "Required value: name or generateName is required"
                        )
                    ],
                )
            meta["name"] = self._generate_name(rd, namespace, str(meta["generateName"]))
        name = str(meta["name"])
        if errors := self._name_errors(rd, name):
            raise _invalid(rd, name, errors)
        self._check_namespace(rd, namespace, name)
        if self._load(rd, namespace, name) is not None:
            raise ApiError(409, "AlreadyExists", f'{rd.group_resource} "{name}" already exists', _details(rd, name))
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "managedFields"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        self._reset_status_on_create(rd, obj)
        obj, warnings = self._admit(rd, obj, None, params)
        is_crd = rd.group == "apiextensions.k8s.io" and rd.plural == "customresourcedefinitions"
        if is_crd:
            finalizers = obj["metadata"].setdefault("finalizers", [])
            if CRD_CLEANUP not in finalizers:
                finalizers.append(CRD_CLEANUP)
            obj["status"] = self._crd_status(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        if params.get("dryRun") == "All":
            return obj, warnings
        self._store(rd, obj)
        self._emit(rd, "ADDED", obj, None)
        if is_crd:
            self._register_crd(obj)
        if obj["metadata"].get("ownerReferences"):
            self._collect_garbage()  # an owner may already be gone; nothing else changes on a create
        return obj, warnings

    @staticmethod
    def _reset_status_on_create(rd: ResourceDef, obj: Obj) -> None:
        """Status written on create is dropped where a status subresource exists (set by controllers).

        Also the few built-in defaults done here: Namespace phase/finalizer, Pod phase, Secret type.
        """
        core = rd.group == ""
        if core and rd.plural == "namespaces":
            obj["status"] = {"phase": "Active"}
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        elif core and rd.plural == "pods":
            obj["status"] = {"phase": "Pending"}
        elif rd.has_status:
            obj.pop("status", None)
        if core and rd.plural == "secrets" and not obj.get("type"):
            obj["type"] = "Opaque"  # the one built-in default that clients commonly rely on

    @staticmethod
    def _crd_status(crd: Obj) -> Obj:
        """What the CRD controllers write: names accepted, Established (immediately, here)."""
        names = dict(crd["spec"]["names"])
        names.setdefault("singular", str(names["kind"]).lower())
        names.setdefault("listKind", f"{names['kind']}List")
        now = _now()
        return {
            "conditions": [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "message": "no conflicts found",
                    "lastTransitionTime": now,
                },
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted",
                    "lastTransitionTime": now,
                },
            ],
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in crd["spec"]["versions"] if v.get("storage")],
        }

    # ---- writing: update ---------------------------------------------------------------------

    def _replace(
        self,
        rd: ResourceDef,
        namespace: str | None,
        name: str,
        body: Obj,
        *,
        subresource: str | None,
        params: Mapping[str, str],
    ) -> tuple[Obj, list[str]]:
        """PUT: a full replacement, with ``metadata.resourceVersion`` as an optional precondition."""
        if "update" not in rd.verbs:
            raise ApiError(405, "MethodNotAllowed", f"update is not supported on {rd.group_resource}")
        current = self._load(rd, namespace, name)
        if current is None:
            raise _not_found(rd, name)
        return self._update(rd, current, body, subresource, params)

    def _patch(
        self,
        rd: ResourceDef,
        namespace: str | None,
        name: str,
        *,
        subresource: str | None,
        content_type: str,
        body: bytes,
        params: Mapping[str, str],
    ) -> tuple[Obj, list[str], bool]:
        """PATCH: JSON patch, merge patch, strategic merge patch (built-ins) or server-side apply."""
        media = content_type.split(";", maxsplit=1)[0].strip().lower()
        if media == "application/apply-patch+yaml":
            return self._server_side_apply(rd, namespace, name, subresource=subresource, body=body, params=params)
        current = self._load(rd, namespace, name)
        if current is None:
            raise _not_found(rd, name)
        try:
            patch = json.loads(body or b"null")
        except ValueError as exc:
            raise _bad_request(f"the patch could not be decoded: {exc}") from exc
        if media == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _bad_request("json patch must be a list of operations")
            try:
                patched = jsonpatch.apply_patch(self._present(rd, current), patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError) as exc:
                # The real server answers 422 for patches that do not apply, failed `test` ops included.
                raise ApiError(
                    422,
                    "Invalid",
                    f"the server rejected our request due to an error in our request: {exc}",
                    _details(rd, name),
                ) from exc
        elif media == "application/merge-patch+json":
            if not isinstance(patch, dict):
                raise _bad_request("merge patch must be a JSON object")
            patched = json_merge_patch(self._present(rd, current), patch)
        elif media == "application/strategic-merge-patch+json":
            if rd.crd_name is not None:
                raise _unsupported_media_type(media)  # the real server has no SMP for custom resources
            if not isinstance(patch, dict):
                raise _bad_request("strategic merge patch must be a JSON object")
            patched = strategic_merge_patch(self._present(rd, current), patch)
        else:
            raise _unsupported_media_type(media)
        if not isinstance(patched, dict):
            raise _bad_request("the patched object is not a JSON object")
        updated, warnings = self._update(rd, current, patched, subresource, params)
        return updated, warnings, False

    def _server_side_apply(
        self,
        rd: ResourceDef,
        namespace: str | None,
        name: str,
        *,
        subresource: str | None,
        body: bytes,
        params: Mapping[str, str],
    ) -> tuple[Obj, list[str], bool]:
        """A rough server-side apply: create if absent, else merge the applied config in (no field ownership)."""
        if not params.get("fieldManager"):
            raise _bad_request("PATCH /apply requires fieldManager to be set")
        try:
            applied = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            raise _bad_request(f"the applied configuration could not be decoded: {exc}") from exc
        if not isinstance(applied, dict):
            raise _bad_request("the applied configuration must be an object")
        applied_name = (applied.get("metadata") or {}).get("name")
        if applied_name != name:
            raise _bad_request(f"the name of the object ({applied_name}) does not match the name on the URL ({name})")
        current = self._load(rd, namespace, name)
        if current is None:
            created, warnings = self._create(rd, namespace, applied, params)
            return created, warnings, True
        merge = json_merge_patch if rd.crd_name is not None else strategic_merge_patch
        applied["metadata"].pop("resourceVersion", None)
        updated, warnings = self._update(rd, current, merge(self._present(rd, current), applied), subresource, params)
        return updated, warnings, False

    def _update(
        self, rd: ResourceDef, current: Obj, body: Obj, subresource: str | None, params: Mapping[str, str]
    ) -> tuple[Obj, list[str]]:
        """The update pipeline shared by PUT, PATCH and apply (main resource or ``/status``)."""
        self._check_type_meta(rd, body)
        new = copy.deepcopy(body)
        meta: Obj = new.setdefault("metadata", {})
        cur_meta = current["metadata"]
        name = cur_meta["name"]
        if meta.get("name") != name:
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        if rd.namespaced and meta.get("namespace") and meta["namespace"] != cur_meta.get("namespace"):
            raise _bad_request("the namespace of the provided object does not match the namespace sent on the request")
        if meta.get("resourceVersion") and meta["resourceVersion"] != cur_meta["resourceVersion"]:
            raise _stale(rd, name)
        if meta.get("uid") and meta["uid"] != cur_meta["uid"]:
            raise _conflict(
                rd,
                name,
                f"Precondition failed: UID in precondition: {cur_meta['uid']}, UID in object meta: {meta['uid']}",
            )
        if subresource == "status":
            status = new.get("status")
            new = copy.deepcopy(current)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
            meta = new["metadata"]
        elif rd.has_status:
            if "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            else:
                new.pop("status", None)
        new["apiVersion"] = rd.storage_api_version
        new["kind"] = rd.kind
        if rd.namespaced:
            meta["namespace"] = cur_meta.get("namespace")
        else:
            meta.pop("namespace", None)
        meta.pop("managedFields", None)
        for key in _SYSTEM_META_KEYS:
            if key in cur_meta:
                meta[key] = cur_meta[key]
            else:
                meta.pop(key, None)
        if cur_meta.get("deletionTimestamp"):
            added = [f for f in meta.get("finalizers") or [] if f not in (cur_meta.get("finalizers") or [])]
            if added:
                raise _invalid(
                    rd,
                    name,
                    [
                        cv.FieldError(
                            "metadata.finalizers",
                            cv.REASON_FORBIDDEN,
                            f"Forbidden: no new finalizers can be added if the object is being deleted, "
                            f"found new finalizers {json.dumps(added)}",
                        )
                    ],
                )
        self._check_immutable(rd, current, new)
        new, warnings = self._admit(rd, new, current, params)
        if params.get("dryRun") == "All":
            return new, warnings
        result = self._commit_update(rd, current, new)
        if any(current["metadata"].get(k) != result["metadata"].get(k) for k in _GC_FIELDS):
            # Only owners, finalizers and deletion steer the collectors: skipping them on status
            # and annotation writes keeps each write O(1) instead of a sweep of every object.
            self._collect_garbage()
        return result, warnings

    def _check_immutable(self, rd: ResourceDef, current: Obj, new: Obj) -> None:
        """Immutable fields of built-ins that controllers trip over: pod specs, immutable ConfigMaps/Secrets."""
        name = current["metadata"]["name"]
        if rd.group == "" and rd.plural == "pods":

            def mutable_part(spec: Any) -> Any:
                spec = copy.deepcopy(spec or {})
                for key in ("containers", "initContainers"):
                    for container in spec.get(key) or []:
                        container.pop("image", None)
                for key in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds", "schedulingGates"):
                    spec.pop(key, None)
                return spec

            if mutable_part(current.get("spec")) != mutable_part(new.get("spec")):
                raise _invalid(
                    rd,
                    name,
                    [
                        cv.FieldError(
                            "spec",
                            cv.REASON_FORBIDDEN,
                            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
                            "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` "
                            "(only additions to existing tolerations), `spec.terminationGracePeriodSeconds`",
                        )
                    ],
                )
        if rd.group == "" and rd.plural in ("configmaps", "secrets") and current.get("immutable"):
            for key in ("data", "binaryData", "stringData", "immutable"):
                if current.get(key) != new.get(key):
                    raise _invalid(
                        rd,
                        name,
                        [
                            cv.FieldError(
                                key, cv.REASON_FORBIDDEN, "Forbidden: field is immutable when `immutable` is set"
                            )
                        ],
                    )

    @staticmethod
    def _content(obj: Mapping[str, Any]) -> Obj:
        return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}

    def _commit_update(self, rd: ResourceDef, current: Obj, new: Obj) -> Obj:
        """Store an update: no-op detection, generation, resourceVersion, MODIFIED, finalization."""

        def comparable(obj: Obj) -> Obj:
            result = copy.deepcopy(obj)
            result["metadata"].pop("resourceVersion", None)
            return result

        if comparable(current) == comparable(new):
            return current  # a no-op: same resourceVersion, no event, as on a real server
        meta = new["metadata"]
        if "spec" in current or "spec" in new:
            changed = current.get("spec") != new.get("spec")
        else:
            changed = self._content(current) != self._content(new)
        if changed:
            meta["generation"] = int(meta.get("generation") or 0) + 1
        meta["resourceVersion"] = self._next_rv()
        self._store(rd, new)
        self._emit(rd, "MODIFIED", new, current)
        if rd.group == "apiextensions.k8s.io" and rd.plural == "customresourcedefinitions":
            self._register_crd(new)
        # Like the real store: an update that leaves a deleted object without finalizers removes it,
        # unless a grace period is pending (a kubelet deletes those pods with gracePeriodSeconds=0).
        if (
            meta.get("deletionTimestamp")
            and not meta.get("finalizers")
            and not meta.get("deletionGracePeriodSeconds")
            and not self._has_pending_cleanup(rd, new)
        ):
            self._finalize(rd, new)
        return new

    def _has_pending_cleanup(self, rd: ResourceDef, obj: Obj) -> bool:
        """Namespaces are removed by their controller only once empty (handled by the GC sweep)."""
        return rd.group == "" and rd.plural == "namespaces"

    def _finalize(self, rd: ResourceDef, obj: Obj) -> None:
        """Remove an object for good: a new resourceVersion and a DELETED event."""
        final = copy.deepcopy(obj)
        final["metadata"]["resourceVersion"] = self._next_rv()
        self._forget(rd, final)
        self._emit(rd, "DELETED", final, obj)
        if rd.group == "apiextensions.k8s.io" and rd.plural == "customresourcedefinitions":
            self._unregister_crd(final["metadata"]["name"])

    # ---- writing: delete ---------------------------------------------------------------------

    def _delete_request(self, rd: ResourceDef, namespace: str | None, name: str, options: Mapping[str, Any]) -> Obj:
        if "delete" not in rd.verbs:
            raise ApiError(405, "MethodNotAllowed", f"delete is not supported on {rd.group_resource}")
        current = self._load(rd, namespace, name)
        if current is None:
            raise _not_found(rd, name)
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != current["metadata"]["uid"]:
            raise _conflict(
                rd,
                name,
                f"Precondition failed: UID in precondition: {preconditions['uid']}, "
                f"UID in object meta: {current['metadata']['uid']}",
            )
        if (
            preconditions.get("resourceVersion")
            and preconditions["resourceVersion"] != current["metadata"]["resourceVersion"]
        ):
            raise _conflict(
                rd,
                name,
                f"Precondition failed: ResourceVersion in precondition: {preconditions['resourceVersion']}, "
                f"ResourceVersion in object meta: {current['metadata']['resourceVersion']}",
            )
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is not None:
            policy = "Orphan" if options["orphanDependents"] else "Background"
        policy = policy or "Background"
        if policy not in ("Foreground", "Background", "Orphan"):
            raise _bad_request(f"propagationPolicy: Unsupported value: {json.dumps(policy)}")
        dry_run = options.get("dryRun") in ("All", ["All"])
        if dry_run:
            return self._present(rd, current)
        result = self._delete(rd, current, policy, grace=options.get("gracePeriodSeconds"))
        self._collect_garbage()
        if result is not None:
            return self._present(rd, result)
        if rd.crd_name is not None or (rd.group == "" and rd.plural == "pods"):
            return self._present(rd, current)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {**_details(rd, name), "uid": current["metadata"]["uid"]},
        }

    def _delete(self, rd: ResourceDef, current: Obj, policy: str, grace: int | None = None) -> Obj | None:
        """Delete now, or mark for deletion (finalizers, foreground, namespaces, graceful pods).

        Returns the marked object if it stays, ``None`` if it is gone.
        """
        if policy == "Orphan":
            self._orphan_dependents(current)
        meta = current["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and FOREGROUND not in finalizers:
            finalizers.append(FOREGROUND)
        graceful_pod = (
            self.graceful_pod_deletion
            and rd.group == ""
            and rd.plural == "pods"
            and bool((current.get("spec") or {}).get("nodeName"))
            and grace != 0
        )
        if meta.get("deletionTimestamp"):
            # Already being deleted: a repeated DELETE may end a pending grace period
            # (gracePeriodSeconds=0, what a kubelet sends) or add foregroundDeletion.
            if grace == 0 and not finalizers and meta.get("deletionGracePeriodSeconds"):
                self._finalize(rd, current)
                return None
            if finalizers != list(meta.get("finalizers") or []):
                new = copy.deepcopy(current)
                new["metadata"]["finalizers"] = finalizers
                return self._commit_update(rd, current, new)
            return current
        if not finalizers and not graceful_pod and not self._has_pending_cleanup(rd, current):
            self._finalize(rd, current)
            return None
        new = copy.deepcopy(current)
        new_meta = new["metadata"]
        grace_seconds = int(grace or 30) if graceful_pod else 0
        # For a pod, the time by which it is due to be gone: the grace period is included.
        new_meta["deletionTimestamp"] = _now(grace_seconds)
        new_meta["deletionGracePeriodSeconds"] = grace_seconds
        new_meta["generation"] = int(new_meta.get("generation") or 0) + 1
        if finalizers:
            new_meta["finalizers"] = finalizers
        if rd.group == "" and rd.plural == "namespaces":
            new["status"] = {"phase": "Terminating"}
        new_meta["resourceVersion"] = self._next_rv()
        self._store(rd, new)
        self._emit(rd, "MODIFIED", new, current)
        return new

    def _delete_collection(
        self, rd: ResourceDef, namespace: str | None, params: Mapping[str, str], options: Mapping[str, Any]
    ) -> Obj:
        if "deletecollection" not in rd.verbs:
            raise ApiError(405, "MethodNotAllowed", f"deletecollection is not supported on {rd.group_resource}")
        objs = self._select(rd, namespace, self._selector(rd, params))
        policy = str(options.get("propagationPolicy") or "Background")
        for obj in objs:
            self._delete(rd, obj, policy, grace=options.get("gracePeriodSeconds"))
        self._collect_garbage()
        return {
            "apiVersion": rd.api_version,
            "kind": rd.list_kind,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": [self._present(rd, o) for o in objs],
        }

    def _orphan_dependents(self, owner: Obj) -> None:
        uid = owner["metadata"]["uid"]
        for rd, obj in list(self._all_live()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [ref for ref in refs if ref.get("uid") != uid]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self._commit_update(rd, obj, new)

    # ---- garbage collection and namespace/CRD cleanup --------------------------------------

    def _collect_garbage(self) -> None:
        """Run the garbage collector and the namespace/CRD cleanup controllers to a fixpoint.

        The real ones are asynchronous; here they run right after every write, so a test sees
        the final state as soon as the API call returns.
        """
        for _ in range(10_000):
            if not self._gc_step():
                return
        raise RuntimeError("garbage collection did not converge")

    def _gc_step(self) -> bool:
        live = list(self._all_live())
        by_uid: dict[str, tuple[ResourceDef, Obj]] = {obj["metadata"]["uid"]: (rd, obj) for rd, obj in live}

        def owner_of(dependent: Obj, ref: Mapping[str, Any]) -> Obj | None:
            found = by_uid.get(str(ref.get("uid")))
            if found is None:
                return None
            owner_rd, owner = found
            if owner_rd.namespaced and owner["metadata"].get("namespace") != dependent["metadata"].get("namespace"):
                return None  # cross-namespace owner references resolve to nothing, as in the real GC
            return owner

        def dependents(owner: Obj) -> list[tuple[ResourceDef, Obj, Mapping[str, Any]]]:
            uid = owner["metadata"]["uid"]
            result = []
            for rd, obj in live:
                for ref in obj["metadata"].get("ownerReferences") or []:
                    if ref.get("uid") == uid and owner_of(obj, ref) is not None:
                        result.append((rd, obj, ref))
            return result

        for rd, obj in live:
            refs = obj["metadata"].get("ownerReferences") or []
            if not refs or obj["metadata"].get("deletionTimestamp"):
                continue
            owners = [owner_of(obj, ref) for ref in refs]
            solid = [o for o in owners if o is not None and not o["metadata"].get("deletionTimestamp")]
            waiting = [
                o
                for o in owners
                if o is not None
                and o["metadata"].get("deletionTimestamp")
                and FOREGROUND in (o["metadata"].get("finalizers") or [])
            ]
            if not solid and (waiting or all(o is None for o in owners)):
                policy = "Foreground" if waiting and dependents(obj) else "Background"
                self._delete(rd, obj, policy)
                return True
            dangling = [ref for ref, owner in zip(refs, owners, strict=True) if owner is None or owner in waiting]
            if solid and dangling:
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [ref for ref in refs if ref not in dangling]
                self._commit_update(rd, obj, new)
                return True

        for rd, obj in live:
            meta = obj["metadata"]
            foreground = meta.get("deletionTimestamp") and FOREGROUND in (meta.get("finalizers") or [])
            if foreground and not any(ref.get("blockOwnerDeletion") for _, _, ref in dependents(obj)):
                new = copy.deepcopy(obj)
                new["metadata"]["finalizers"] = [f for f in meta["finalizers"] if f != FOREGROUND]
                self._commit_update(rd, obj, new)
                return True

        return self._namespace_cleanup(live) or self._crd_cleanup(live)

    def _namespace_cleanup(self, live: list[tuple[ResourceDef, Obj]]) -> bool:
        for rd, ns in live:
            if not (rd.group == "" and rd.plural == "namespaces" and ns["metadata"].get("deletionTimestamp")):
                continue
            name = ns["metadata"]["name"]
            contents = [(r, o) for r, o in live if r.namespaced and o["metadata"].get("namespace") == name]
            for content_rd, obj in contents:
                if not obj["metadata"].get("deletionTimestamp"):
                    self._delete(content_rd, obj, "Background")
                    return True
            if not contents and not ns["metadata"].get("finalizers"):
                self._finalize(rd, ns)
                return True
        return False

    def _crd_cleanup(self, live: list[tuple[ResourceDef, Obj]]) -> bool:
        for rd, crd in live:
            if not (rd.group == "apiextensions.k8s.io" and rd.plural == "customresourcedefinitions"):
                continue
            meta = crd["metadata"]
            if not meta.get("deletionTimestamp") or CRD_CLEANUP not in (meta.get("finalizers") or []):
                continue
            spec = crd["spec"]
            instances = [(r, o) for r, o in live if r.group == spec["group"] and r.plural == spec["names"]["plural"]]
            for instance_rd, obj in instances:
                if not obj["metadata"].get("deletionTimestamp"):
                    self._delete(instance_rd, obj, "Background")
                    return True
            if not instances:
                new = copy.deepcopy(crd)
                new["metadata"]["finalizers"] = [f for f in meta["finalizers"] if f != CRD_CLEANUP]
                self._commit_update(rd, crd, new)
                return True
        return False

    # ---- the Python API (call on the emulator's loop: see EmulatorThread.call) --------------

    def create_object(self, obj: Mapping[str, Any], *, field_validation: str = "Strict") -> Obj:
        """Create an object as ``POST`` would (namespace from ``metadata.namespace``)."""
        rd = self.resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        namespace = (obj.get("metadata") or {}).get("namespace") or ("default" if rd.namespaced else None)
        created, _ = self._create(rd, namespace, copy.deepcopy(dict(obj)), {"fieldValidation": field_validation})
        return self._present(rd, created)

    def get_object(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        """The current object, or ``None`` (namespaced kinds default to the ``default`` namespace)."""
        rd = self.resource_for(api_version, kind)
        obj = self._load(rd, namespace or ("default" if rd.namespaced else None), name)
        return None if obj is None else self._present(rd, obj)

    def list_objects(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        *,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[Obj]:
        """Live objects (all namespaces when ``namespace`` is None), filtered like a LIST."""
        rd = self.resource_for(api_version, kind)
        params = {"labelSelector": label_selector, "fieldSelector": field_selector}
        return [self._present(rd, obj) for obj in self._select(rd, namespace, self._selector(rd, params))]

    def replace_object(self, obj: Mapping[str, Any], *, subresource: str | None = None) -> Obj:
        """``PUT`` the object (``metadata.resourceVersion``, if set, is a precondition)."""
        rd = self.resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or ("default" if rd.namespaced else None)
        updated, _ = self._replace(
            rd,
            namespace,
            str(meta.get("name")),
            copy.deepcopy(dict(obj)),
            subresource=subresource,
            params={"fieldValidation": "Strict"},
        )
        return self._present(rd, updated)

    def put_object(self, obj: Mapping[str, Any]) -> Obj:
        """Create, or replace unconditionally (status included, where it has a subresource)."""
        rd = self.resource_for(str(obj.get("apiVersion")), str(obj.get("kind")))
        meta = dict(obj.get("metadata") or {})
        namespace = meta.get("namespace") or ("default" if rd.namespaced else None)
        if self._load(rd, namespace, str(meta.get("name"))) is None:
            created = self.create_object(obj)
            if rd.has_status and "status" in obj:
                return self.replace_object({**created, "status": obj["status"]}, subresource="status")
            return created
        body = copy.deepcopy(dict(obj))
        body.setdefault("metadata", {}).pop("resourceVersion", None)
        updated = self.replace_object(body)
        if rd.has_status and "status" in obj:
            return self.replace_object({**updated, "status": obj["status"]}, subresource="status")
        return updated

    def patch_object(
        self,
        api_version: str,
        kind: str,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> Obj:
        """``PATCH`` with ``patch_type`` ``merge``, ``json`` or ``strategic``."""
        rd = self.resource_for(api_version, kind)
        media = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }[patch_type]
        namespace = namespace or ("default" if rd.namespaced else None)
        body = json.dumps(patch).encode()
        patched, _, _ = self._patch(
            rd,
            namespace,
            name,
            subresource=subresource,
            content_type=media,
            body=body,
            params={"fieldValidation": "Strict"},
        )
        return self._present(rd, patched)

    def delete_object(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None = None,
        *,
        propagation_policy: str | None = None,
    ) -> Obj:
        """``DELETE`` (returns what the server returns: the object, or a ``Status``)."""
        rd = self.resource_for(api_version, kind)
        namespace = namespace or ("default" if rd.namespaced else None)
        options = {"propagationPolicy": propagation_policy} if propagation_policy else {}
        return self._delete_request(rd, namespace, name, options)

    def preload_crd(self, crd: Mapping[str, Any]) -> Obj:
        """Create (or replace) a CustomResourceDefinition; its resources are served right away."""
        existing = self.get_object("apiextensions.k8s.io/v1", "CustomResourceDefinition", crd["metadata"]["name"])
        if existing is None:
            return self.create_object(crd)
        body = copy.deepcopy(dict(crd))
        body["metadata"] = {**existing["metadata"], **body.get("metadata", {})}
        body["metadata"].pop("resourceVersion", None)
        return self.replace_object(body)


# --------------------------------------------------------------------------------------------
# Running the emulator for synchronous tests.
# --------------------------------------------------------------------------------------------


class EmulatorThread:
    """Serve a :class:`KubernetesApiEmulator` over real HTTP on 127.0.0.1 from a background thread.

    The thread owns its own event loop; :meth:`call` runs a function on that loop (where all
    emulator state lives), so tests, Kopf threads and kubectl subprocesses can share it.
    """

    def __init__(self, host: str = "127.0.0.1", **emulator_options: Any) -> None:
        self.host = host
        self.emulator_options = emulator_options
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._emulator: KubernetesApiEmulator | None = None
        self.url = ""
        self.kubeconfig_path: Path | None = None

    @property
    def emulator(self) -> KubernetesApiEmulator:
        if self._emulator is None:
            raise RuntimeError("the emulator is not running")
        return self._emulator

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._run, name="k8s-api-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the API emulator did not start in time")
        if self._failure is not None:
            raise RuntimeError("the API emulator failed to start") from self._failure

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the emulator's loop and return its result (or raise).

        Call it from other threads only (from the loop itself, e.g. in a kmock reaction, it would deadlock).
        """
        if self._loop is None:
            raise RuntimeError("the emulator is not running")

        async def run() -> T:
            return fn(*args, **kwargs)

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(timeout)

    def server_errors(self) -> list[str]:
        """Unexpected exceptions inside the emulator since the last reset, as formatted tracebacks."""
        errors = self.call(lambda: list(self.emulator._errors[-1]) if self.emulator._errors else [])
        return ["".join(traceback.format_exception(e)) for e in errors]

    def reset(self) -> None:
        self.call(self.emulator.reset)

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """Write a kubeconfig for this server (plain HTTP, a dummy token, context ``emulator``)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}
            ],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.kubeconfig_path = path
        return path

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # pragma: no cover - reported to start()
            self._failure = exc
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        emulator = KubernetesApiEmulator(**self.emulator_options)
        async with emulator, kmock.Server(emulator, host=self.host) as server:
            emulator.reset()
            self._emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            emulator.close_watches()
            for _ in range(50):  # let open watch streams finish before the server shuts down
                if not emulator._watchers:
                    break
                await asyncio.sleep(0.05)
