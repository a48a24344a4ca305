"""Reading the trainer's heartbeat (``runs/<n>/status.json``) from the job's storage (the
client and its credentials: :class:`tuneloop_operator.outputs.JobStorage`)."""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError

from tuneloop.api import FineTuneJob
from tuneloop.contract import Heartbeat, Layout
from tuneloop.storage import NotFoundError, StorageError, safe_join
from tuneloop_operator.kube import KubeClient
from tuneloop_operator.outputs import JobStorage, StorageAccessError

log = logging.getLogger(__name__)


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
