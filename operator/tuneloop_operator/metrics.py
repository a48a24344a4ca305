"""The operator's Prometheus metrics (``tuneloop_operator_*``), in a registry of their own."""

from __future__ import annotations

from collections.abc import Iterator
from threading import Lock
from typing import Any, Final, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tuneloop.api.status import Phase

PHASES: Final[tuple[Phase, ...]] = get_args(Phase)


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

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = _JobsByPhase()
        r.register(self.jobs)
        self.runs_started = Counter(
            "tuneloop_operator_runs_started", "Runs started, by trigger.", ["trigger"], registry=r
        )
        self.runs_succeeded = Counter("tuneloop_operator_runs_succeeded", "Runs that succeeded.", registry=r)
        self.runs_failed = Counter(
            "tuneloop_operator_runs_failed", "Runs that failed, by reason.", ["reason"], registry=r
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

    def watch_data(self, stats: Any) -> None:
        """Export a DataWatch's counters (``tuneloop_operator_dataset_*``) from its own stats:
        listings actually made (jobs on one prefix share them), listings shared, objects and
        bytes read to count rows."""
        self.registry.register(_DataWatchCounters(stats))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from other pods
        start_http_server(port, addr=addr, registry=self.registry)
