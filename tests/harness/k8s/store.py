"""The object store: resource registry, resourceVersions, the watch-event log, and how a change
is committed (no-op detection, generation, MODIFIED/DELETED events, final removal).

:class:`ObjectStore` is the base of the emulator's layers (listing, watch, discovery,
admission, deletion, writes); it holds all of the emulator's state, on top of kmock's
``emu.objects`` (objects with history). Everything runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import attrs
import kmock

from tests.harness.k8s.resources import Obj, ResourceDef, bundled_resources, crd_resource_defs


def now_rfc3339(after_seconds: int = 0) -> str:
    """RFC 3339 with a ``Z``, at second precision, like ``metav1.Time`` (``after_seconds`` from now)."""
    at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=after_seconds)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class WatchEvent:
    """One entry of the watch-event log: what a watch from an older resourceVersion replays."""

    rv: int
    type: str
    group: str
    plural: str
    namespace: str | None
    obj: Obj
    old: Obj | None


@attrs.define(kw_only=True)
class ObjectStore(kmock.KubernetesEmulator):
    """kmock's emulator with a resource registry, resourceVersions and an event log (the state of all layers)."""

    # The knobs (see KubernetesApiEmulator), read by the layer each concerns.
    require_namespaces: bool = True
    strict_field_selectors: bool = True
    graceful_pod_deletion: bool = False
    max_events: int = 100_000
    server_version: str = "v1.34.0"

    _defs: dict[tuple[str, str, str], ResourceDef] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _log: list[WatchEvent] = attrs.field(factory=list, init=False)
    _log_rvs: list[int] = attrs.field(factory=list, init=False)
    _compacted_rv: int = attrs.field(default=0, init=False)
    _changed: asyncio.Future[None] | None = attrs.field(default=None, init=False)
    _epoch: int = attrs.field(default=0, init=False)
    _watchers: int = attrs.field(default=0, init=False)

    _BUILTINS: ClassVar[list[ResourceDef] | None] = None

    def _load_builtins(self) -> None:
        if ObjectStore._BUILTINS is None:
            ObjectStore._BUILTINS = bundled_resources()
        self._defs.clear()
        self.resources.clear()
        for rd in ObjectStore._BUILTINS:
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
        for rd in crd_resource_defs(crd):
            self.register_resource(rd)

    def resource_for(self, api_version: str, kind_or_plural: str) -> ResourceDef:
        """Find a served resource by ``apiVersion`` and kind (``ConfigMap``) or plural (``configmaps``)."""
        group, _, version = api_version.rpartition("/")
        for rd in self._defs.values():
            if rd.group == group and rd.version == version and kind_or_plural in (rd.kind, rd.plural):
                return rd
        raise KeyError(f"no resource {kind_or_plural!r} is served in {api_version!r}")

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

    def _emit(self, rd: ResourceDef, event_type: str, obj: Obj, old: Obj | None) -> None:
        event = WatchEvent(
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
