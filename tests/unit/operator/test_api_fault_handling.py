"""How the operator takes API-server faults (issue #13, scenario 4): regression tests of what
``tests/reliability/test_api_faults.py`` found, each on its own."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf
import pytest

from tuneloop_operator import executor, kopfsetup
from tuneloop_operator.executor import RetryLater
from tuneloop_operator.handlers import on_change
from tuneloop_operator.kopfsetup import WatchStallCounter, configure
from tuneloop_operator.kube import ApiError, _retry_after
from tuneloop_operator.metrics import OperatorMetrics
from tuneloop_operator.observe import Observer
from tuneloop_operator.runtime import Runtime
from tuneloop_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit


class FakeKube:
    """Answers status patches with the given errors, then succeeds; counts the tries."""

    def __init__(self, *errors: ApiError) -> None:
        self.errors = list(errors)
        self.patches: list[tuple[str, str, Any]] = []

    async def patch_job_status(self, namespace: str, name: str, patch: Any) -> None:
        self.patches.append((namespace, name, patch))
        if self.errors:
            raise self.errors.pop(0)

    async def get_job(self, namespace: str, name: str) -> None:
        raise ApiError(503, "ServiceUnavailable", "try later", retry_after=12)


def runtime(kube: Any) -> Runtime:
    metrics = OperatorMetrics()
    return Runtime(
        settings=OperatorSettings(),
        kube=kube,
        metrics=metrics,
        heartbeats=None,  # type: ignore[arg-type]
        outputs=None,  # type: ignore[arg-type]
        observer=Observer(None, metrics),  # type: ignore[arg-type]
    )


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "STATUS_WRITE_RETRIES", (0.0, 0.0, 0.0))


def test_a_status_write_refused_for_a_passing_reason_is_tried_again() -> None:
    kube = FakeKube(ApiError(409, "Conflict", "x"), ApiError(500, "InternalError", "x"), ApiError(422, "Invalid", "x"))
    asyncio.run(runtime(kube).executor._write_status(("ns", "job"), {"phase": "Running"}))
    assert len(kube.patches) == 4  # three refusals, then written: the status is not left to a guess


def test_a_status_write_refused_for_good_is_not_repeated() -> None:
    kube = FakeKube(ApiError(403, "Forbidden", "no"))
    with pytest.raises(ApiError):
        asyncio.run(runtime(kube).executor._write_status(("ns", "job"), {"phase": "Running"}))
    assert len(kube.patches) == 1


def test_a_status_write_gives_up_after_its_tries() -> None:
    kube = FakeKube(*[ApiError(503, "ServiceUnavailable", "x")] * 10)
    with pytest.raises(ApiError):
        asyncio.run(runtime(kube).executor._write_status(("ns", "job"), {}))
    assert len(kube.patches) == 4


def test_an_api_error_in_a_kopf_handler_is_a_quick_temporary_retry() -> None:
    """Not an unexpected error: Kopf would log a traceback and retry after 60 s."""
    rt = runtime(FakeKube())
    memo = kopf.Memo()
    memo.runtime = rt
    with pytest.raises(RetryLater) as info:
        asyncio.run(on_change(namespace="ns", name="job", memo=memo, reason="create"))  # type: ignore[arg-type,call-arg]
    assert isinstance(info.value, kopf.TemporaryError)
    assert info.value.delay == 12  # the server's Retry-After, longer than the usual 5 s
    assert "503 ServiceUnavailable" in str(info.value)


def test_retry_after_is_read_from_the_header_or_the_status() -> None:
    assert _retry_after({"Retry-After": "3"}, {}) == 3.0
    assert _retry_after({}, {"details": {"retryAfterSeconds": 7}}) == 7.0
    assert _retry_after({}, {"details": {}}) is None
    assert _retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, None) is None


def test_watch_stalls_are_counted_by_resource_without_showing_debug_lines(caplog: pytest.LogCaptureFixture) -> None:
    metrics = OperatorMetrics()
    counter = WatchStallCounter(metrics.watch_stalls, logging.INFO)
    counter.install()
    try:
        logger = logging.getLogger(kopfsetup.WATCH_LOGGER)
        with caplog.at_level(logging.INFO):
            # Kopf's own words (kopf/_cogs/clients/watching.py), for a namespaced and a cluster-wide watch.
            logger.debug("Watch-stream for finetunejobs.v1alpha1.tuneloop.dev in 'ml' is inactive, reconnecting.")
            logger.debug("Watch-stream for pods.v1 cluster-wide is inactive, reconnecting.")
            logger.debug("Watch-stream for pods.v1 cluster-wide is inactive, reconnecting.")
            logger.debug("Starting the watch-stream for pods.v1 cluster-wide.")
            logger.warning("something else")
    finally:
        counter.uninstall()
    assert metrics.watch_stalls.labels(resource="finetunejobs")._value.get() == 1
    assert metrics.watch_stalls.labels(resource="pods")._value.get() == 2
    assert [r.getMessage() for r in caplog.records if r.name == kopfsetup.WATCH_LOGGER] == ["something else"]


def test_the_inactivity_timeout_is_a_setting_kopf_gets() -> None:
    config = OperatorSettings.from_env({"TUNELOOP_WATCH_INACTIVITY_TIMEOUT": "15"})
    assert OperatorSettings.from_env({}).watch_inactivity_timeout == 70.0
    settings = kopf.OperatorSettings()
    configure(settings, config)
    assert settings.watching.inactivity_timeout == 15.0


def test_a_run_adopted_after_its_status_write_was_lost_keeps_its_trigger_detail() -> None:
    from tests.unit.operator.planner_helpers import World

    w = World()
    w.reconcile()  # run 1 starts: pods created, status recorded
    recorded = w.status.current_run
    assert recorded is not None and recorded.trigger_detail == "the job was created"
    w.body.pop("status")  # as if the status patch after creating the pods had failed
    w.reconcile()
    adopted = w.status.current_run
    assert adopted is not None and adopted.number == 1
    assert (adopted.trigger, adopted.trigger_detail) == ("Created", "the job was created")
