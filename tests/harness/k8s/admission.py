"""Admission: decoding checks, ``fieldValidation`` (unknown-field pruning), CRD schema
defaulting and validation (OpenAPI schema and CEL rules, by :mod:`tests.harness.crd_validation`),
ObjectMeta and name rules, CRD validation, immutable fields of built-ins.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Mapping
from typing import Any

from tests.harness import crd_validation as cv
from tests.harness.k8s.errors import (
    ApiError,
    bad_request,
    invalid,
    not_found,
    status_details,
)
from tests.harness.k8s.resources import Obj, ResourceDef
from tests.harness.k8s.store import ObjectStore

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


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the API server uses for generateName


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


class Admission(ObjectStore):
    """What the server checks and defaults before it stores a write."""

    __slots__ = ()

    def _check_type_meta(self, rd: ResourceDef, body: Mapping[str, Any]) -> None:
        api_version = body.get("apiVersion")
        kind = body.get("kind")
        if api_version and api_version != rd.api_version:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match "
                f"the expected API version ({rd.api_version})"
            )
        if kind and kind != rd.kind:
            raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({rd.kind})")
        if not isinstance(body.get("metadata", {}), dict):
            raise bad_request("metadata must be an object")

    def _check_namespace(self, rd: ResourceDef, namespace: str | None, name: str) -> None:
        if not rd.namespaced or not self.require_namespaces:
            return
        ns_def = self._defs["", "v1", "namespaces"]
        ns = self._load(ns_def, None, namespace or "")
        if ns is None:
            raise not_found(ns_def, namespace or "")
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f'{rd.group_resource} "{name}" is forbidden: unable to create new content in namespace '
                f"{namespace} because it is being terminated",
                status_details(rd, name),
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
                raise bad_request(
                    f"json: cannot unmarshal into Go struct field ObjectMeta.metadata.{key} of type string"
                )
        for key in ("finalizers", "ownerReferences"):
            value = meta.get(key)
            if value is not None and not isinstance(value, list):
                raise bad_request(f"json: cannot unmarshal into Go struct field ObjectMeta.metadata.{key}")
        if not all(isinstance(f, str) for f in meta.get("finalizers") or []):
            raise bad_request(
                "json: cannot unmarshal into Go struct field ObjectMeta.metadata.finalizers of type string"
            )

    def _admit(self, rd: ResourceDef, obj: Obj, old: Obj | None, params: Mapping[str, str]) -> tuple[Obj, list[str]]:
        """Decode-time pruning (fieldValidation), defaulting and validation, in the server's order."""
        mode = params.get("fieldValidation") or "Warn"
        if mode not in ("Ignore", "Warn", "Strict"):
            raise bad_request(f"fieldValidation must be one of Ignore, Warn, Strict; got {mode!r}")
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
            raise bad_request(
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
            raise invalid(rd, name, errors)
        return obj, warnings

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
                raise invalid(
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
                    raise invalid(
                        rd,
                        name,
                        [
                            cv.FieldError(
                                key, cv.REASON_FORBIDDEN, "Forbidden: field is immutable when `immutable` is set"
                            )
                        ],
                    )
