"""API-server faults on the Kubernetes API emulator (``tests/harness/k8s.py``), for the reliability suite.

:class:`ApiFaults` sits in front of the emulator's request handling and answers chosen requests
badly, the way a real API server under load or in trouble does:

- an error status (409 ``Conflict``, 422 ``Invalid``, 429 ``TooManyRequests`` with ``Retry-After``,
  500, 503...) as a Kubernetes ``Status`` body, *instead of* serving the request, or *after* serving
  it (``applied=True``: the write happened but the client hears it failed, as when a response is
  lost or an etcd timeout races the commit);
- a slow answer (``delay`` seconds before the request is served or refused);
- a watch stream that opens (200, chunked) and then sends nothing, without closing, for ``stall``
  seconds (or until the client's connection is gone, or the injector is cleared).

Each :class:`Fault` matches a verb (``GET``, ``LIST``, ``WATCH``, ``POST``, ``PATCH``, ``PUT``,
``DELETE`` or ``*``) and a regular expression searched in the URL path, hits the next ``times``
matching requests (``None``: every one) with ``probability`` (drawn from the fault's own seeded
``random.Random``), and records every request it hit. Requests made inside the emulator
(``k8s_api.create(...)``, a test playing kubelet) are never faulted: only HTTP clients are.

    with ApiFaults(k8s_api) as faults:
        conflict = faults.add("PATCH", r"/finetunejobs/[^/]+/status$", status=409, times=5)
        ...
        assert conflict.remaining == 0

The injector patches the emulator class's request handler for the duration of the ``with`` block
and only acts on the given emulator instance; the original handler is restored on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import aiohttp.web

from tests.harness.k8s import KubernetesApiEmulator

if TYPE_CHECKING:
    from kmock._internal import rendering

    from tests.harness.k8s_fixtures import K8sApi

__all__ = ["REASONS", "ApiFaults", "Fault"]

#: The ``reason`` a real API server gives with each status code.
REASONS: Final = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
VERBS: Final = frozenset({"GET", "LIST", "WATCH", "POST", "PATCH", "PUT", "DELETE", "*"})


@dataclass
class Fault:
    """One injected misbehaviour; see the module docstring."""

    verb: str
    path: re.Pattern[str]
    status: int | None = None
    times: int | None = 1
    probability: float = 1.0
    retry_after: int | None = None
    delay: float = 0.0
    stall: float = 0.0
    applied: bool = False
    seed: int = 0
    hits: list[str] = field(default_factory=list)
    """``VERB path`` of every request this fault hit, in order."""
    hit_times: list[float] = field(default_factory=list)
    """``time.monotonic()`` of every hit."""
    active: bool = True
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def remaining(self) -> int | None:
        return None if self.times is None else max(0, self.times - len(self.hits))

    def matches(self, verb: str, path: str) -> bool:
        if not self.active or self.remaining == 0:
            return False
        if self.verb not in ("*", verb) or self.path.search(path) is None:
            return False
        return self.probability >= 1.0 or self._rng.random() < self.probability


def verb_of(request: rendering.Request) -> str:
    method = str(getattr(request.method, "value", request.method)).upper()
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "WATCH"
        return "GET" if request.name else "LIST"
    return method


def status_body(code: int, message: str, retry_after: int | None = None) -> dict[str, Any]:
    """A ``metav1.Status`` as the API server sends with an error."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": REASONS.get(code, "InternalError"),
        "code": code,
    }
    if retry_after is not None:
        body["details"] = {"retryAfterSeconds": retry_after}
    return body


class ApiFaults:
    """Faults injected into one emulator's HTTP requests (a context manager; see the module docstring)."""

    def __init__(self, k8s_api: K8sApi) -> None:
        self.k8s_api = k8s_api
        self.emulator = k8s_api.emulator
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._original: Callable[..., Awaitable[aiohttp.web.StreamResponse]] | None = None

    # ---- set up ----------------------------------------------------------------------------

    def add(
        self,
        verb: str,
        path: str,
        *,
        status: int | None = None,
        times: int | None = 1,
        probability: float = 1.0,
        retry_after: int | None = None,
        delay: float = 0.0,
        stall: float = 0.0,
        applied: bool = False,
        seed: int = 0,
    ) -> Fault:
        """Add a fault (see :class:`Fault`); it acts on requests that arrive from now on."""
        verb = verb.upper()
        if verb not in VERBS:
            raise ValueError(f"unknown verb {verb!r}: one of {sorted(VERBS)}")
        if stall and verb != "WATCH":
            raise ValueError("only a WATCH can stall")
        if applied and status is None:
            raise ValueError("applied=True needs a status to answer after serving")
        fault = Fault(
            verb=verb,
            path=re.compile(path),
            status=status,
            times=times,
            probability=probability,
            retry_after=retry_after,
            delay=delay,
            stall=stall,
            applied=applied,
            seed=seed,
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Stop every fault (their records stay readable)."""
        with self._lock:
            for fault in self.faults:
                fault.active = False

    def close_watches(self) -> None:
        """End every open watch stream now, so that clients reconnect (into a stall, if one is armed)."""
        self.k8s_api.call(self.emulator.close_watches)

    @property
    def hits(self) -> int:
        return sum(len(f.hits) for f in self.faults)

    # ---- install ---------------------------------------------------------------------------

    def __enter__(self) -> ApiFaults:
        assert self._original is None, "already installed"
        original = KubernetesApiEmulator._handle
        self._original = original
        target = self.emulator
        faults = self

        async def handle(emulator: KubernetesApiEmulator, request: rendering.Request) -> aiohttp.web.StreamResponse:
            if emulator is not target:
                return await original(emulator, request)
            return await faults._serve(emulator, request, original)

        KubernetesApiEmulator._handle = handle  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.clear()
        if self._original is not None:
            KubernetesApiEmulator._handle = self._original  # type: ignore[method-assign,assignment]
            self._original = None

    def _pick(self, verb: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(verb, path):
                    fault.hits.append(f"{verb} {path}")
                    fault.hit_times.append(time.monotonic())
                    return fault
        return None

    async def _serve(
        self,
        emulator: KubernetesApiEmulator,
        request: rendering.Request,
        original: Callable[..., Awaitable[aiohttp.web.StreamResponse]],
    ) -> aiohttp.web.StreamResponse:
        verb, path = verb_of(request), str(request.url.path)
        fault = self._pick(verb, path)
        if fault is None:
            return await original(emulator, request)
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.stall:
            return await self._stall(request, fault)
        if fault.status is None:
            return await original(emulator, request)
        if fault.applied:
            await original(emulator, request)
        message = f"injected fault: {verb} {path} answered {fault.status}"
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
        body = status_body(fault.status, message, fault.retry_after)
        return aiohttp.web.json_response(body, status=fault.status, headers=headers)

    @staticmethod
    async def _stall(request: rendering.Request, fault: Fault) -> aiohttp.web.StreamResponse:
        raw: Any = request._raw_request
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(raw)
        started = time.monotonic()
        while time.monotonic() - started < fault.stall:
            if not fault.active or raw.transport is None or raw.transport.is_closing():
                break  # the injector was cleared, or the client went away
            await asyncio.sleep(0.05)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write_eof()
        return response
