"""The operator's Prometheus metrics (``tuneloop_operator_*``), in a registry of their own.

Two kinds: operator-wide counters and histograms (runs, retries, reconciles, triggers...), and
per-job series (``tuneloop_operator_job_*``, labels ``namespace`` and ``finetunejob``) computed
from the status each reconcile of the job ends with, for alerts and dashboards that name the job.
The per-job series of a deleted job disappear with it; none carries a run or attempt label, so a
job costs a bounded number of series however often it retrains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from threading import Lock
from typing import Any, Final, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tuneloop.api.status import FineTuneJobStatus, Phase
from tuneloop_operator.planner import Plan

PHASES: Final[tuple[Phase, ...]] = get_args(Phase)
#: Phases in which the job's trainer is expected to write heartbeats.
TRAINER_PHASES: Final[frozenset[str]] = frozenset({"Validating", "Running", "Evaluating"})
#: Trigger outcomes that did not start a run when they fired (waiting, or joined one waiting).
SUPPRESSED_OUTCOMES: Final[frozenset[str]] = frozenset({"queued", "coalesced"})
JOB_LABELS: Final = ("namespace", "finetunejob")


class _JobsByPhase(Collector):
    """``tuneloop_operator_jobs{phase}``: jobs the operator knows, by phase (every phase reported,
    zeros included, so a dashboard never shows a gap)."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = Lock()

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            self._phases[(namespace, name)] = phase or "Pending"

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("tuneloop_operator_jobs", "FineTuneJobs by phase.", labels=["phase"])
        with self._lock:
            counts: dict[str, int] = dict.fromkeys(PHASES, 0)
            for phase in self._phases.values():
                counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


def _latest(*times: datetime | None) -> datetime | None:
    known = [t for t in times if t is not None]
    return max(known) if known else None


@dataclass(frozen=True)
class JobSnapshot:
    """What the per-job series say about one job, taken from its status."""

    phase: str
    conditions: tuple[tuple[str, str, str], ...] = ()
    """``(type, status, reason)`` of each condition."""
    current_run: int | None = None
    promoted_run: int | None = None
    progress_ratio: float | None = None
    """Steps done / steps planned of the active run, once the trainer said both."""
    alive_since: datetime | None = None
    """While the trainer of an active run is expected to write heartbeats: the later of its latest
    heartbeat and the start of the current attempt (a new attempt starts the clock again)."""
    awaiting_since: datetime | None = None
    """Since when a candidate waits for approval."""

    @classmethod
    def of(cls, status: FineTuneJobStatus) -> JobSnapshot:
        phase = status.phase or "Pending"
        current = status.current_run
        active = current is not None and current.result is None
        ratio = None
        alive_since = None
        if current is not None and active:
            progress = current.progress
            if progress is not None and progress.total_steps:
                ratio = min(1.0, progress.step / progress.total_steps)
            if phase in TRAINER_PHASES and current.retry_after is None and current.suspended_since is None:
                attempt = current.history[-1].start_time if current.history else None
                beat = progress.last_updated_time if progress is not None else None
                alive_since = _latest(beat, attempt, current.start_time)
        awaiting = status.awaiting_approval
        awaiting_since = None
        if awaiting is not None:
            promoted = next((c for c in status.conditions if c.type == "Promoted"), None)
            awaiting_since = awaiting.since or (promoted.last_transition_time if promoted is not None else None)
        return cls(
            phase=phase,
            conditions=tuple((c.type, c.status, c.reason) for c in status.conditions),
            current_run=current.number if current is not None else None,
            promoted_run=status.promoted.run if status.promoted is not None else None,
            progress_ratio=ratio,
            alive_since=alive_since,
            awaiting_since=awaiting_since,
        )


