"""Carrying a plan out: the writes a reconcile makes, in order, through the API server and storage.

:meth:`PlanExecutor.execute` makes the writes of one :class:`~tuneloop_operator.planner.Plan`:
the output claim, the lineage (listing, ``promoted.json``, index), each delete, each create, the
status patch, the events. A write refused for a passing reason raises :class:`RetryLater` (the
rest of the plan is not made; the next reconcile plans again from what exists); a status patch is
retried in place, since the objects of the plan exist by then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

import kopf

from tuneloop.api import Reason
from tuneloop.api.status import FineTuneJobStatus
from tuneloop.ownership import OutputOwnedError
from tuneloop.storage import StorageError
from tuneloop_operator.conditions import status_patch
from tuneloop_operator.datawatch import Listing
from tuneloop_operator.kube import ApiError, KubeClient
from tuneloop_operator.outputs import OutputAccess, StorageAccessError
from tuneloop_operator.planner import Event, Plan, plan_deletion
from tuneloop_operator.workqueue import Key

log = logging.getLogger("tuneloop_operator")
#: Pauses between tries of a status write the API server refused for a passing reason (409, 422,
#: 429, 5xx): the objects of the plan exist by then, and a status that does not record them makes
#: the next reconcile guess (adopt pods, re-derive the run) instead of know.
STATUS_WRITE_RETRIES: Final = (0.5, 1.0, 2.0, 4.0, 8.0)


class RetryLater(kopf.TemporaryError):
    """A reconcile could not finish (the API server refused a write); Kopf retries it."""


class PlanExecutor:
    """Makes the writes of plans; ``listing(key)`` is the dataset listing a starting run records."""

    def __init__(self, kube: KubeClient, outputs: OutputAccess, listing: Callable[[Key], Listing | None]) -> None:
        self.kube = kube
        self.outputs = outputs
        self.listing = listing

    async def execute(self, key: Key, body: Mapping[str, Any], old: FineTuneJobStatus, the_plan: Plan) -> None:
        namespace, _ = key
        if the_plan.claim is not None:
            await self._claim(body, the_plan)
        await self._write_lineage(key, body, the_plan)
        for ref in the_plan.delete:
            await self.kube.delete(namespace, ref.kind, ref.name)
        for obj in the_plan.create:
            try:
                await self.kube.create(obj)
            except ApiError as exc:
                if exc.status in (409, 429) or exc.status >= 500:
                    delay = max(5.0, exc.retry_after or 0.0)
                    raise RetryLater(f"creating {obj['kind']} {obj['metadata']['name']}: {exc}", delay=delay) from None
                # Refused for good (quota, admission policy): say so where the user looks, retry slowly.
                message = f"the API server refused {obj['kind']} {obj['metadata']['name']}: {exc.message}"
                await self._post(body, Event("Warning", "PodCreateFailed", message))
                raise RetryLater(message, delay=30) from None
        stored = body.get("status")
        patch = status_patch(stored if isinstance(stored, Mapping) else old, the_plan.status)
        if patch is not None:
            await self._write_status(key, patch)
        for event in the_plan.events:
            await self._post(body, event)

    async def _write_status(self, key: Key, patch: Mapping[str, Any]) -> None:
        """Patch ``/status``, retrying what the API server refused for a passing reason."""
        for pause in STATUS_WRITE_RETRIES:
            try:
                await self.kube.patch_job_status(*key, patch)
                return
            except ApiError as exc:
                if exc.status not in (409, 422, 429) and exc.status < 500:
                    raise
                log.info("status write of %s/%s refused (%s), trying again in %.1fs", *key, exc, pause)
                await asyncio.sleep(max(pause, exc.retry_after or 0.0))
        await self.kube.patch_job_status(*key, patch)

    async def _claim(self, body: Mapping[str, Any], the_plan: Plan) -> None:
        """Claim the output prefix and the run number before anything of the run exists; a
        claim lost to a race since the prefix was read aborts the plan (the next reconcile
        reads it again and numbers the run after the winner's, or reports the new owner)."""
        claim, job = the_plan.claim, the_plan.job
        if claim is None or job is None:
            return
        try:
            await self.outputs.claim(job, claim)
        except OutputOwnedError as exc:
            raise RetryLater(f"claiming run {claim.run}: {exc}", delay=1) from None
        except (StorageError, StorageAccessError) as exc:
            message = f"cannot claim run {claim.run} under spec.output.uri {job.spec.output.uri}: {exc}; retrying"
            await self._post(body, Event("Warning", Reason.OUTPUT_UNAVAILABLE, message[:1024]))
            raise RetryLater(message, delay=30) from None

    async def _write_lineage(self, key: Key, body: Mapping[str, Any], the_plan: Plan) -> None:
        """What the plan records in storage before the status says so: the dataset listing a run
        starts with, ``promoted.json``, the lineage index. A failure aborts the plan (retried)."""
        job = the_plan.job
        if job is None or (the_plan.record_listing is None and the_plan.pointer is None and not the_plan.index):
            return
        try:
            listing = self.listing(key)
            if the_plan.record_listing is not None and listing is not None:
                await self.outputs.write_listing(job, the_plan.record_listing, listing)
            if the_plan.pointer is not None:
                await self.outputs.write_pointer(job, the_plan.pointer)
            await self.outputs.append_index(job, the_plan.index)
        except (StorageError, StorageAccessError) as exc:
            message = f"cannot write the lineage under spec.output.uri {job.spec.output.uri}: {exc}; retrying"
            await self._post(body, Event("Warning", Reason.OUTPUT_UNAVAILABLE, message[:1024]))
            raise RetryLater(message, delay=30) from None

    async def _post(self, body: Mapping[str, Any], event: Event) -> None:
        """Post an Event about the job; a refusal is logged, never raised."""
        try:
            await self.kube.post_event(body, event)
        except ApiError as exc:
            log.warning("could not post event %s: %s", event.reason, exc)

    async def delete_children(self, key: Key, body: Mapping[str, Any]) -> None:
        """Delete the job's pods, Services and ConfigMaps and post the deletion's Events."""
        namespace, name = key
        for kind in ("Pod", "Service", "ConfigMap"):
            for obj in await self.kube.list_children(namespace, name, kind):
                await self.kube.delete(namespace, kind, str(obj["metadata"]["name"]))
        events, _ = plan_deletion(body)
        for event in events:
            await self._post(body, event)
