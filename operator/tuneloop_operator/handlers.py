"""Kopf handlers: thin. Every trigger ends in :meth:`Runtime.reconcile`, which observes the job
(one GET, three LISTs by label), asks :func:`tuneloop_operator.planner.plan` what to do, and
carries the plan out through :mod:`tuneloop_operator.kube`.

Triggers:

- create / update / resume of a FineTuneJob: reconcile now (errors go back to Kopf, which
  retries with backoff);
- any event of a pod Tuneloop made: reconcile its job (coalesced: a burst of pod events makes
  one more reconcile, not one each);
- a requeue the plan asked for (a backoff or a deadline expiring, a pod still stopping);
- a single ticker every ``TUNELOOP_RECONCILE_INTERVAL`` seconds that reads the heartbeat of
  every active run. One ticker rather than a Kopf timer per job: a thousand jobs make one
  task, not a thousand, and finished jobs cost nothing.

Status is written with one merge patch of ``/status`` per reconcile, only when it changed,
from every trigger alike (a pod event has no Kopf ``patch`` of the job to write into); Kopf's
own bookkeeping stays in annotations under ``tuneloop.dev``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import kopf
from prometheus_client import Counter

from tuneloop.api import GROUP, PLURAL, VERSION, Reason
from tuneloop.api.status import FineTuneJobStatus
from tuneloop.contract import Heartbeat
from tuneloop.ownership import OutputOwnedError
from tuneloop.storage import StorageError
from tuneloop_operator.conditions import status_patch
from tuneloop_operator.heartbeat import HeartbeatError, HeartbeatReader
from tuneloop_operator.kube import ApiError, EventSpec, KubeClient
from tuneloop_operator.metrics import SUPPRESSED_OUTCOMES, OperatorMetrics
from tuneloop_operator.observe import Observer
from tuneloop_operator.outputs import JobStorage, OutputAccess, StorageAccessError
from tuneloop_operator.planner import (
    Observed,
    Plan,
    PlannerSettings,
    parse_job,
    parse_status,
    plan,
    plan_deletion,
)
from tuneloop_operator.promotion import ANNOTATION_APPROVE, ANNOTATION_REJECT
from tuneloop_operator.render import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY
from tuneloop_operator.settings import OperatorSettings
from tuneloop_operator.triggers import ANNOTATION_RETRAIN

log = logging.getLogger("tuneloop_operator")

Key = tuple[str, str]
#: Seconds before a reconcile that failed outside a Kopf handler (a pod event, a requeue) is tried again.
RETRY_DELAY: Final = 5.0
#: Pauses between tries of a status write the API server refused for a passing reason (409, 422,
#: 429, 5xx): the objects of the plan exist by then, and a status that does not record them makes
#: the next reconcile guess (adopt pods, re-derive the run) instead of know.
STATUS_WRITE_RETRIES: Final = (0.5, 1.0, 2.0, 4.0, 8.0)
FINALIZER: Final = f"{GROUP}/finalizer"


#: Kopf's watcher says so, at DEBUG level, when a watch stream stayed silent past the inactivity timeout.
WATCH_LOGGER: Final = "kopf._cogs.clients.watching"
_STALLED: Final = re.compile(r"^Watch-stream for (?P<resource>[^\s./]+)\S* .* is inactive, reconnecting\.$")


class WatchStallCounter(logging.Filter):
    """Counts the watch streams Kopf found stalled and reopened (``tuneloop_operator_watch_stalls_total``).

    Kopf reports a stall only in a DEBUG line of its watcher's logger. Installed on that logger, this
    filter counts each such line by resource and lets through only what the operator's log level
    shows, so counting needs no DEBUG log.
    """

    def __init__(self, counter: Counter, shown_from: int) -> None:
        super().__init__()
        self.counter = counter
        self.shown_from = shown_from

    def filter(self, record: logging.LogRecord) -> bool:
        match = _STALLED.match(record.getMessage())
        if match is not None:
            self.counter.labels(resource=match.group("resource")).inc()
        return record.levelno >= self.shown_from

    def install(self) -> None:
        logger = logging.getLogger(WATCH_LOGGER)
        logger.setLevel(logging.DEBUG)
        logger.addFilter(self)

    def uninstall(self) -> None:
        logger = logging.getLogger(WATCH_LOGGER)
        logger.removeFilter(self)
        logger.setLevel(logging.NOTSET)


class RetryLater(kopf.TemporaryError):
    """A reconcile could not finish (the API server refused a write); Kopf retries it."""


@dataclass
class Runtime:
    """The operator's state: clients, metrics, per-job locks, pending requeues, the last heartbeats."""

    settings: OperatorSettings
    kube: KubeClient
    metrics: OperatorMetrics
    heartbeats: HeartbeatReader
    outputs: OutputAccess
    observer: Observer
    planner: PlannerSettings
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    queued: set[Key] = field(default_factory=set)
    timers: dict[Key, asyncio.TimerHandle] = field(default_factory=dict)
    beats: dict[Key, Heartbeat] = field(default_factory=dict)
    beat_errors: dict[Key, str] = field(default_factory=dict)
    active: set[Key] = field(default_factory=set)
    recorded: set[Key] = field(default_factory=set)
    """Jobs whose last seen status was written by an operator (it has ``observedGeneration``)."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

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
            planner=PlannerSettings(
                trainer_image=settings.trainer_image,
                backoff_base_seconds=settings.backoff_base_seconds,
                backoff_max_seconds=settings.backoff_max_seconds,
                max_preemptions=settings.max_preemptions,
                stuck_terminating_seconds=settings.stuck_terminating_seconds,
                metrics_port=settings.trainer_metrics_port,
                trainer_defaults=defaults,
            ),
        )

    def lock(self, key: Key) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    def forget(self, key: Key) -> None:
        handle = self.timers.pop(key, None)
        if handle is not None:
            handle.cancel()
        self.beats.pop(key, None)
        self.beat_errors.pop(key, None)
        self.active.discard(key)
        self.recorded.discard(key)
        self.observer.forget(key)
        self.locks.pop(key, None)
        self.metrics.jobs.forget(*key)
        self.metrics.job_series.forget(*key)

    # -- triggering --

    def trigger(self, key: Key, why: str, *, heartbeat: bool = False) -> None:
        """Reconcile ``key`` soon, in the background; coalesced with one already waiting."""
        if key in self.queued:
            return
        self.queued.add(key)
        task = asyncio.create_task(self._queued(key, why, heartbeat))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _queued(self, key: Key, why: str, heartbeat: bool) -> None:
        try:
            await self.reconcile(key, why, heartbeat=heartbeat, queued=True)
        except Exception as exc:  # a background reconcile must not die silently
            self.metrics.reconcile_errors.inc()
            # The delay a RetryLater asks for (30 s when the API server refused a pod: one event per try).
            delay = float(getattr(exc, "delay", None) or max(RETRY_DELAY, getattr(exc, "retry_after", None) or 0.0))
            log.warning("reconcile of %s/%s (%s) failed, retrying in %.0fs: %s", *key, why, delay, exc)
            self.schedule(key, delay)

    def schedule(self, key: Key, delay: float) -> None:
        """Reconcile ``key`` after ``delay`` seconds (the earliest request wins)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        handle = self.timers.get(key)
        if handle is not None and not handle.cancelled() and handle.when() <= when:
            return
        if handle is not None:
            handle.cancel()

        def fire() -> None:
            self.timers.pop(key, None)
            self.trigger(key, "requeue")

        self.timers[key] = loop.call_at(when, fire)

    # -- reconcile --

    async def reconcile(self, key: Key, why: str, *, heartbeat: bool = False, queued: bool = False) -> None:
        async with self.lock(key):
            if queued:
                self.queued.discard(key)
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
            await self._read_heartbeat(key, body, old)
        observed = Observed(
            body=body,
            now=datetime.now(UTC).replace(microsecond=0),
            pods=pods,
            config_maps=config_maps,
            services=services,
            heartbeat=self.beats.get(key),
            triggers=self.observer.observations(key),
        )
        the_plan = plan(observed, self.planner)
        # The planner asks before it decides what depends on storage or monitoring: who owns the
        # output (a run would start), the dataset listing, new rows, the drift query, a pinned run.
        job = parse_job(body)[0] if the_plan.needs else None
        for _ in range(4):
            if not the_plan.needs or job is None:
                break
            observed = await self.observer.observe(key, job, observed, the_plan.needs)
            the_plan = plan(observed, self.planner)
        await self._execute(key, body, old, the_plan)

    async def _read_heartbeat(self, key: Key, body: Mapping[str, Any], status: FineTuneJobStatus) -> None:
        current = status.current_run
        if current is None or current.result is not None:
            return
        job, _ = parse_job(body)
        if job is None:
            return
        try:
            beat = await self.heartbeats.read(job, current.number)
        except Exception as exc:  # S3 trouble must not stop reconciling
            self.metrics.heartbeat_read_errors.inc()
            # HeartbeatError messages name the object, never a credential; others only by type.
            text = str(exc) if isinstance(exc, HeartbeatError) else type(exc).__name__
            level = logging.DEBUG if self.beat_errors.get(key) == text else logging.WARNING
            self.beat_errors[key] = text
            log.log(level, "heartbeat of %s/%s run %d: %s", *key, current.number, text)
            return
        self.beat_errors.pop(key, None)
        if beat is not None:
            self.beats[key] = beat

    async def _execute(self, key: Key, body: Mapping[str, Any], old: FineTuneJobStatus, the_plan: Plan) -> None:
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
                await self._post(body, EventSpec("Warning", "PodCreateFailed", message))
                raise RetryLater(message, delay=30) from None
        stored = body.get("status")
        patch = status_patch(stored if isinstance(stored, Mapping) else old, the_plan.status)
        if patch is not None:
            await self._write_status(key, patch)
        for event in the_plan.events:
            await self._post(body, EventSpec(event.type, event.reason, event.message))
        self.observer.remember(key, the_plan.trigger_schedule)
        self._account(key, the_plan)
        if the_plan.requeue_after is not None:
            self.schedule(key, the_plan.requeue_after)

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
            await self._post(body, EventSpec("Warning", Reason.OUTPUT_UNAVAILABLE, message[:1024]))
            raise RetryLater(message, delay=30) from None

    async def _write_lineage(self, key: Key, body: Mapping[str, Any], the_plan: Plan) -> None:
        """What the plan records in storage before the status says so: the dataset listing a run
        starts with, ``promoted.json``, the lineage index. A failure aborts the plan (retried)."""
        job = the_plan.job
        if job is None or (the_plan.record_listing is None and the_plan.pointer is None and not the_plan.index):
            return
        try:
            listing = self.observer.listing(key)
            if the_plan.record_listing is not None and listing is not None:
                await self.outputs.write_listing(job, the_plan.record_listing, listing)
            if the_plan.pointer is not None:
                await self.outputs.write_pointer(job, the_plan.pointer)
            await self.outputs.append_index(job, the_plan.index)
        except (StorageError, StorageAccessError) as exc:
            message = f"cannot write the lineage under spec.output.uri {job.spec.output.uri}: {exc}; retrying"
            await self._post(body, EventSpec("Warning", Reason.OUTPUT_UNAVAILABLE, message[:1024]))
            raise RetryLater(message, delay=30) from None

    async def _post(self, body: Mapping[str, Any], event: EventSpec) -> None:
        try:
            await self.kube.post_event(body, event)
        except ApiError as exc:
            log.warning("could not post event %s: %s", event.reason, exc)

    def _account(self, key: Key, the_plan: Plan) -> None:
        status = the_plan.status
        self.metrics.jobs.set(*key, status.phase)
        self.metrics.job_series.set(*key, status)
        current = status.current_run
        if current is not None and current.result is None:
            self.active.add(key)
        else:
            self.active.discard(key)
            self.beats.pop(key, None)
        if the_plan.started_run is not None and current is not None:
            self.metrics.runs_started.labels(trigger=current.trigger).inc()
        if the_plan.finished is not None:
            result, reason = the_plan.finished
            # The finished run's record is the newest of status.runs (a Replace may already have started the next).
            record = status.runs[-1] if status.runs else None
            trigger: str = (
                record.trigger if record is not None else current.trigger if current is not None else "Created"
            )
            self.metrics.runs_finished.labels(trigger=trigger, result=result).inc()
            if result == "Succeeded":
                self.metrics.runs_succeeded.inc()
            else:
                self.metrics.runs_failed.labels(reason=reason).inc()
        for trigger, outcome in the_plan.trigger_counts:
            self.metrics.triggers.labels(trigger=trigger, outcome=outcome).inc()
            if outcome in SUPPRESSED_OUTCOMES:
                self.metrics.job_series.suppressed(*key, trigger)
        for decision in the_plan.promotions:
            self.metrics.promotions.labels(decision=decision).inc()
        if the_plan.retried:
            self.metrics.retries.inc()
        if the_plan.preempted:
            self.metrics.preemptions.inc()

    # -- deletion --

    async def delete_children(self, key: Key, body: Mapping[str, Any]) -> None:
        namespace, name = key
        for kind in ("Pod", "Service", "ConfigMap"):
            for obj in await self.kube.list_children(namespace, name, kind):
                await self.kube.delete(namespace, kind, str(obj["metadata"]["name"]))
        events, _ = plan_deletion(body)
        for event in events:
            await self._post(body, EventSpec(event.type, event.reason, event.message))
        self.forget(key)

    # -- ticker --

    async def tick_forever(self) -> None:
        """Read the heartbeat of every active run, every ``reconcile_interval`` seconds."""
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            for key in list(self.active):
                self.trigger(key, "timer", heartbeat=True)


