"""What the emulated server serves: :class:`ResourceDef` (one group/version/resource, its
discovery data and, for a custom resource, its CRD schema), the built-in resources of a real
cluster (kmock's bundled discovery data) and the resources a CRD defines.
"""

from __future__ import annotations

import copy
import gzip
import importlib.resources
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kmock

Obj = dict[str, Any]


ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


#: The finalizer the CRD controller puts on every CRD, to delete its custom objects first.
CRD_CLEANUP = "customresourcecleanup.apiextensions.k8s.io"


# API groups of the bundled discovery data (a k3s cluster) that a plain API server does not serve.
_SKIPPED_GROUPS = {"metrics.k8s.io", "gateway.networking.k8s.io"}


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


def bundled_resources() -> list[ResourceDef]:
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


def crd_resource_defs(crd: Mapping[str, Any]) -> list[ResourceDef]:
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
