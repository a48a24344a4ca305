"""Watch streams: replay from a resourceVersion (``410 Gone`` once compacted), synthetic ADDED
events and the initial-events bookmark, selective watches, and ending every stream at once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
from collections.abc import Mapping

import aiohttp.web
from kmock._internal import rendering

from tests.harness.k8s.errors import (
    ApiError,
    bad_request,
)
from tests.harness.k8s.listing import Listing
from tests.harness.k8s.resources import Obj, ResourceDef
from tests.harness.k8s.selectors import (
    Selector,
)
from tests.harness.k8s.store import WatchEvent

#: The annotation of the bookmark that ends the initial events (``sendInitialEvents=true``).
INITIAL_EVENTS_END = "k8s.io/initial-events-end"


class Watch(Listing):
    """Serving watch streams from the store's event log."""

    __slots__ = ()

    def close_watches(self) -> None:
        """End every open watch stream (a new epoch), e.g. before a reset or shutdown."""
        self._epoch += 1
        self._notify()

    async def _wait_for_change(self, timeout: float) -> None:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._changed), timeout)

    async def _serve_watch_stream(
        self,
        request: rendering.Request,
        rd: ResourceDef,
        namespace: str | None,
        name: str | None,
        params: Mapping[str, str],
    ) -> aiohttp.web.StreamResponse:
        """A watch: replay from ``resourceVersion`` (or synthetic ADDED for the current state), then live."""
        selector = self._selector(rd, params, name)
        since = params.get("resourceVersion") or ""
        initial = params.get("sendInitialEvents") == "true"
        try:
            cursor = int(since) if since else 0
            timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        except ValueError as exc:
            raise bad_request(f"invalid watch parameter: {exc}") from exc
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(raw)
        except ConnectionError:
            return response  # the client went away before the stream began (e.g. a SIGKILLed operator)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        epoch = self._epoch
        self._watchers += 1
        try:
            if initial or cursor == 0:
                snapshot = self._select(rd, namespace, selector)
                cursor = self._rv
                for obj in snapshot:
                    await self._write_event(response, "ADDED", self._present(rd, obj))
                if initial:
                    bookmark = {
                        "apiVersion": rd.api_version,
                        "kind": rd.kind,
                        "metadata": {"resourceVersion": str(cursor), "annotations": {INITIAL_EVENTS_END: "true"}},
                    }
                    await self._write_event(response, "BOOKMARK", bookmark)
            while epoch == self._epoch:
                if cursor < self._compacted_rv:
                    gone = ApiError(410, "Expired", f"too old resource version: {cursor} ({self._compacted_rv})")
                    await self._write_event(response, "ERROR", gone.status())
                    break
                position = bisect.bisect_right(self._log_rvs, cursor)
                for event in self._log[position:]:
                    cursor = event.rv
                    event_type = self._watch_event_type(event, rd, namespace, selector)
                    if event_type is not None:
                        await self._write_event(response, event_type, self._present(rd, event.obj))
                if raw.transport is None or raw.transport.is_closing():
                    break
                wait = 1.0 if deadline is None else min(1.0, deadline - loop.time())
                if wait <= 0:
                    break
                if position == len(self._log) or self._log_rvs[-1] <= cursor:
                    await self._wait_for_change(wait)
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        except ConnectionError:
            pass
        finally:
            self._watchers -= 1
        return response

    @staticmethod
    async def _write_event(response: aiohttp.web.StreamResponse, event_type: str, obj: Obj) -> None:
        await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

    @staticmethod
    def _watch_event_type(event: WatchEvent, rd: ResourceDef, namespace: str | None, selector: Selector) -> str | None:
        """The event a selective watch sees: objects entering the selection are ADDED, leaving ones DELETED."""
        if (event.group, event.plural) != (rd.group, rd.plural):
            return None
        if namespace is not None and event.namespace != namespace:
            return None
        now = selector.matches(event.obj)
        if event.type != "MODIFIED":
            return event.type if now else None
        before = event.old is not None and selector.matches(event.old)
        if now:
            return "MODIFIED" if before else "ADDED"
        return "DELETED" if before else None