def configure(settings: kopf.OperatorSettings, config: OperatorSettings) -> None:
    """Kopf settings, each for a reason."""
    # Our own finalizer name: `kubectl get -o yaml` shows who holds the object.
    settings.persistence.finalizer = FINALIZER
    # Kopf's handler progress and last-handled spec live in annotations under our domain, never
    # in .status (the CRD's strict status schema would prune them).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    # Silent watch stalls are Kopf's best-known failure: have the server end each watch and
    # the client give up on a silent connection, so a stalled stream is reopened.
    settings.watching.server_timeout = int(config.watch_timeout)
    settings.watching.client_timeout = int(config.watch_timeout) + 60
    settings.watching.connect_timeout = 30
    # A stream that stays open but silent (no event, no bookmark) is given up after this long and
    # reopened from its last resourceVersion; WatchStallCounter counts each time.
    settings.watching.inactivity_timeout = config.watch_inactivity_timeout
    settings.networking.request_timeout = 60
    # Watch only Tuneloop's pods, filtered by the server, not every pod of the cluster.
    settings.watching.label_selectors["v1", "pods"] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    # No limit on Kopf's per-object workers: a worker holds its slot for idle_timeout (5 s) after its
    # last event, so a limit of 64 made every 65th new job wait 5 s (bench/operator_scale.py: 5.2x
    # the direct baseline at 1,000 jobs with it). Concurrency towards the API server is bounded by
    # KubeClient's thread pool instead; idle workers are released after 1 s.
    settings.queueing.worker_limit = None
    settings.queueing.idle_timeout = 1.0
    # Kopf's own log lines become Events only from WARNING up; ours are posted explicitly.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "tuneloop-operator"
    # One replica (Recreate), no peering objects needed; docs/install.md says what more replicas take.
    settings.peering.standalone = True
    settings.peering.mandatory = False
    # Listed namespaces are served as named: no cluster-wide scan of namespaces and CRDs (Kopf's
    # observers), so the namespaced RBAC mode needs no cluster-scoped permission at all. The cost:
    # a change of the CRD's versions is noticed at the next start.
    settings.scanning.disabled = bool(config.namespaces)


