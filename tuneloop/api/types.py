"""Building blocks of the FineTuneJob API: the base model, and the small validated
string types (URIs, names, durations, cron expressions, quantities) the spec is made of.

Every constraint here has a twin in the generated CRD (a ``pattern``, ``maxLength`` or a
CEL rule), so the API server, ``tuneloop validate`` and the operator refuse the same
manifests. Messages say what is wrong *and* what to do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from cronsim import CronSim, CronSimError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields are errors.

    ``extra="forbid"`` is what turns a typo such as ``learningrate`` into an error
    instead of a silently ignored field. ``use_attribute_docstrings`` makes the
    docstring under each field its description, which becomes the CRD's description
    and the text ``kubectl explain`` prints.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=False,
        str_strip_whitespace=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it is written in a manifest: camelCase keys, no unset optionals."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


Loc = tuple[str | int, ...]


def raise_issues(title: str, issues: Sequence[tuple[Loc, str]], value: object) -> None:
    """Raise one ValidationError carrying several cross-field errors, each at its own path.

    Raised inside a model validator, pydantic prefixes every ``loc`` with the path of the
    model, so a rule checked on the spec reports ``spec.method.type``, not just ``spec``.
    """
    if not issues:
        return
    details = [
        InitErrorDetails(type=PydanticCustomError("tuneloop_rule", "{message}", {"message": msg}), loc=loc, input=value)
        for loc, msg in issues
    ]
    raise ValidationError.from_exception_data(title, details)


# --- URIs ------------------------------------------------------------------------------

URI_SCHEMES: Final = ("s3", "hf", "file")
URI_MAX_LENGTH: Final = 1024
# No whitespace or control characters anywhere, a known scheme, something after it.
# A ``..`` path segment: rejected so that no URI can climb out of its prefix.
DOT_DOT_SEGMENT: Final = r"(^|/)\.\.(/|$)"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[A-Za-z0-9._/-]+)?$")


def check_uri(value: str, schemes: Sequence[str]) -> str:
    """Validate a URI for a field that accepts ``schemes``; return it unchanged."""
    allowed = ", ".join(f"{s}://" for s in schemes)
    match = re.match(r"^([a-z0-9]+)://(.*)$", value, flags=re.DOTALL)
    if not match:
        raise ValueError(f"{value!r} is not a URI; write it as one of {allowed}… (for example s3://bucket/path/)")
    scheme, rest = match.groups()
    if scheme not in schemes:
        raise ValueError(f"scheme {scheme}:// is not supported here; use one of {allowed}")
    if len(value) > URI_MAX_LENGTH:
        raise ValueError(f"URI is {len(value)} characters long; the limit is {URI_MAX_LENGTH}")
    if re.search(r"[\s\x00-\x1f\x7f]", value):
        raise ValueError("URI contains whitespace or control characters; percent-encode or rename the object")
    path = rest.split("?", 1)[0]
    if re.search(DOT_DOT_SEGMENT, path):
        raise ValueError("URI contains a '..' segment; write the full path without '..'")
    if scheme == "s3":
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise ValueError("s3:// URI has an empty bucket name; write s3://<bucket>/<prefix>")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(
                f"{bucket!r} is not a valid S3 bucket name (3-63 characters: lowercase letters, digits, '.', '-')"
            )
    elif scheme == "hf":
        if not _HF_REPO.match(rest):
            raise ValueError("hf:// URI must name a repository as hf://<org>/<name>[@<revision>]")
    elif scheme == "file" and not rest.startswith("/"):
        raise ValueError("file:// URI must be absolute: file:///path/to/data (three slashes)")
    return value


_SAFE = r"[^\s\x00-\x1f\x7f]"
#: Per-scheme shapes, for the CRD's ``pattern`` (RE2 has no look-ahead, so the '..' rule
#: is a CEL rule beside it).
_SCHEME_PATTERNS: Final = {
    "s3": rf"s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9](/{_SAFE}*)?",
    "hf": r"hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[A-Za-z0-9._/-]+)?",
    "file": rf"file:///{_SAFE}*",
}


def _uri_type(*schemes: str) -> Any:
    pattern = "^(" + "|".join(_SCHEME_PATTERNS[s] for s in schemes) + ")$"
    return Annotated[
        str,
        AfterValidator(lambda v: check_uri(v, schemes)),
        WithJsonSchema(
            {
                "type": "string",
                "maxLength": URI_MAX_LENGTH,
                "pattern": pattern,
                "x-kubernetes-validations": [
                    {
                        "rule": "!self.matches('(^|/)\\\\.\\\\.(/|$)')",
                        "message": "must not contain '..' path segments; write the full path",
                    }
                ],
            }
        ),
    ]


ModelUri = _uri_type("hf", "s3", "file")
"""Where a model comes from: ``hf://org/name[@revision]``, ``s3://bucket/prefix/`` or ``file:///dir``."""
DataUri = _uri_type("s3", "file")
"""Where data lives: ``s3://bucket/key-or-prefix`` or ``file:///path``."""
OutputUri = _uri_type("s3", "file")
"""Where results go: ``s3://bucket/prefix/`` or ``file:///dir``."""


