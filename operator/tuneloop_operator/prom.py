"""The drift query (``spec.retrain.onDrift.prometheus``): one PromQL instant query, one number.

:func:`query_scalar` asks the Prometheus HTTP API (``GET <url>/api/v1/query?query=…``) and
returns a :class:`DriftSample`: a value when the answer is exactly one finite number (a scalar,
or an instant vector with exactly one sample), else an error in words. It never raises for what a
server, a network or a query can do wrong (an HTTP error, a timeout, a refused connection, a
PromQL syntax error, an empty or multi-series result, NaN): the trigger reports the error in a
condition and asks again at the next poll, and never starts a run on it.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from tuneloop.text import clip

__all__ = ["MAX_RESPONSE_BYTES", "DriftSample", "query_scalar"]

#: Answers longer than this are refused (a query matching thousands of series, or not Prometheus).
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
_SHOWN: Final = 300
_API_PATH: Final = "/api/v1/query"


@dataclass(frozen=True)
class DriftSample:
    """The outcome of one drift query: exactly one of ``value`` and ``error`` is set."""

    value: float | None
    """The number the query returned (finite)."""
    error: str | None
    """Why there is no value, in words: which URL, what went wrong, what to do."""
    at: datetime
    """When the answer (or the failure) came (UTC)."""


def _endpoint(url: str) -> str:
    """``<url>/api/v1/query``: the base URL's path kept (a Prometheus behind a path prefix), its
    query string and fragment dropped."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/") + _API_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _shown(text: str) -> str:
    return clip(" ".join(text.split()), _SHOWN)


def _labels(sample: Any) -> str:
    metric = sample.get("metric") if isinstance(sample, dict) else None
    if not isinstance(metric, dict):
        return "{}"
    name = metric.get("__name__", "")
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{labels}}}"


def _number(pair: Any, where: str) -> tuple[float | None, str | None]:
    """The value of a ``[<time>, "<value>"]`` pair."""
    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], str)):
        return None, f"{where} answered with a malformed sample ({_shown(json.dumps(pair))})"
    try:
        value = float(pair[1])
    except ValueError:
        return None, f"{where} answered with a sample that is not a number ({_shown(pair[1])})"
    if not math.isfinite(value):
        return None, (
            f"the query returned {pair[1]} at {where}, not a usable number; guard the query against "
            "division by zero and empty inputs"
        )
    return value, None


def _interpret(body: Any, where: str) -> tuple[float | None, str | None]:
    """(value, None) or (None, error) from a Prometheus API answer."""
    if not isinstance(body, dict):
        return None, f"{where} did not answer with a Prometheus API object; check spec.retrain.onDrift.prometheus.url"
    if body.get("status") != "success":
        kind = body.get("errorType") or "error"
        return None, f"{where} refused the query: {kind}: {_shown(str(body.get('error', 'no reason given')))}"
    data = body.get("data")
    if not isinstance(data, dict):
        return None, f"{where} answered without data; check spec.retrain.onDrift.prometheus.url"
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _number(result, where)
    if kind == "vector" and isinstance(result, list):
        if not result:
            return None, (
                f"the query matched no series at {where} (an empty result); check the metric name and labels, "
                "and that Prometheus scrapes the exporter"
            )
        if len(result) > 1:
            shown = ", ".join(_labels(s) for s in result[:3]) + (", …" if len(result) > 3 else "")
            return None, (
                f"the query returned {len(result)} series at {where} ({_shown(shown)}); it must return one number: "
                "narrow it with labels or aggregate it, e.g. max(...)"
            )
        sample = result[0]
        return _number(sample.get("value") if isinstance(sample, dict) else None, where)
    if kind == "matrix":
        return None, (
            f"the query returned a range vector at {where}; drift needs one number: "
            "wrap the range in a function, e.g. avg_over_time(metric[10m])"
        )
    if kind == "string":
        return None, f"the query returned a string at {where}, not a number"
    return None, f"{where} answered with an unknown result type {_shown(str(kind))}"


async def _fetch(session: aiohttp.ClientSession, endpoint: str, promql: str, where: str) -> tuple[Any, str | None]:
    """(parsed JSON, None) or (None, error)."""
    async with session.get(endpoint, params={"query": promql}, allow_redirects=True) as response:
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_RESPONSE_BYTES and (chunk := await response.content.read(64 * 1024)):
            chunks.append(chunk)
            size += len(chunk)
        raw = b"".join(chunks)
        if size > MAX_RESPONSE_BYTES:
            return None, (
                f"{where} answered with more than {MAX_RESPONSE_BYTES // (1024 * 1024)} MiB; the query must return one "
                "number: aggregate it"
            )
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            body = None
        if isinstance(body, dict) and body.get("status") == "error":
            return body, None  # Prometheus explains 400 (bad_data), 422 (execution), 503 (unavailable)
        if response.status >= 400:
            return None, (
                f"{where} answered HTTP {response.status} {response.reason or ''}".rstrip()
                + "; check spec.retrain.onDrift.prometheus.url (the base URL of Prometheus, without /api/v1)"
            )
        if body is None:
            kind = response.headers.get("Content-Type", "no content type")
            return None, (
                f"{where} did not answer with JSON (HTTP {response.status}, {_shown(kind)}); "
                "check that spec.retrain.onDrift.prometheus.url points at Prometheus"
            )
        return body, None


async def query_scalar(
    url: str,
    promql: str,
    *,
    timeout: float = 10.0,
    session: aiohttp.ClientSession | None = None,
    clock: Callable[[], datetime] | None = None,
) -> DriftSample:
    """Run ``promql`` as an instant query against the Prometheus at ``url``; one number or an error.

    ``url`` is the base URL (``http://prometheus.monitoring:9090``, or with a path prefix).
    ``timeout`` bounds the whole exchange (connecting, sending, the answer). ``session`` reuses
    the caller's connection pool (one is made and closed per call otherwise); ``clock`` gives
    ``at`` (default: now, UTC). Cancellation propagates; nothing else is raised.
    """
    now = clock or (lambda: datetime.now(UTC))
    where = f"Prometheus at {_shown(url)}"
    try:
        endpoint = _endpoint(url)
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        if session is None:
            async with aiohttp.ClientSession(timeout=client_timeout) as own:
                body, error = await _fetch(own, endpoint, promql, where)
        else:
            async with asyncio.timeout(timeout):
                body, error = await _fetch(session, endpoint, promql, where)
    except TimeoutError:
        error = f"{where} did not answer within {timeout:g} s; check that it is up and reachable, or simplify the query"
        return DriftSample(value=None, error=error, at=now())
    except aiohttp.ClientConnectorError as exc:
        reason = _shown(exc.os_error.strerror or str(exc.os_error)) if exc.os_error else type(exc).__name__
        error = f"cannot connect to {where}: {reason}; check the URL, the Service and NetworkPolicies"
        return DriftSample(value=None, error=error, at=now())
    except (aiohttp.ClientError, ValueError) as exc:
        detail = _shown(str(exc)) or type(exc).__name__
        return DriftSample(value=None, error=f"querying {where} failed: {type(exc).__name__}: {detail}", at=now())
    if error is not None:
        return DriftSample(value=None, error=error, at=now())
    value, error = _interpret(body, where)
    return DriftSample(value=value, error=error, at=now())
