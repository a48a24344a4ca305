"""Patch semantics: RFC 7386 JSON merge patch and the strategic merge patch of built-in types.
(JSON patch is the ``jsonpatch`` package; server-side apply is in :mod:`tests.harness.k8s.writes`.)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

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