# --- HTTP endpoints ----------------------------------------------------------------

ENDPOINT_PATTERN: Final = r"^https?://[^\s/@]+(/[^\s]*)?$"


def _check_endpoint(value: str) -> str:
    # The value is never echoed: a URL with user:password@ carries a secret.
    authority = value.split("://", 1)[-1].split("/", 1)[0]
    if "@" in authority:
        raise ValueError("must not contain credentials (user:password@); keep them in a Secret and reference it")
    if not re.match(ENDPOINT_PATTERN, value):
        raise ValueError("must be an http:// or https:// URL such as https://minio.storage:9000")
    return value


Endpoint = Annotated[
    str,
    AfterValidator(_check_endpoint),
    WithJsonSchema({"type": "string", "maxLength": 512, "pattern": ENDPOINT_PATTERN}),
]
"""An HTTP(S) endpoint URL without credentials."""


# --- names -----------------------------------------------------------------------------

DNS1123_LABEL: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def _check_dns_subdomain(value: str) -> str:
    if len(value) > 253 or not re.match(DNS1123_SUBDOMAIN, value):
        raise ValueError(
            f"{value!r} is not a valid Kubernetes object name: use lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters"
        )
    return value


def _check_dns_label(value: str) -> str:
    if len(value) > 63 or not re.match(DNS1123_LABEL, value):
        raise ValueError(
            f"{value!r} is not a valid name: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


ObjectName = Annotated[
    str,
    AfterValidator(_check_dns_subdomain),
    WithJsonSchema({"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN}),
]
"""A Kubernetes object name (DNS-1123 subdomain), such as the name of a Secret."""

LabelName = Annotated[
    str,
    AfterValidator(_check_dns_label),
    WithJsonSchema({"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL}),
]
"""A DNS-1123 label: what becomes part of pod and Service names."""

ColumnName = Annotated[str, Field(min_length=1, max_length=256)]
"""A column (or JSON key) of the dataset."""

Ratio = Annotated[float, Field(ge=0.0, lt=1.0)]
"""A fraction in [0, 1): of the rows, of the steps, of the units dropped."""


# --- durations -------------------------------------------------------------------------

DURATION_PATTERN: Final = r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
_UNITS: Final = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: str) -> int:
    """``'1h30m'`` → 5400 seconds. Units: d, h, m, s, largest first."""
    if not value or not re.match(DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration; write a number and a unit, largest first: 30s, 5m, 1h30m, 7d")
    return sum(int(n) * _UNITS[u] for n, u in re.findall(r"([0-9]+)([dhms])", value))


def _check_duration(value: str) -> str:
    if parse_duration(value) <= 0:
        raise ValueError(f"duration {value!r} must be longer than zero")
    return value


Duration = Annotated[
    str,
    AfterValidator(_check_duration),
    WithJsonSchema({"type": "string", "maxLength": 32, "pattern": r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"}),
]
"""A duration such as ``30s``, ``5m``, ``1h30m`` or ``7d``."""


# --- cron ------------------------------------------------------------------------------

_CRON_MACROS: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def expand_cron(value: str) -> str:
    """The five-field form of a cron expression (macros such as ``@daily`` expanded)."""
    return _CRON_MACROS.get(value.strip(), value.strip())


def _check_cron(value: str) -> str:
    try:
        CronSim(expand_cron(value), datetime(2026, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError) as exc:
        raise ValueError(
            f"{value!r} is not a cron expression ({exc}); use five fields 'minute hour day-of-month month "
            "day-of-week', e.g. '0 3 * * 0' for Sundays at 03:00 UTC, or a macro like @daily"
        ) from None
    return value


CronExpression = Annotated[
    str,
    AfterValidator(_check_cron),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 128}),
]
"""A cron schedule in UTC: ``minute hour day-of-month month day-of-week``, or ``@daily`` etc."""


def _check_time_zone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # noqa: PLC0415

    try:
        if len(value) > 64 or not re.fullmatch(TIME_ZONE_PATTERN, value):
            raise ValueError(value)
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # OSError: a name of the database's folders ("America") or one too long for a file name.
        raise ValueError(
            f"{value[:64]!r} is not a time zone of the IANA database; "
            "write e.g. 'Europe/Berlin', 'America/New_York' or 'UTC'"
        ) from None
    return value


TIME_ZONE_PATTERN: Final = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,2}$"
TimeZone = Annotated[
    str,
    AfterValidator(_check_time_zone),
    WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 64, "pattern": TIME_ZONE_PATTERN}),
]
"""An IANA time zone name such as ``Europe/Berlin`` (as a CronJob's ``timeZone``)."""


# --- quantities ------------------------------------------------------------------------

QUANTITY_PATTERN: Final = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


def _check_quantity(value: int | float | str) -> str:
    text = str(value)
    if not re.match(QUANTITY_PATTERN, text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity; write e.g. '4', '500m' (cpu) or '16Gi' (memory)")
    return text


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]
"""A Kubernetes resource quantity: ``4``, ``500m``, ``16Gi``."""