def runtime_of(memo: Any) -> Runtime:
    runtime = getattr(memo, "runtime", None)
    if not isinstance(runtime, Runtime):
        raise kopf.PermanentError("the operator has not started (no runtime)")
    return runtime


@kopf.on.startup(id="startup")
async def startup(*, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    config = OperatorSettings.from_env()
    configure(settings, config)
    runtime = Runtime.create(config, KubeClient.from_environment())
    if config.metrics_port:
        runtime.metrics.serve(config.metrics_port)
    task = asyncio.create_task(runtime.tick_forever())
    runtime.tasks.add(task)
    stalls = WatchStallCounter(runtime.metrics.watch_stalls, logging.getLogger(WATCH_LOGGER).getEffectiveLevel())
    stalls.install()
    memo.runtime = runtime
    memo.watch_stalls = stalls
    log.info(
        "tuneloop operator started: trainer image %s, namespaces %s, metrics :%s",
        config.trainer_image,
        ",".join(config.namespaces) or "all",
        config.metrics_port or "off",
    )


@kopf.on.cleanup(id="cleanup")
async def cleanup(*, memo: Any, **_: Any) -> None:
    runtime = getattr(memo, "runtime", None)
    if isinstance(runtime, Runtime):
        for task in list(runtime.tasks):
            task.cancel()
        for handle in runtime.timers.values():
            handle.cancel()
        with contextlib.suppress(Exception):
            runtime.kube.close()
    stalls = getattr(memo, "watch_stalls", None)
    if isinstance(stalls, WatchStallCounter):
        stalls.uninstall()


@kopf.on.resume(GROUP, VERSION, PLURAL, id="resume")
@kopf.on.create(GROUP, VERSION, PLURAL, id="create")
@kopf.on.update(GROUP, VERSION, PLURAL, id="update")
async def on_change(*, namespace: str | None, name: str, memo: Any, reason: str, **_: Any) -> None:
    runtime = runtime_of(memo)
    try:
        await runtime.reconcile((namespace or "default", name), str(reason), heartbeat=str(reason) == "resume")
    except ApiError as exc:
        # The API server refused a read or a write (a 5xx, a 409 on the status, a 429): retried
        # soon, as the reconciles of pod events are, not after Kopf's 60 s default for an
        # unexpected error (which also logs a traceback for what is an everyday answer).
        runtime.metrics.reconcile_errors.inc()
        raise RetryLater(f"the API server answered {exc}", delay=max(RETRY_DELAY, exc.retry_after or 0.0)) from None


@kopf.on.event(GROUP, VERSION, PLURAL, id="track")
async def on_job_event(
    *,
    namespace: str | None,
    name: str,
    status: kopf.Status,
    annotations: Mapping[str, str],
    memo: Any,
    type: str,
    **_: Any,
) -> None:
    """Keep the jobs-by-phase gauge and the set of active runs current (no API calls), and act on
    a new request annotation (Kopf's update handler ignores annotation changes) and on an emptied status."""
    runtime = runtime_of(memo)
    key = (namespace or "default", name)
    if type == "DELETED":
        runtime.forget(key)
        return
    seen: Mapping[str, Any] = status or {}
    phase = seen.get("phase")
    runtime.metrics.jobs.set(*key, phase if isinstance(phase, str) else None)
    current = seen.get("currentRun")
    if isinstance(current, Mapping) and not current.get("result"):
        runtime.active.add(key)
    recorded = seen.get("observedGeneration") is not None
    if type == "MODIFIED" and unhandled_request(annotations, seen.get("annotations")):
        runtime.trigger(key, "annotation")
    elif type == "MODIFIED" and not recorded and key in runtime.recorded:
        # A status this operator had seen written was emptied: rebuild it now, not at the next
        # restart (Kopf's update handler ignores status changes; an idle job has no pod events).
        # A status never written yet is not a loss: the job's own reconcile is under way, and a
        # trigger per event would retry a refused pod create at every metadata change.
        runtime.trigger(key, "status-lost")
    if recorded:
        runtime.recorded.add(key)
    else:
        runtime.recorded.discard(key)


#: Request annotations and their keys in ``status.annotations`` (the value handled last).
REQUEST_ANNOTATIONS: Final = {
    ANNOTATION_RETRAIN: "retrain",
    ANNOTATION_APPROVE: "approve",
    ANNOTATION_REJECT: "reject",
}


def unhandled_request(annotations: Mapping[str, str], handled: Any) -> bool:
    """Whether a request annotation has a value the operator has not acted on yet."""
    done = handled if isinstance(handled, Mapping) else {}
    return any(
        isinstance(annotations.get(name), str) and annotations.get(name) != done.get(key)
        for name, key in REQUEST_ANNOTATIONS.items()
    )


@kopf.on.event("v1", "pods", labels={LABEL_MANAGED_BY: MANAGED_BY}, id="pods")
async def on_pod_event(
    *, type: str | None, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
) -> None:
    job = labels.get(LABEL_JOB)
    # ADDED is the pod this operator just created (the plan that created it is already recorded);
    # after a restart, the resume handler reconciles every job. Every later change counts.
    if job and namespace and type != "ADDED":
        runtime_of(memo).trigger((namespace, job), "pod")


@kopf.on.delete(GROUP, VERSION, PLURAL, id="delete")
async def on_delete(*, namespace: str | None, name: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    runtime = runtime_of(memo)
    key = (namespace or "default", name)
    async with runtime.lock(key):
        await runtime.delete_children(key, dict(body))
