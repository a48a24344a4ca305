"""Writes: create (POST), replace (PUT), patch (JSON, merge, strategic merge, server-side apply)
on objects and their ``/status`` subresource, and ``pods/binding``, through one update pipeline.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Mapping
from typing import Final

import jsonpatch
import jsonpointer
import yaml

from tests.harness import crd_validation as cv
from tests.harness.k8s.admission import Admission
from tests.harness.k8s.deletion import Deletion
from tests.harness.k8s.errors import (
    ApiError,
    bad_request,
    conflict,
    invalid,
    no_route,
    not_found,
    stale,
    status_details,
    unsupported_media_type,
)
from tests.harness.k8s.patches import json_merge_patch, strategic_merge_patch
from tests.harness.k8s.resources import CRD_CLEANUP, Obj, ResourceDef
from tests.harness.k8s.store import now_rfc3339

_SYSTEM_META_KEYS = (
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "resourceVersion",
    "selfLink",
)


#: Metadata fields whose change can give the garbage collector or a cleanup controller work.
_GC_FIELDS: Final = ("ownerReferences", "finalizers", "deletionTimestamp")


class Writes(Admission, Deletion):
    """Creating, replacing and patching objects."""

    __slots__ = ()

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
                raise no_route()
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = None
        if meta.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise invalid(
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
            raise invalid(rd, name, errors)
        self._check_namespace(rd, namespace, name)
        if self._load(rd, namespace, name) is not None:
            raise ApiError(
                409, "AlreadyExists", f'{rd.group_resource} "{name}" already exists', status_details(rd, name)
            )
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "selfLink", "managedFields"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
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
        now = now_rfc3339()
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
            raise not_found(rd, name)
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
            raise not_found(rd, name)
        try:
            patch = json.loads(body or b"null")
        except ValueError as exc:
            raise bad_request(f"the patch could not be decoded: {exc}") from exc
        if media == "application/json-patch+json":
            if not isinstance(patch, list):
                raise bad_request("json patch must be a list of operations")
            try:
                patched = jsonpatch.apply_patch(self._present(rd, current), patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException, TypeError, KeyError) as exc:
                # The real server answers 422 for patches that do not apply, failed `test` ops included.
                raise ApiError(
                    422,
                    "Invalid",
                    f"the server rejected our request due to an error in our request: {exc}",
                    status_details(rd, name),
                ) from exc
        elif media == "application/merge-patch+json":
            if not isinstance(patch, dict):
                raise bad_request("merge patch must be a JSON object")
            patched = json_merge_patch(self._present(rd, current), patch)
        elif media == "application/strategic-merge-patch+json":
            if rd.crd_name is not None:
                raise unsupported_media_type(media)  # the real server has no SMP for custom resources
            if not isinstance(patch, dict):
                raise bad_request("strategic merge patch must be a JSON object")
            patched = strategic_merge_patch(self._present(rd, current), patch)
        else:
            raise unsupported_media_type(media)
        if not isinstance(patched, dict):
            raise bad_request("the patched object is not a JSON object")
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
            raise bad_request("PATCH /apply requires fieldManager to be set")
        try:
            applied = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            raise bad_request(f"the applied configuration could not be decoded: {exc}") from exc
        if not isinstance(applied, dict):
            raise bad_request("the applied configuration must be an object")
        applied_name = (applied.get("metadata") or {}).get("name")
        if applied_name != name:
            raise bad_request(f"the name of the object ({applied_name}) does not match the name on the URL ({name})")
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
            raise bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        if rd.namespaced and meta.get("namespace") and meta["namespace"] != cur_meta.get("namespace"):
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        if meta.get("resourceVersion") and meta["resourceVersion"] != cur_meta["resourceVersion"]:
            raise stale(rd, name)
        if meta.get("uid") and meta["uid"] != cur_meta["uid"]:
            raise conflict(
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
                raise invalid(
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

    def _bind_pod(self, rd: ResourceDef, namespace: str | None, name: str, body: Obj) -> Obj:
        """``POST pods/<name>/binding``: what a scheduler does to put a pod on a node. Sets
        ``spec.nodeName`` (otherwise immutable) and ``PodScheduled=True``, once."""
        current = self._get_or_404(rd, namespace, name)
        target = body.get("target") or {}
        node = target.get("name")
        if not isinstance(node, str) or not node or target.get("kind", "Node") != "Node":
            raise bad_request("a Binding needs target.kind Node and target.name")
        uid = (body.get("metadata") or {}).get("uid")
        if uid and uid != current["metadata"].get("uid"):
            raise conflict(
                rd,
                name,
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                f"{current['metadata'].get('uid')}",
            )
        if current["metadata"].get("deletionTimestamp"):
            raise conflict(rd, name, "pod is being deleted, cannot be assigned to a host")
        bound = (current.get("spec") or {}).get("nodeName")
        if bound:
            raise conflict(rd, name, f'pod {name} is already assigned to node "{bound}"')
        new = copy.deepcopy(current)
        new.setdefault("spec", {})["nodeName"] = node
        status = new.setdefault("status", {})
        conditions = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        conditions.append(
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": now_rfc3339()}
        )
        status["conditions"] = conditions
        self._commit_update(rd, current, new)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}
