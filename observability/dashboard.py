"""The Tuneloop Grafana dashboard, as code (grafana-foundation-sdk, Grafana 11.6 schema).

``python -m observability`` writes it to ``helm/tuneloop/dashboards/tuneloop.json``, which the
chart ships as a ConfigMap for Grafana's dashboard sidecar. Edit this file, never the JSON.

Label conventions the queries rely on (see docs/observability.md, "Scraping"):

- Operator per-job gauges carry ``namespace`` and ``finetunejob`` themselves (the ServiceMonitor
  keeps them with ``honorLabels: true``); the operator's counters and histograms are
  operator-wide, so they are never filtered by the job variables.
- Trainer series carry ``finetunejob`` and ``run``; ``namespace`` (and ``pod``) are the target
  labels the PodMonitor adds.

Counters are shown as ``increase`` over ``$__range`` (how many in the selected time range) or
``$__rate_interval`` (over time); a rate window is always a dashboard variable, so a test can
shorten it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final, TypeVar

from grafana_foundation_sdk.builders import bargauge, stat, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

UID: Final = "tuneloop-overview"
TITLE: Final = "Tuneloop"
DATASOURCE: Final = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The job filter every per-job query applies.
JOB: Final = 'namespace=~"$namespace", finetunejob=~"$finetunejob"'
#: The series the job variables are read from: every job the operator knows has one per phase.
JOB_SERIES: Final = "tuneloop_operator_job_phase"
LEGEND_JOB: Final = "{{namespace}}/{{finetunejob}}"
LEGEND_RUN: Final = "{{namespace}}/{{finetunejob}} run {{run}}"
BY_JOB: Final = "namespace, finetunejob"


@dataclass(frozen=True)
class Query:
    """One panel query: the PromQL, its legend, and whether Grafana evaluates it once (instant)."""

    expr: str
    legend: str = ""
    instant: bool = False

    def build(self, ref_id: str) -> prom.Dataquery:
        query = prom.Dataquery().expr(self.expr).ref_id(ref_id).datasource(DATASOURCE)
        if self.legend:
            query = query.legend_format(self.legend)
        return query.instant() if self.instant else query.range()


Panel = TypeVar("Panel", timeseries.Panel, bargauge.Panel, stat.Panel)


def _panel(
    panel: Panel, title: str, description: str, unit: str, queries: tuple[Query, ...], *, w: int, h: int
) -> Panel:
    """What every panel has: title, description, data source, unit, size, and its queries (A, B...)."""
    panel.title(title).description(description).datasource(DATASOURCE).unit(unit).span(w).height(h)
    for i, query in enumerate(queries):
        panel.with_target(query.build(chr(ord("A") + i)))
    return panel


def series(title: str, description: str, unit: str, *queries: Query, w: int = 12, h: int = 8) -> timeseries.Panel:
    """A time series panel."""
    panel = _panel(timeseries.Panel(), title, description, unit, queries, w=w, h=h)
    return panel.line_width(1).fill_opacity(10)


def bars(title: str, description: str, unit: str, *queries: Query, w: int = 8, h: int = 7) -> bargauge.Panel:
    """A horizontal bar gauge: one bar per series, at the end of the time range."""
    panel = _panel(bargauge.Panel(), title, description, unit, queries, w=w, h=h)
    return (
        panel.min(0)
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.BASIC)
        .show_unfilled(True)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def stats(title: str, description: str, unit: str, *queries: Query, w: int = 6, h: int = 7) -> stat.Panel:
    """A stat panel: one big number per series, its latest value."""
    panel = _panel(stat.Panel(), title, description, unit, queries, w=w, h=h)
    return (
        panel.graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )


def _variables() -> list[Builder[model.VariableModel]]:
    datasource = db.DatasourceVariable("datasource").label("Data source").type("prometheus")
    namespace = (
        db.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query(f"label_values({JOB_SERIES}, namespace)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    finetunejob = (
        db.QueryVariable("finetunejob")
        .label("FineTuneJob")
        .datasource(DATASOURCE)
        .query(f'label_values({JOB_SERIES}{{namespace=~"$namespace"}}, finetunejob)')
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    return [datasource, namespace, finetunejob]


def _quantiles(metric: str, by: str, selector: str = "") -> tuple[Query, ...]:
    """p50/p90/p99 of a histogram over ``$__rate_interval``."""
    legend_prefix = "".join(f"{{{{{label.strip()}}}}} " for label in by.split(",") if label.strip())
    group = f"le, {by}" if by else "le"
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}[$__rate_interval])))",
            f"{legend_prefix}p{round(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    )


def _mean(metric: str, selector: str, legend: str) -> Query:
    """The mean observation of a histogram over ``$__rate_interval``, per job."""
    return Query(
        f"sum by ({BY_JOB}) (rate({metric}_sum{selector}[$__rate_interval]))"
        f" / sum by ({BY_JOB}) (rate({metric}_count{selector}[$__rate_interval]))",
        legend,
    )


def build() -> model.Dashboard:
    """The dashboard model."""
    job = f"{{{JOB}}}"
    board = (
        db.Dashboard(TITLE)
        .uid(UID)
        .description("FineTuneJobs, their runs and training, and the Tuneloop operator.")
        .tags(["tuneloop", "fine-tuning", "kubernetes"])
        .editable()
        .time("now-6h", "now")
        .refresh("30s")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .timezone("browser")
        .variables(_variables())
        .with_row(db.Row("Jobs"))
        .with_panel(
            bars(
                "Jobs by phase",
                "FineTuneJobs the operator knows, by phase (filtered by the namespace and job variables).",
                "none",
                Query(f"sum by (phase) ({JOB_SERIES}{job})", "{{phase}}", instant=True),
            )
        )
        .with_panel(
            stats(
                "Promoted model (run) per job",
                "The run whose model is promoted (no value for a job with none promoted yet).",
                "none",
                Query(f"max by ({BY_JOB}) (tuneloop_operator_job_promoted_run{job})", LEGEND_JOB, instant=True),
                w=8,
            )
        )
        .with_panel(
            stats(
                "Current run per job",
                "The number of the job's latest run.",
                "none",
                Query(f"max by ({BY_JOB}) (tuneloop_operator_job_current_run{job})", LEGEND_JOB, instant=True),
                w=8,
            )
        )
        .with_panel(
            series(
                "Heartbeat age",
                "Seconds since the running trainer last wrote its heartbeat (status.json) to object storage.",
                "s",
                Query(f"tuneloop_operator_job_heartbeat_age_seconds{job}", LEGEND_JOB),
            )
        )
        .with_panel(
            series(
                "Awaiting approval",
                "How long a candidate model has waited for a person's approval (0: nothing waits).",
                "s",
                # 0 for every known job that waits for nothing (the series exists only while one waits).
                Query(
                    f"max by ({BY_JOB}) (tuneloop_operator_job_awaiting_approval_seconds{job})"
                    f" or 0 * max by ({BY_JOB}) ({JOB_SERIES}{job})",
                    LEGEND_JOB,
                ),
            )
        )
        .with_row(db.Row("Runs, triggers and promotion (all jobs)"))
        .with_panel(
            bars(
                "Runs by trigger and result",
                "Runs that ended in the time range, by what started them and how they ended.",
                "none",
                Query(
                    "sum by (trigger, result) (increase(tuneloop_operator_runs_finished_total[$__range]))",
                    "{{trigger}} {{result}}",
                    instant=True,
                ),
            )
        )
        .with_panel(
            bars(
                "Triggers by outcome",
                "Retraining triggers in the time range: fired, queued, coalesced, skipped or error.",
                "none",
                Query(
                    # 0 rather than "no data" while no trigger has fired since the operator started.
                    "sum by (trigger, outcome) (increase(tuneloop_operator_triggers_total[$__range])) or vector(0)",
                    "{{trigger}} {{outcome}}",
                    instant=True,
                ),
            )
        )
        .with_panel(
            bars(
                "Promotion decisions",
                "Promotion decisions in the time range.",
                "none",
                Query(
                    "sum by (decision) (increase(tuneloop_operator_promotions_total[$__range]))",
                    "{{decision}}",
                    instant=True,
                ),
            )
        )
        .with_panel(
            series(
                "Runs started",
                "Runs started, by trigger.",
                "none",
                Query(
                    "sum by (trigger) (increase(tuneloop_operator_runs_started_total[$__rate_interval]))", "{{trigger}}"
                ),
            )
        )
        .with_panel(
            series(
                "Retries and preemptions",
                "Attempts retried after a retryable trainer failure, and attempts lost to preemption, "
                "eviction or node failure.",
                "none",
                Query("sum(increase(tuneloop_operator_retries_total[$__rate_interval]))", "retries"),
                Query("sum(increase(tuneloop_operator_preemptions_total[$__rate_interval]))", "preemptions"),
            )
        )
        .with_row(db.Row("Training"))
        .with_panel(
            series(
                "Training loss",
                "Loss of the latest optimizer step.",
                "none",
                Query(f"tuneloop_trainer_loss{job}", LEGEND_RUN),
            )
        )
        .with_panel(
            series(
                "Evaluation metrics",
                "The latest evaluation metrics, by metric and split.",
                "none",
                Query(f"tuneloop_trainer_eval_metric{job}", f"{LEGEND_RUN} {{{{split}}}} {{{{metric}}}}"),
            )
        )
        .with_panel(
            series(
                "Tokens per second",
                "Non-padding tokens trained on per second (recent steps).",
                "none",
                Query(f"tuneloop_trainer_tokens_per_second{job}", LEGEND_RUN),
                w=8,
            )
        )
        .with_panel(
            series(
                "ETA",
                "Estimated time to the end of training.",
                "s",
                Query(f"tuneloop_trainer_eta_seconds{job}", LEGEND_RUN),
                w=8,
            )
        )
        .with_panel(
            series(
                "Progress",
                "Optimizer steps done of those planned.",
                "percentunit",
                Query(f"tuneloop_trainer_step{job} / tuneloop_trainer_total_steps{job}", LEGEND_RUN),
                w=8,
            )
        )
        .with_panel(
            series(
                "Checkpoint save and upload time",
                "Mean time to write a checkpoint locally and to upload it to object storage.",
                "s",
                _mean("tuneloop_trainer_checkpoint_save_seconds", job, f"{LEGEND_JOB} save"),
                _mean("tuneloop_trainer_checkpoint_upload_seconds", job, f"{LEGEND_JOB} upload"),
            )
        )
        .with_panel(
            series(
                "Step duration",
                "Wall time of an optimizer step.",
                "s",
                *_quantiles("tuneloop_trainer_step_duration_seconds", BY_JOB, job),
            )
        )
        .with_row(db.Row("Operator"))
        .with_panel(
            series(
                "Reconcile latency",
                "Time to reconcile one FineTuneJob (quantiles over all jobs).",
                "s",
                *_quantiles("tuneloop_operator_reconcile_duration_seconds", ""),
            )
        )
        .with_panel(
            series(
                "Reconcile and heartbeat errors",
                "Reconciles that failed and will be retried; failed reads of a trainer heartbeat.",
                "none",
                Query("sum(increase(tuneloop_operator_reconcile_errors_total[$__rate_interval]))", "reconcile errors"),
                Query(
                    "sum(increase(tuneloop_operator_heartbeat_read_errors_total[$__rate_interval]))",
                    "heartbeat read errors",
                ),
            )
        )
    )
    built = board.build()
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number  # stable ids: Grafana links to a panel by its id
    return built


def render() -> str:
    """The dashboard as the JSON Grafana imports (stable: sorted keys, two-space indent)."""
    data = json.loads(json.dumps(build(), cls=JSONEncoder))
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
