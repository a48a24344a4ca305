"""Kopf handlers: thin. Every trigger ends in :meth:`~tuneloop_operator.runtime.Runtime.reconcile`,
which observes the job (one GET, three LISTs by label), asks :func:`tuneloop_operator.planner.plan`
what to do, and carries the plan out through :mod:`tuneloop_operator.kube`. Kopf's settings are
in :mod:`tuneloop_operator.kopfsetup`.

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

import logging
from collections.abc import Mapping
from typing import Any, Final

import kopf

from tuneloop.api import GROUP, PLURAL, VERSION
from tuneloop_operator.executor import RetryLater
from tuneloop_operator.kopfsetup import WATCH_LOGGER, WatchStallCounter, configure
from tuneloop_operator.kube import ApiError, KubeClient
from tuneloop_operator.promotion import ANNOTATION_APPROVE, ANNOTATION_REJECT
from tuneloop_operator.render import LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY
from tuneloop_operator.runtime import Runtime
from tuneloop_operator.settings import OperatorSettings
from tuneloop_operator.triggers import ANNOTATION_RETRAIN
from tuneloop_operator.workqueue import retry_delay

log = logging.getLogger("tuneloop_operator")


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
    runtime.queue.spawn(runtime.tick_forever())
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
        runtime.close()
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
        raise RetryLater(f"the API server answered {exc}", delay=retry_delay(exc)) from None


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
        runtime.runs.track(key, active=True)
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
    await runtime_of(memo).delete((namespace or "default", name), dict(body))
