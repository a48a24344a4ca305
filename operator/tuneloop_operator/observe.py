"""What the planner asks to observe before it decides (``Plan.needs``), at the edge.

The planner is pure; when it needs to know who owns the output, what the dataset prefix holds
now, how many rows arrived, what the drift query says, whether a pinned run's model still
exists, or (after its status was found empty) what the lineage index and ``promoted.json`` say,
it says so in ``Plan.needs``, and :class:`Observer` looks (S3 listings, a PromQL query) and hands
the planner an :class:`~tuneloop_operator.planner.Observed` with the answers. Every failure
becomes an answer with an error, never an exception: the planner reports it in a condition (or
an event) and looks again later.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Final

from tuneloop.api import FineTuneJob
from tuneloop.api.status import FineTuneJobStatus
from tuneloop.api.types import parse_duration
from tuneloop.storage import StorageError
from tuneloop_operator import prom
from tuneloop_operator.datawatch import DataWatch, Listing
from tuneloop_operator.metrics import OperatorMetrics
from tuneloop_operator.outputs import OutputAccess, StorageAccessError
from tuneloop_operator.planner import Observed, parse_status
from tuneloop_operator.triggers import DataObservation, DriftObservation, Observations, RowObservation
from tuneloop_operator.workqueue import Key

log = logging.getLogger(__name__)
#: Bytes of new objects read at most to count their rows, per count (beyond: "at least N rows",
#: which is enough to pass minNewSamples; measured: JSON lines ~1 GB/s, CSV ~110 MB/s).
ROW_COUNT_LIMIT_BYTES: Final = 256 * 1024**2
#: Listings kept per job (the latest; the watermark listings are read back from S3 when needed).
MAX_LISTINGS: Final = 4096
#: Seconds a PromQL query may take.
QUERY_TIMEOUT: Final = 10.0


class Observer:
    """Looks at what the planner asks for; keeps the latest dataset listing of each job (a run
    that starts records it as its data watermark)."""

    def __init__(self, outputs: OutputAccess, metrics: OperatorMetrics, datawatch: DataWatch | None = None) -> None:
        self.outputs = outputs
        self.metrics = metrics
        self.datawatch = datawatch or DataWatch()
        metrics.watch_data(self.datawatch.stats)
        self.listings: OrderedDict[Key, Listing] = OrderedDict()
        self.schedules: dict[Key, dict[str, datetime]] = {}
        """When each job's triggers look next (the status has it only as of its last refresh)."""

    def forget(self, key: Key) -> None:
        self.listings.pop(key, None)
        self.schedules.pop(key, None)

    def remember(self, key: Key, schedule: Mapping[str, datetime]) -> None:
        if schedule:
            self.schedules[key] = dict(schedule)

    def observations(self, key: Key) -> Observations:
        """What every pass starts with: the remembered trigger schedule."""
        return Observations(schedule=dict(self.schedules.get(key, {})))

    def listing(self, key: Key) -> Listing | None:
        return self.listings.get(key)

    async def observe(self, key: Key, job: FineTuneJob, observed: Observed, needs: Iterable[str]) -> Observed:
        """``observed`` with the answers to ``needs``."""
        wanted = set(needs)
        status = _status(observed)
        changes: dict[str, object] = {}
        if "output" in wanted:
            changes["output"] = await self.outputs.observe(job)
        if "pin" in wanted and job.spec.promotion.pin is not None:
            try:
                changes["pin_target"] = await self.outputs.pin_target(job, job.spec.promotion.pin)
            except (StorageError, StorageAccessError) as exc:
                log.warning("pinned run of %s/%s: %s", *key, exc)
                changes["pin_target"] = None
            changes["pin_read"] = True
        if "history" in wanted:
            changes["history"] = await self.outputs.read_history(job)
        triggers = observed.triggers
        if "watermark" in wanted:
            triggers = dataclasses.replace(triggers, watermark=await self._watermark(job, status), watermark_read=True)
        if "data" in wanted or "rows" in wanted:
            data, current = await self._list(key, job)
            triggers = dataclasses.replace(triggers, data=data)
            if "rows" in wanted:
                triggers = dataclasses.replace(triggers, rows=await self._count(job, status, current))
        if "drift" in wanted and job.spec.retrain.on_drift is not None:
            settings = job.spec.retrain.on_drift.prometheus
            self.metrics.drift_queries.inc()
            sample = await prom.query_scalar(settings.url, settings.query, timeout=QUERY_TIMEOUT)
            triggers = dataclasses.replace(triggers, drift=DriftObservation(value=sample.value, error=sample.error))
        changes["triggers"] = triggers
        return dataclasses.replace(observed, **changes)  # type: ignore[arg-type]

    async def _list(self, key: Key, job: FineTuneJob) -> tuple[DataObservation, Listing | None]:
        uri = job.spec.dataset.uri
        watch = job.spec.retrain.on_new_data
        # Jobs watching one prefix share a listing for half the shortest poll interval.
        max_age = parse_duration(watch.poll_interval) / 2 if watch is not None else 0.0
        try:
            storage = await self.outputs.storages.for_job(job, uri)
            listing = await self.datawatch.listing(storage, uri, max_age=max_age)
        except (StorageError, StorageAccessError) as exc:
            return DataObservation(error=str(exc)[:512]), None
        self.listings[key] = listing
        self.listings.move_to_end(key)
        while len(self.listings) > MAX_LISTINGS:
            self.listings.popitem(last=False)
        return DataObservation(fingerprint=listing.fingerprint, objects=listing.count), listing

    async def _watermark_listing(self, job: FineTuneJob, run: int | None) -> Listing | None:
        return await self.outputs.read_listing(job, run) if run is not None else None

    async def _watermark(self, job: FineTuneJob, status: FineTuneJobStatus) -> tuple[str, int] | None:
        run = status.current_run.number if status.current_run is not None else None
        try:
            listing = await self._watermark_listing(job, run)
        except (StorageError, StorageAccessError, ValueError) as exc:
            log.warning("data watermark of %s: %s", job.metadata.name, exc)
            return None
        return (listing.fingerprint, run) if listing is not None and run is not None else None

    async def _count(self, job: FineTuneJob, status: FineTuneJobStatus, current: Listing | None) -> RowObservation:
        if current is None:
            return RowObservation(error="the dataset could not be listed")
        state = status.triggers.new_data if status.triggers is not None else None
        try:
            since = await self._watermark_listing(job, state.watermark_run if state is not None else None)
            storage = await self.outputs.storages.for_job(job, job.spec.dataset.uri)
            counted = await self.datawatch.count_new_rows(
                storage, job.spec.dataset.uri, current, since, limit_bytes=ROW_COUNT_LIMIT_BYTES
            )
        except (StorageError, StorageAccessError, ValueError) as exc:
            return RowObservation(error=str(exc)[:512])
        return RowObservation(rows=counted.rows, objects=counted.objects, exact=counted.exact)


def _status(observed: Observed) -> FineTuneJobStatus:
    return parse_status(observed.body.get("status"))
