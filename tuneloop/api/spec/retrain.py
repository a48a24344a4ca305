"""When Tuneloop starts a new run by itself: ``spec.retrain`` (spec changes, new data, drift,
a schedule) and its cooldown and concurrency policy."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from tuneloop.api.types import ApiModel, CronExpression, Duration, Endpoint, TimeZone


class NewDataTrigger(ApiModel):
    """Retrain when enough new rows land under ``dataset.uri``."""

    enabled: bool = True
    """Watch for new data."""
    min_new_samples: Annotated[int, Field(ge=1)] = 500
    """New rows needed to start a run: rows of the objects added or changed under
    ``dataset.uri`` since the listing the last run trained on (unchanged objects are never
    downloaded or counted again)."""
    poll_interval: Duration = "5m"
    """How often the data prefix is listed (spread over the interval, so that many jobs do not
    list at the same moment)."""
    settle_period: Duration = "2m"
    """The listing must stay unchanged this long before new rows are counted and a run starts:
    a burst of uploads becomes one run."""


class PrometheusDrift(ApiModel):
    """A PromQL query whose value signals drift."""

    url: Endpoint
    """Prometheus base URL, e.g. ``http://prometheus.monitoring:9090``."""
    query: Annotated[str, Field(min_length=1, max_length=4096)]
    """PromQL returning one number, e.g. a drift score or a live accuracy."""
    threshold: float
    """Drift when the value crosses this. The query must return one number (a scalar, or a
    vector of exactly one sample); anything else is reported in the status, never a run."""
    direction: Literal["above", "below"] = "above"
    """Drift when the value is ``above`` (a drift score) or ``below`` (a live accuracy) the threshold."""
    for_: Annotated[Duration, Field(alias="for")] = "10m"
    """How long the condition must hold, in every query, before a run starts (one value on the
    other side of the threshold starts the wait again)."""
    poll_interval: Duration = "1m"
    """How often the query runs."""


class DriftTrigger(ApiModel):
    """Retrain when monitoring reports drift."""

    prometheus: PrometheusDrift
    """Prometheus query."""


class Retrain(ApiModel):
    """When Tuneloop starts a new run by itself. Every run is evaluated and promoted only
    if it passes ``promotion``."""

    on_spec_change: bool = True
    """A new ``metadata.generation`` (a GitOps sync, a ``kubectl apply``) whose training-relevant
    spec differs starts a new run (see ``concurrencyPolicy`` while one is active)."""
    on_new_data: NewDataTrigger | None = None
    """Retrain when enough new rows land under ``dataset.uri`` (trigger ``NewData``)."""
    on_drift: DriftTrigger | None = None
    """Retrain when a Prometheus query reports drift (trigger ``Drift``)."""
    schedule: CronExpression | None = None
    """Retrain on a cron schedule, e.g. ``0 3 * * 0`` (in ``timeZone``, UTC by default)."""
    time_zone: TimeZone | None = None
    """IANA time zone of ``schedule``, e.g. ``Europe/Berlin`` (as a CronJob's ``timeZone``)."""
    starting_deadline: Duration = "1h"
    """A scheduled start missed by more than this (the operator was down) is skipped, not run
    late; of several missed starts at most the latest runs."""
    cooldown: Duration = "1h"
    """Least time between the starts of two automatic runs (new data, drift, schedule).
    Triggers that arrive sooner, or while a run is active, are coalesced into one follow-up run
    that starts when the cooldown ends; a spec change or a manual request is not held back."""
    concurrency_policy: Literal["Queue", "Replace"] = "Queue"
    """What a spec change does while a run is active: ``Queue`` trains the new spec in the next
    run, after the active one ends; ``Replace`` stops the active run (its pods are deleted,
    checkpoints kept) and starts the new spec at once."""
