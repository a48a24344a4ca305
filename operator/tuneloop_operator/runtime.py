"""The operator at run time: every trigger ends in :meth:`Runtime.reconcile`.

A reconcile observes the job (one GET, three LISTs by label, the heartbeat when asked), asks
:func:`tuneloop_operator.planner.plan` what to do (looking at storage or monitoring first when the
planner needs to know), has the :class:`~tuneloop_operator.executor.PlanExecutor` carry the plan
out, records it in the metrics and schedules the requeue the plan asked for. :class:`Runtime`
only composes the parts that do each: the per-job queue and requeue timers
(:mod:`~tuneloop_operator.workqueue`), the active runs and their heartbeats
(:class:`~tuneloop_operator.heartbeat.ActiveRuns`), the :class:`~tuneloop_operator.observe.Observer`,
the executor and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tuneloop_operator.executor import PlanExecutor
from tuneloop_operator.heartbeat import ActiveRuns, HeartbeatReader
from tuneloop_operator.kube import KubeClient
from tuneloop_operator.metrics import OperatorMetrics
from tuneloop_operator.observe import Observer
from tuneloop_operator.outputs import JobStorage, OutputAccess
from tuneloop_operator.planner import Observed, Plan, parse_job, parse_status, plan
from tuneloop_operator.settings import OperatorSettings
from tuneloop_operator.workqueue import JobQueue, Key, Requeues, retry_delay

log = logging.getLogger("tuneloop_operator")


@dataclass
class Runtime:
    """The operator's parts and the jobs it has seen, composed."""

    settings: OperatorSettings
    kube: KubeClient
    metrics: OperatorMetrics
    heartbeats: HeartbeatReader
    outputs: OutputAccess
    observer: Observer
    recorded: set[Key] = field(default_factory=set)
    """Jobs whose last seen status was written by an operator (it has ``observedGeneration``)."""
    queue: JobQueue = field(init=False)
    requeues: Requeues = field(init=False)
    runs: ActiveRuns = field(init=False)
    executor: PlanExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.queue = JobQueue()
        self.requeues = Requeues(lambda key: self.trigger(key, "requeue"))
        self.runs = ActiveRuns(self.heartbeats, self.metrics.heartbeat_read_errors)
        self.executor = PlanExecutor(self.kube, self.outputs, self.observer.listing)

    @classmethod
    def create(cls, settings: OperatorSettings, kube: KubeClient) -> Runtime:
        defaults = settings.trainer_defaults()
        storages = JobStorage(kube, defaults)
        metrics = OperatorMetrics()
        outputs = OutputAccess(storages)
        return cls(
            settings=settings,
            kube=kube,
            metrics=metrics,
            heartbeats=HeartbeatReader(kube, storages),
            outputs=outputs,
            observer=Observer(outputs, metrics),
        )

    def forget(self, key: Key) -> None:
        self.requeues.forget(key)
        self.runs.forget(key)
        self.recorded.discard(key)
        self.observer.forget(key)
        self.queue.forget(key)
        self.metrics.forget(*key)

    # -- triggering --

    def trigger(self, key: Key, why: str, *, heartbeat: bool = False) -> None:
        """Reconcile ``key`` soon, in the background; coalesced with one already waiting."""
        self.queue.submit(key, lambda: self._queued(key, why, heartbeat))

    async def _queued(self, key: Key, why: str, heartbeat: bool) -> None:
        try:
            await self.reconcile(key, why, heartbeat=heartbeat, queued=True)
        except Exception as exc:  # a background reconcile must not die silently
            self.metrics.reconcile_errors.inc()
            delay = retry_delay(exc)
            log.warning("reconcile of %s/%s (%s) failed, retrying in %.0fs: %s", *key, why, delay, exc)
            self.requeues.schedule(key, delay)

    # -- reconcile --

    async def reconcile(self, key: Key, why: str, *, heartbeat: bool = False, queued: bool = False) -> None:
        async with self.queue.turn(key, queued=queued):
            started = time.monotonic()
            try:
                await self._reconcile(key, heartbeat=heartbeat)
            finally:
                self.metrics.reconcile_duration.labels(trigger=why).observe(time.monotonic() - started)

    async def _reconcile(self, key: Key, *, heartbeat: bool) -> None:
        namespace, name = key
        body = await self.kube.get_job(namespace, name)
        if body is None:
            self.forget(key)
            return
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return  # the deletion handler cleans up
        pods, config_maps, services = await asyncio.gather(
            self.kube.list_children(namespace, name, "Pod"),
            self.kube.list_children(namespace, name, "ConfigMap"),
            self.kube.list_children(namespace, name, "Service"),
        )
        old = parse_status(body.get("status"))
        if heartbeat:
            current = old.current_run
            job = parse_job(body)[0] if current is not None and current.result is None else None
            if current is not None and job is not None:
                await self.runs.read(key, job, current.number)
        observed = Observed(
            body=body,
            now=datetime.now(UTC).replace(microsecond=0),
            pods=pods,
            config_maps=config_maps,
            services=services,
            heartbeat=self.runs.latest(key),
            triggers=self.observer.observations(key),
        )
        the_plan = plan(observed, self.settings)
        # The planner asks before it decides what depends on storage or monitoring: who owns the
        # output (a run would start), the dataset listing, new rows, the drift query, a pinned run.
        job = parse_job(body)[0] if the_plan.needs else None
        for _ in range(4):
            if not the_plan.needs or job is None:
                break
            observed = await self.observer.observe(key, job, observed, the_plan.needs)
            the_plan = plan(observed, self.settings)
        await self.executor.execute(key, body, old, the_plan)
        self.observer.remember(key, the_plan.trigger_schedule)
        self._account(key, the_plan)
        if the_plan.requeue_after is not None:
            self.requeues.schedule(key, the_plan.requeue_after)

    def _account(self, key: Key, the_plan: Plan) -> None:
        """What a carried-out plan changes in the operator's memory and metrics."""
        current = the_plan.status.current_run
        self.runs.track(key, active=current is not None and current.result is None)
        self.metrics.record_plan(*key, the_plan)

    # -- deletion --

    async def delete(self, key: Key, body: Mapping[str, Any]) -> None:
        """Clean up after a deleted job (its children, Events), then forget it."""
        async with self.queue.turn(key):
            await self.executor.delete_children(key, body)
            self.forget(key)

    # -- ticker --

    async def tick_forever(self) -> None:
        """Read the heartbeat of every active run, every ``reconcile_interval`` seconds."""
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            for key in list(self.runs.active):
                self.trigger(key, "timer", heartbeat=True)

    def close(self) -> None:
        """Stop the background work and close the API client."""
        self.queue.cancel()
        self.requeues.cancel()
        with contextlib.suppress(Exception):
            self.kube.close()
