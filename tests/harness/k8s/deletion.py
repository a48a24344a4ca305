"""Deletion: DELETE (preconditions, propagation policies, graceful pod deletion, finalizers),
DELETE of a collection, and the garbage collector with the namespace and CRD cleanup
controllers, run to a fixpoint right after every write.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from tests.harness.k8s.errors import (
    ApiError,
    bad_request,
    conflict,
    not_found,
    status_details,
)
from tests.harness.k8s.listing import Listing
from tests.harness.k8s.resources import CRD_CLEANUP, Obj, ResourceDef
from tests.harness.k8s.store import now_rfc3339

#: The finalizer of foreground deletion: the owner stays until its blocking dependents are gone.
FOREGROUND = "foregroundDeletion"


class Deletion(Listing):
    """Deleting objects and collecting garbage."""

    __slots__ = ()

    def _delete_request(self, rd: ResourceDef, namespace: str | None, name: str, options: Mapping[str, Any]) -> Obj:
        if "delete" not in rd.verbs:
            raise ApiError(405, "MethodNotAllowed", f"delete is not supported on {rd.group_resource}")
        current = self._load(rd, namespace, name)
        if current is None:
            raise not_found(rd, name)
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != current["metadata"]["uid"]:
            raise conflict(
                rd,
                name,
                f"Precondition failed: UID in precondition: {preconditions['uid']}, "
                f"UID in object meta: {current['metadata']['uid']}",
            )
        if (
            preconditions.get("resourceVersion")
            and preconditions["resourceVersion"] != current["metadata"]["resourceVersion"]
        ):
            raise conflict(
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
            raise bad_request(f"propagationPolicy: Unsupported value: {json.dumps(policy)}")
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
            "details": {**status_details(rd, name), "uid": current["metadata"]["uid"]},
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
        new_meta["deletionTimestamp"] = now_rfc3339(grace_seconds)
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
