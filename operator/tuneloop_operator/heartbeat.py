"""The trainer's heartbeat (``runs/<n>/status.json``): :class:`HeartbeatReader` reads it from the
job's storage (the client and its credentials: :class:`tuneloop_operator.outputs.JobStorage`);
:class:`ActiveRuns` keeps which jobs have an active run and the latest heartbeat of each."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter
from pydantic import ValidationError

from tuneloop.api import FineTuneJob
from tuneloop.contract import Heartbeat, Layout
from tuneloop.storage import NotFoundError, StorageError, safe_join
from tuneloop_operator.kube import KubeClient
from tuneloop_operator.outputs import JobStorage, StorageAccessError
from tuneloop_operator.workqueue import Key

#: The operator's log: a failed read is reported there, as every reconcile's trouble is.
log = logging.getLogger("tuneloop_operator")


class HeartbeatError(Exception):
    """The heartbeat could not be read (the message names what, never a credential)."""


class HeartbeatReader:
    """Reads heartbeats through the job's storage client (:class:`JobStorage`)."""

    def __init__(self, kube: KubeClient, storages: JobStorage | None = None) -> None:
        self.storages = storages or JobStorage(kube)

    async def read(self, job: FineTuneJob, run: int) -> Heartbeat | None:
        """The run's latest heartbeat, or None when the trainer has not written one yet."""
        uri = safe_join(job.spec.output.uri, Layout.status(run))
        try:
            storage = await self.storages.for_job(job)
        except StorageAccessError as exc:
            raise HeartbeatError(str(exc)) from None
        try:
            raw = await asyncio.to_thread(storage.read_json, uri)
        except NotFoundError as exc:
            if exc.code == "NoSuchBucket":  # not "no heartbeat yet": the output's bucket is gone
                raise HeartbeatError(f"cannot read {uri}: {exc}") from None
            return None
        except StorageError as exc:
            raise HeartbeatError(f"cannot read {uri}: {exc}") from None
        try:
            return Heartbeat.model_validate(raw)
        except ValidationError as exc:
            raise HeartbeatError(f"{uri} is not a trainer heartbeat ({exc.error_count()} problem(s))") from None


class ActiveRuns:
    """The jobs whose current run has no result yet, and the latest heartbeat read for each.

    A failed read is counted in ``read_errors`` and logged: a warning when its message is new
    for the job, at debug level while it repeats.
    """

    def __init__(self, reader: HeartbeatReader, read_errors: Counter) -> None:
        self.reader = reader
        self.read_errors = read_errors
        self.active: set[Key] = set()
        self.beats: dict[Key, Heartbeat] = {}
        self.errors: dict[Key, str] = {}

    def latest(self, key: Key) -> Heartbeat | None:
        return self.beats.get(key)

    async def read(self, key: Key, job: FineTuneJob, run: int) -> None:
        """Read run ``run``'s heartbeat and keep it, if there is one yet. Never raises: S3 trouble
        must not stop reconciling."""
        try:
            beat = await self.reader.read(job, run)
        except Exception as exc:
            self.read_errors.inc()
            # HeartbeatError messages name the object, never a credential; others only by type.
            text = str(exc) if isinstance(exc, HeartbeatError) else type(exc).__name__
            level = logging.DEBUG if self.errors.get(key) == text else logging.WARNING
            self.errors[key] = text
            log.log(level, "heartbeat of %s/%s run %d: %s", *key, run, text)
            return
        self.errors.pop(key, None)
        if beat is not None:
            self.beats[key] = beat

    def track(self, key: Key, *, active: bool) -> None:
        """The job's current run is active (or not: its heartbeat is dropped)."""
        if active:
            self.active.add(key)
        else:
            self.active.discard(key)
            self.beats.pop(key, None)

    def forget(self, key: Key) -> None:
        self.beats.pop(key, None)
        self.errors.pop(key, None)
        self.active.discard(key)
