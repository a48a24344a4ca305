"""When each job is reconciled: one at a time per job, background triggers coalesced, requeues timed.

:class:`JobQueue` serialises the work on one job (a lock per job) and runs background
reconciles, coalescing the triggers that arrive while one is waiting (a burst of pod events makes
one more reconcile, not one each). :class:`Requeues` holds the timers of the reconciles a plan or
a failure asked for later; the earliest request per job wins. Neither knows what a reconcile does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final

#: A job: (namespace, name). Everything the operator keeps per job is keyed by it.
Key = tuple[str, str]
#: Seconds before a reconcile that failed outside a Kopf handler (a pod event, a requeue) is tried again.
RETRY_DELAY: Final = 5.0


def retry_delay(exc: BaseException) -> float:
    """Seconds to wait before a failed reconcile is tried again: the delay a ``RetryLater`` asks
    for (30 s when the API server refused a pod: one event per try), else :data:`RETRY_DELAY` or
    the server's ``Retry-After`` if longer."""
    return float(getattr(exc, "delay", None) or max(RETRY_DELAY, getattr(exc, "retry_after", None) or 0.0))


class JobQueue:
    """Per-job locks, the jobs with a background reconcile waiting, and the background tasks."""

    def __init__(self) -> None:
        self.locks: dict[Key, asyncio.Lock] = {}
        self.queued: set[Key] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def lock(self, key: Key) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def turn(self, key: Key, *, queued: bool = False) -> AsyncIterator[None]:
        """Hold the job's lock; a ``queued`` reconcile, once it holds it, lets the next trigger queue again."""
        async with self.lock(key):
            if queued:
                self.queued.discard(key)
            yield

    def submit(self, key: Key, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work()`` in the background unless work for ``key`` is already waiting (coalesced)."""
        if key in self.queued:
            return
        self.queued.add(key)
        self.spawn(work())

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, kept until it ends (and cancelled by :meth:`cancel`)."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def forget(self, key: Key) -> None:
        self.locks.pop(key, None)

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class Requeues:
    """Timers that call ``fire(key)`` later; the earliest request per job wins."""

    def __init__(self, fire: Callable[[Key], None]) -> None:
        self.fire = fire
        self.timers: dict[Key, asyncio.TimerHandle] = {}

    def schedule(self, key: Key, delay: float) -> None:
        """Fire for ``key`` after ``delay`` seconds, unless it fires sooner already."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        handle = self.timers.get(key)
        if handle is not None and not handle.cancelled() and handle.when() <= when:
            return
        if handle is not None:
            handle.cancel()

        def fire() -> None:
            self.timers.pop(key, None)
            self.fire(key)

        self.timers[key] = loop.call_at(when, fire)

    def forget(self, key: Key) -> None:
        handle = self.timers.pop(key, None)
        if handle is not None:
            handle.cancel()

    def cancel(self) -> None:
        for handle in self.timers.values():
            handle.cancel()
