"""Protobuf: just enough for kubectl's imperative ``create namespace|configmap|secret``, which
send the Kubernetes protobuf envelope and do not fall back to JSON.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from typing import Any

from tests.harness.k8s.errors import (
    bad_request,
    unsupported_media_type,
)
from tests.harness.k8s.resources import Obj


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


def decode_protobuf(body: bytes) -> Obj:
    """Decode the Kubernetes protobuf envelope for Namespaces, ConfigMaps and Secrets (else 415).

    kubectl's typed commands (``kubectl create namespace x``) send protobuf and do not fall
    back to JSON; ``kubectl apply/create -f`` and every other client here send JSON.
    """
    if not body.startswith(b"k8s\x00"):
        raise bad_request("the protobuf body lacks the k8s envelope")
    envelope = dict(_pb_fields(body[4:]))
    type_meta = dict(_pb_fields(envelope.get(1, b"")))
    api_version, kind = type_meta.get(1, b"").decode(), type_meta.get(2, b"").decode()
    if (api_version, kind) not in (("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "Secret")):
        raise unsupported_media_type(f"application/vnd.kubernetes.protobuf ({api_version} {kind})")
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
