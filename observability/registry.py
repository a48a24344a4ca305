"""The metrics the operator and the trainer really export, read from their own registries.

Both registries are built exactly as the processes build them (``OperatorMetrics()``, the
trainer's ``PrometheusSink`` without a server), so the reference and the PromQL checks follow the
code, never a list kept by hand.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from tuneloop_operator.datawatch import DataWatchStats
from tuneloop_operator.metrics import OperatorMetrics
from tuneloop_trainer.telemetry import PrometheusSink

Source = Literal["operator", "trainer"]

#: Series names Prometheus itself adds to every target.
PROMETHEUS_SERIES: Final = frozenset({"up"})

#: The series a family of each type is exposed as (the OpenMetrics suffixes prometheus_client adds).
_SUFFIXES: Final[dict[str, tuple[str, ...]]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}
#: Labels Prometheus' histogram and summary series carry beyond the declared ones.
_IMPLICIT_LABELS: Final[dict[str, tuple[str, ...]]] = {"histogram": ("le",), "summary": ("quantile",)}


@dataclass(frozen=True)
class Family:
    """One metric family as exported: name (without a series suffix), type, labels, help."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str
    source: Source

    @property
    def series(self) -> tuple[str, ...]:
        """The names a PromQL expression can select this family by."""
        return tuple(self.name + suffix for suffix in _SUFFIXES.get(self.type, ("",)))

    @property
    def series_labels(self) -> tuple[str, ...]:
        """The labels of its series (``le`` for a histogram's buckets, and so on)."""
        return self.labels + _IMPLICIT_LABELS.get(self.type, ())


def _families(registry: CollectorRegistry, source: Source) -> list[Family]:
    """Every family of ``registry`` with its declared label names.

    A labelled metric with no child yet exports no sample, so its labels cannot be read from a
    scrape: they come from the metric objects themselves (prometheus_client keeps them on the
    wrapper and on each ``*MetricFamily``; the registry's collector map is the only way to reach the
    wrappers; prometheus-client is pinned in constraints.txt). Failing both, from the samples.
    """
    found: dict[str, Family] = {}
    collectors: Iterable[object] = list(registry._collector_to_names)
    for collector in collectors:
        declared: tuple[str, ...] | None = None
        if isinstance(collector, MetricWrapperBase):
            declared = tuple(collector._labelnames)
        for metric in collector.collect():  # type: ignore[attr-defined]
            labels = declared
            if labels is None and hasattr(metric, "_labelnames"):  # a *MetricFamily of a custom collector
                labels = tuple(metric._labelnames)
            if labels is None:
                seen: list[str] = []
                for sample in metric.samples:
                    for label in sample.labels:
                        if label not in seen and label not in _IMPLICIT_LABELS.get(metric.type, ()):
                            seen.append(label)
                labels = tuple(seen)
            found[metric.name] = Family(metric.name, metric.type, labels, metric.documentation, source)
    return sorted(found.values(), key=lambda f: f.name)


def operator_families() -> list[Family]:
    """The operator's families (``tuneloop_operator_*``), as ``OperatorMetrics()`` registers them."""
    metrics = OperatorMetrics()
    metrics.watch_data(DataWatchStats())  # what the operator's Observer registers at start
    return _families(metrics.registry, "operator")


def trainer_families() -> list[Family]:
    """The trainer's families (``tuneloop_trainer_*``), as its ``PrometheusSink`` registers them."""
    sink = PrometheusSink(port=None, job="reference", run=1)
    try:
        return _families(sink.registry, "trainer")
    finally:
        sink.close()


def all_families() -> list[Family]:
    """The operator's families, then the trainer's."""
    return operator_families() + trainer_families()


def exported_series() -> dict[str, Family]:
    """Every series name a PromQL expression may use, with the family it belongs to."""
    return {series: family for family in all_families() for series in family.series}