class _JobSeries(Collector):
    """``tuneloop_operator_job_*``: one job's state as of its latest reconcile.

    Ages are computed when scraped, from the times in the status (the heartbeat's own
    ``lastUpdatedTime``, the attempt's start, ``awaitingApproval.since``)."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self._jobs: dict[tuple[str, str], JobSnapshot] = {}
        self._suppressed: dict[tuple[str, str], dict[str, int]] = {}
        self._lock = Lock()

    def set(self, namespace: str, name: str, status: FineTuneJobStatus) -> None:
        snapshot = JobSnapshot.of(status)
        with self._lock:
            self._jobs[(namespace, name)] = snapshot

    def suppressed(self, namespace: str, name: str, trigger: str) -> None:
        """A trigger of the job fired and did not start a run (queued or coalesced)."""
        with self._lock:
            counts = self._suppressed.setdefault((namespace, name), {})
            counts[trigger] = counts.get(trigger, 0) + 1

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._jobs.pop((namespace, name), None)
            self._suppressed.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        def gauge(name: str, doc: str, *extra: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"tuneloop_operator_job_{name}", doc, labels=[*JOB_LABELS, *extra])

        phase = gauge("phase", "1 for the job's current phase, 0 for the others.", "phase")
        condition = gauge(
            "condition", "1 for each condition of the job, with its status and reason.", "condition", "status", "reason"
        )
        current_run = gauge("current_run", "Number of the job's current (or latest) run.")
        promoted_run = gauge("promoted_run", "Run whose model is promoted; absent while none is.")
        progress = gauge("progress_ratio", "Steps done / steps planned of the active run (0..1).")
        heartbeat = gauge(
            "heartbeat_age_seconds",
            "While the active run's trainer should be writing heartbeats (phase Validating, Running, "
            "Evaluating): seconds since the latest heartbeat the operator read, or since the current "
            "attempt started if later.",
        )
        awaiting = gauge("awaiting_approval_seconds", "Seconds a candidate has waited for approval; absent otherwise.")
        suppressed = CounterMetricFamily(
            "tuneloop_operator_job_triggers_suppressed",
            "Retraining triggers of the job that fired without starting a run (queued behind the active run "
            "or the cooldown, or coalesced into one already waiting), by trigger.",
            labels=[*JOB_LABELS, "trigger"],
        )
        now = self.clock()
        with self._lock:
            jobs = sorted(self._jobs.items())
            counts = sorted((key, dict(value)) for key, value in self._suppressed.items())
        for (namespace, name), job in jobs:
            labels = [namespace, name]
            for each in PHASES:
                phase.add_metric([*labels, each], 1.0 if job.phase == each else 0.0)
            for type_, status, reason in job.conditions:
                condition.add_metric([*labels, type_, status, reason], 1.0)
            if job.current_run is not None:
                current_run.add_metric(labels, job.current_run)
            if job.promoted_run is not None:
                promoted_run.add_metric(labels, job.promoted_run)
            if job.progress_ratio is not None:
                progress.add_metric(labels, job.progress_ratio)
            if job.alive_since is not None:
                heartbeat.add_metric(labels, max(0.0, (now - job.alive_since).total_seconds()))
            if job.awaiting_since is not None:
                awaiting.add_metric(labels, max(0.0, (now - job.awaiting_since).total_seconds()))
        for (namespace, name), by_trigger in counts:
            for trigger, count in sorted(by_trigger.items()):
                suppressed.add_metric([namespace, name, trigger], count)
        yield from (phase, condition, current_run, promoted_run, progress, heartbeat, awaiting, suppressed)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _DataWatchCounters(Collector):
    def __init__(self, stats: Any) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, attr, doc in (
            ("dataset_listings", "listings", "Listings of dataset prefixes made (shared by jobs on one prefix)."),
            ("dataset_listings_shared", "shared", "Listing requests served by a shared listing."),
            ("dataset_objects_read", "objects_read", "Objects read to count new rows (Parquet: footers)."),
            ("dataset_bytes_read", "bytes_read", "Bytes read to count new rows."),
        ):
            family = CounterMetricFamily(f"tuneloop_operator_{name}", doc)
            family.add_metric([], float(getattr(self.stats, attr, 0)))
            yield family


class OperatorMetrics:
    """Every metric the operator exports."""

    def __init__(self, registry: CollectorRegistry | None = None, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = _JobsByPhase()
        r.register(self.jobs)
        self.job_series = _JobSeries(clock)
        r.register(self.job_series)
        self.runs_started = Counter(
            "tuneloop_operator_runs_started", "Runs started, by trigger.", ["trigger"], registry=r
        )
        self.runs_succeeded = Counter("tuneloop_operator_runs_succeeded", "Runs that succeeded.", registry=r)
        self.runs_failed = Counter(
            "tuneloop_operator_runs_failed", "Runs that failed, by reason.", ["reason"], registry=r
        )
        self.runs_finished = Counter(
            "tuneloop_operator_runs_finished",
            "Runs that ended, by what started them (Created, SpecChange, NewData, Drift, Schedule, Manual) and "
            "result (Succeeded, Failed, GateFailed, Superseded, Cancelled).",
            ["trigger", "result"],
            registry=r,
        )
        self.retries = Counter(
            "tuneloop_operator_retries", "Attempts retried after a retryable trainer failure.", registry=r
        )
        self.preemptions = Counter(
            "tuneloop_operator_preemptions", "Attempts lost to preemption, eviction or node failure.", registry=r
        )
        self.reconcile_duration = Histogram(
            "tuneloop_operator_reconcile_duration_seconds",
            "Time to reconcile one FineTuneJob, by what triggered it.",
            ["trigger"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.reconcile_errors = Counter(
            "tuneloop_operator_reconcile_errors", "Reconciles that failed and will be retried.", registry=r
        )
        self.heartbeat_read_errors = Counter(
            "tuneloop_operator_heartbeat_read_errors", "Failed reads of a trainer heartbeat from S3.", registry=r
        )
        self.triggers = Counter(
            "tuneloop_operator_triggers",
            "Retraining triggers, by trigger and outcome: fired (a run started), queued (waits for the active "
            "run or the cooldown), coalesced (joined one already waiting), skipped (looked, no reason to run), "
            "error (could not look).",
            ["trigger", "outcome"],
            registry=r,
        )
        self.promotions = Counter(
            "tuneloop_operator_promotions",
            "Promotion decisions: Promoted, NotPromoted, AwaitingApproval, Rejected.",
            ["decision"],
            registry=r,
        )
        self.drift_queries = Counter(
            "tuneloop_operator_drift_queries", "PromQL queries made by drift triggers.", registry=r
        )
        self.watch_stalls = Counter(
            "tuneloop_operator_watch_stalls",
            "Watch streams that stayed silent longer than TUNELOOP_WATCH_INACTIVITY_TIMEOUT and were reopened, "
            "by resource (finetunejobs, pods).",
            ["resource"],
            registry=r,
        )

    def record_plan(self, namespace: str, name: str, plan: Plan) -> None:
        """Count what a reconcile of the job carried out: its phase and series, the runs it
        started and finished, the triggers, promotions, retries and preemptions."""
        status = plan.status
        self.jobs.set(namespace, name, status.phase)
        self.job_series.set(namespace, name, status)
        current = status.current_run
        if plan.started_run is not None and current is not None:
            self.runs_started.labels(trigger=current.trigger).inc()
        if plan.finished is not None:
            result, reason = plan.finished
            # The finished run's record is the newest of status.runs (a Replace may already have started the next).
            record = status.runs[-1] if status.runs else None
            trigger: str = (
                record.trigger if record is not None else current.trigger if current is not None else "Created"
            )
            self.runs_finished.labels(trigger=trigger, result=result).inc()
            if result == "Succeeded":
                self.runs_succeeded.inc()
            else:
                self.runs_failed.labels(reason=reason).inc()
        for trigger, outcome in plan.trigger_counts:
            self.triggers.labels(trigger=trigger, outcome=outcome).inc()
            if outcome in SUPPRESSED_OUTCOMES:
                self.job_series.suppressed(namespace, name, trigger)
        for decision in plan.promotions:
            self.promotions.labels(decision=decision).inc()
        if plan.retried:
            self.retries.inc()
        if plan.preempted:
            self.preemptions.inc()

    def forget(self, namespace: str, name: str) -> None:
        """Drop the job's series (it was deleted)."""
        self.jobs.forget(namespace, name)
        self.job_series.forget(namespace, name)

    def watch_data(self, stats: Any) -> None:
        """Export a DataWatch's counters (``tuneloop_operator_dataset_*``) from its own stats:
        listings actually made (jobs on one prefix share them), listings shared, objects and
        bytes read to count rows."""
        self.registry.register(_DataWatchCounters(stats))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from other pods
        start_http_server(port, addr=addr, registry=self.registry)
