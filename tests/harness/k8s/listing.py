"""Reading: GET and LIST with label/field selectors, ``limit``/``continue`` pagination, and
server-side printing (``Accept: ...;as=Table``) for ``kubectl get``.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from tests.harness.k8s.errors import (
    bad_request,
    not_found,
)
from tests.harness.k8s.resources import Obj, ResourceDef
from tests.harness.k8s.selectors import (
    FIELD_SELECTABLE,
    Selector,
    field_value,
    parse_field_selector,
    parse_label_selector,
)
from tests.harness.k8s.store import ObjectStore


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
                (item for item in node or [] if isinstance(item, dict) and field_value(item, match[3]) == match[4]),
                None,
            )
    return node


class Listing(ObjectStore):
    """Selecting, listing and printing objects."""

    __slots__ = ()

    def _get_or_404(self, rd: ResourceDef, namespace: str | None, name: str) -> Obj:
        obj = self._load(rd, namespace, name)
        if obj is None:
            raise not_found(rd, name)
        return self._present(rd, obj)

    def _selector(self, rd: ResourceDef, params: Mapping[str, str], name: str | None = None) -> Selector:
        try:
            labels = parse_label_selector(params.get("labelSelector", ""))
            fields = parse_field_selector(params.get("fieldSelector", ""))
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
        if self.strict_field_selectors:
            allowed = (
                {"metadata.name", "metadata.namespace"}
                | FIELD_SELECTABLE.get((rd.group, rd.plural), frozenset())
                | rd.selectable_fields
            )
            for path, _, _ in fields:
                if path not in allowed:
                    raise bad_request(f"field label not supported: {path}")
        if name is not None:
            fields.append(("metadata.name", "=", name))
        return Selector(labels, fields)

    def _select(self, rd: ResourceDef, namespace: str | None, selector: Selector) -> list[Obj]:
        return [obj for obj in self._live(rd, namespace) if selector.matches(obj)]

    def _list_response(self, rd: ResourceDef, namespace: str | None, params: Mapping[str, str], accept: str) -> Obj:
        objs = self._select(rd, namespace, self._selector(rd, params))
        start_after: tuple[str, str] | None = None
        if params.get("continue"):
            try:
                token = json.loads(base64.urlsafe_b64decode(params["continue"].encode()))
                start_after = (str(token["ns"]), str(token["name"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise bad_request(f"invalid continue token: {exc}") from exc
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
