"""Errors as the real API server answers them: ``kind: Status`` bodies with the HTTP code
(:class:`ApiError` and one constructor per reason), and the JSON responses they travel in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp.web
from multidict import CIMultiDict

from tests.harness import crd_validation as cv
from tests.harness.k8s.resources import Obj, ResourceDef


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


def status_details(rd: ResourceDef | None, name: str | None, **extra: Any) -> Obj:
    details: Obj = {}
    if name:
        details["name"] = name
    if rd is not None:
        if rd.group:
            details["group"] = rd.group
        details["kind"] = rd.plural
    details.update(extra)
    return details


def not_found(rd: ResourceDef, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rd.group_resource} "{name}" not found', status_details(rd, name))


def no_route() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def conflict(rd: ResourceDef, name: str, detail: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rd.group_resource} "{name}": {detail}',
        status_details(rd, name),
    )


def stale(rd: ResourceDef, name: str) -> ApiError:
    return conflict(
        rd, name, "the object has been modified; please apply your changes to the latest version and try again"
    )


def invalid(rd: ResourceDef, name: str, errors: list[cv.FieldError]) -> ApiError:
    details: Obj = {"name": name, "kind": rd.kind}
    if rd.group:
        details["group"] = rd.group
    details["causes"] = [{"reason": e.reason, "message": e.message, "field": e.field} for e in errors]
    return ApiError(422, "Invalid", cv.invalid_message(rd.kind, rd.group, name, errors), details)


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: "
        f"application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml "
        f"(got {content_type or 'none'})",
    )


def json_response(body: Any, status: int = 200, warnings: Iterable[str] = ()) -> aiohttp.web.Response:
    """A JSON response, with ``Warning`` headers as the real server sends them (e.g. unknown fields)."""
    headers: CIMultiDict[str] = CIMultiDict()
    for warning in warnings:
        headers.add("Warning", f"299 - {json.dumps(warning)}")
    return aiohttp.web.json_response(body, status=status, headers=headers)
