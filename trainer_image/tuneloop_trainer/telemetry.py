"""Telemetry sinks: a Prometheus endpoint and the ``status.json`` heartbeat in object storage.

Both are :class:`~tuneloop_trainer.progress.MetricSink` s, so the training loop reports to them the
way it reports to the console, and neither may ever stop training: a failed scrape or a slow or
failing object store is logged, not raised.

:class:`PrometheusSink` serves ``/metrics`` from its own :class:`CollectorRegistry` (never the global
one, so two sinks in one process do not collide). Every series carries the labels ``finetunejob``
and ``run``. Not ``job`` and not ``namespace``: Prometheus attaches its own ``job`` and
``namespace`` target labels to every scraped series (the pod's namespace, through the PodMonitor)
and would rename colliding labels ``exported_job``/``exported_namespace``. Only the rank-0 process
serves (the other ranks report to a null sink), so only node-rank 0 pods are scraped.

:class:`HeartbeatSink` writes :class:`tuneloop.contract.Heartbeat` to ``runs/<n>/status.json`` for
the operator: at most once per ``min_interval`` seconds, and always on a phase change, an
evaluation, a new checkpoint and at close. Writes run on a background thread and coalesce: only
the latest heartbeat waits to be written, so S3 latency never stalls the step loop.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tuneloop.api.status import CheckpointRef
from tuneloop.contract import Heartbeat
from tuneloop.storage import Storage
from tuneloop_trainer.progress import StepReport

__all__ = ["METRIC_PREFIX", "HeartbeatSink", "PrometheusSink"]

logger = logging.getLogger(__name__)

METRIC_PREFIX: Final = "tuneloop_trainer_"
#: The trainer's phases, exported as 0 until entered (so a dashboard sees every series at once).
KNOWN_PHASES: Final = ("validating", "training", "evaluating", "uploading")
_LABELS: Final = ("finetunejob", "run")
_SECONDS_BUCKETS: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, float("inf"))
_STEP_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
#: Evaluation splits whose metrics are the heartbeat's ``metrics`` (later ones win).
_PRIMARY_SPLITS: Final = frozenset({"validation", "test"})
_MESSAGE_MAX_CHARS: Final = 4096
_RUN_IN_URI: Final = re.compile(r"/runs/([1-9][0-9]*)/[^/]*$")


def _finite(value: float | None) -> float | None:
    """``value`` when it is a finite number, else ``None``."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _gpu_memory() -> list[tuple[str, int, int]]:
    """``(device, allocated bytes, reserved bytes)`` per CUDA device; empty without CUDA.

    torch is looked up, never imported: a process that has not imported it runs nothing on a GPU.
    """
    torch: Any = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        return [
            (str(i), int(torch.cuda.memory_allocated(i)), int(torch.cuda.memory_reserved(i)))
            for i in range(torch.cuda.device_count())
        ]
    except Exception:  # a broken driver must not break a step
        logger.debug("reading GPU memory failed", exc_info=True)
        return []


class PrometheusSink:
    """Training metrics for Prometheus, served on ``port`` (0: any free port; ``None``: no server).

    Metrics (all with ``finetunejob`` and ``run`` labels; prefix ``tuneloop_trainer_``):

    gauges ``loss``, ``learning_rate``, ``grad_norm``, ``step``, ``total_steps``, ``epoch``,
    ``tokens_per_second``, ``samples_per_second``, ``eta_seconds``, ``eval_metric{metric,split}``,
    ``phase{phase}`` (1 for the current phase, 0 for the others), ``gpu_memory_allocated_bytes{device}``,
    ``gpu_memory_reserved_bytes{device}``; counters ``tokens_total``, ``samples_total``, ``steps_total``,
    ``checkpoints_total``, ``checkpoint_bytes_total``, ``data_rows_read_total``,
    ``data_rows_dropped_total{reason}``; histograms ``step_duration_seconds``,
    ``checkpoint_save_seconds``, ``checkpoint_upload_seconds``.
    """

    def __init__(
        self,
        *,
        port: int | None,
        job: str,
        run: int,
        registry: CollectorRegistry | None = None,
        addr: str = "0.0.0.0",  # noqa: S104 - scraped from other pods
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._base = {"finetunejob": job, "run": str(run)}
        self._phase: str | None = None
        self._lock = threading.Lock()

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(METRIC_PREFIX + name, doc, (*_LABELS, *extra), registry=self.registry)

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(METRIC_PREFIX + name, doc, (*_LABELS, *extra), registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(METRIC_PREFIX + name, doc, _LABELS, registry=self.registry, buckets=buckets)

        self.loss = gauge("loss", "Training loss of the latest optimizer step.")
        self.learning_rate = gauge(
            "learning_rate",
            "Peak learning rate of the latest optimizer step (the largest parameter group's: the head's under "
            "layer-wise decay).",
        )
        self.grad_norm = gauge("grad_norm", "Gradient norm (before clipping) of the latest optimizer step.")
        self.step_gauge = gauge("step", "Optimizer steps done.")
        self.total_steps = gauge("total_steps", "Optimizer steps planned.")
        self.epoch = gauge("epoch", "Fractional epoch.")
        self.tokens_per_second = gauge("tokens_per_second", "Non-padding tokens per second (recent steps).")
        self.samples_per_second = gauge("samples_per_second", "Samples per second of the latest step.")
        self.eta_seconds = gauge("eta_seconds", "Estimated seconds to the end of training.")
        self.tokens = counter("tokens_total", "Non-padding tokens trained on.")
        self.samples = counter("samples_total", "Samples trained on.")
        self.steps = counter("steps_total", "Optimizer steps taken by this process.")
        self.step_duration = histogram("step_duration_seconds", "Wall time of an optimizer step.", _STEP_BUCKETS)
        self.eval_metric = gauge("eval_metric", "Latest evaluation metric by name and split.", "metric", "split")
        self.phase_gauge = gauge("phase", "1 for the trainer's current phase, 0 for the others.", "phase")
        self.checkpoint_save = histogram(
            "checkpoint_save_seconds", "Time to write a checkpoint locally.", _SECONDS_BUCKETS
        )
        self.checkpoint_upload = histogram(
            "checkpoint_upload_seconds", "Time to upload a checkpoint to object storage.", _SECONDS_BUCKETS
        )
        self.checkpoint_bytes = counter("checkpoint_bytes_total", "Bytes of checkpoints written.")
        self.checkpoints = counter("checkpoints_total", "Checkpoints written.")
        self.rows_read = counter("data_rows_read_total", "Data rows read before validation.")
        self.rows_dropped = counter("data_rows_dropped_total", "Data rows dropped by validation, by reason.", "reason")
        self.gpu_allocated = gauge("gpu_memory_allocated_bytes", "GPU memory allocated by tensors.", "device")
        self.gpu_reserved = gauge("gpu_memory_reserved_bytes", "GPU memory reserved by the allocator.", "device")

        for name in KNOWN_PHASES:
            self.phase_gauge.labels(**self._base, phase=name).set(0)
        for c in (self.tokens, self.samples, self.steps, self.checkpoint_bytes, self.checkpoints, self.rows_read):
            c.labels(**self._base)  # export 0 from the start, so rate() sees the first increase

        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        if port is not None:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
            self.port = int(self._server.server_port)

    # --- MetricSink ------------------------------------------------------------------------------

    def phase(self, name: str) -> None:
        with self._lock:
            if self._phase is not None and self._phase != name:
                self.phase_gauge.labels(**self._base, phase=self._phase).set(0)
            self._phase = name
            self.phase_gauge.labels(**self._base, phase=name).set(1)

    def step(self, report: StepReport) -> None:
        b = self._base
        self.loss.labels(**b).set(float(report.loss))
        self.learning_rate.labels(**b).set(float(report.learning_rate))
        if report.grad_norm is not None:
            self.grad_norm.labels(**b).set(float(report.grad_norm))
        self.step_gauge.labels(**b).set(report.step)
        self.total_steps.labels(**b).set(report.total_steps)
        self.epoch.labels(**b).set(report.epoch)
        self.tokens_per_second.labels(**b).set(report.tokens_per_second)
        if report.seconds > 0:
            self.samples_per_second.labels(**b).set(report.samples / report.seconds)
            self.step_duration.labels(**b).observe(report.seconds)
        if report.eta_seconds is not None:
            self.eta_seconds.labels(**b).set(report.eta_seconds)
        self.tokens.labels(**b).inc(max(0, report.tokens))
        self.samples.labels(**b).inc(max(0, report.samples))
        self.steps.labels(**b).inc()
        for device, allocated, reserved in _gpu_memory():
            self.gpu_allocated.labels(**b, device=device).set(allocated)
            self.gpu_reserved.labels(**b, device=device).set(reserved)

    def evaluation(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.eval_metric.labels(**self._base, metric=name, split=split).set(float(value))

    def message(self, text: str) -> None:
        """Messages are for people: not exported."""

    def close(self) -> None:
        """Stop the HTTP server (the metrics stay readable from :attr:`registry`)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # --- beyond the protocol ---------------------------------------------------------------------

    def record_checkpoint(self, save_seconds: float, upload_seconds: float | None, size_bytes: int) -> None:
        """One checkpoint: local save time, upload time (``None`` when not uploaded) and size."""
        b = self._base
        self.checkpoints.labels(**b).inc()
        self.checkpoint_save.labels(**b).observe(max(0.0, save_seconds))
        if upload_seconds is not None:
            self.checkpoint_upload.labels(**b).observe(max(0.0, upload_seconds))
        self.checkpoint_bytes.labels(**b).inc(max(0, size_bytes))

    def record_data_report(self, report: Mapping[str, Any]) -> None:
        """Counts from the data validation report: ``{"rowsRead": 405, "dropped": {"empty": 1, ...}}``.

        Malformed entries are skipped (and logged), never raised.
        """
        rows = report.get("rowsRead")
        if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0:
            self.rows_read.labels(**self._base).inc(rows)
        dropped = report.get("dropped") or {}
        if not isinstance(dropped, Mapping):
            logger.warning("data report: 'dropped' is not a mapping; not exported")
            return
        for reason, count in dropped.items():
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                self.rows_dropped.labels(**self._base, reason=str(reason)).inc(count)
            else:
                logger.warning("data report: dropped[%r] is not a count; not exported", reason)


class HeartbeatSink:
    """Writes the :class:`~tuneloop.contract.Heartbeat` to ``uri`` (``runs/<n>/status.json``).

    ``run`` defaults to the ``N`` of ``…/runs/<N>/status.json`` in ``uri``. Throttled to one write
    per ``min_interval`` seconds of ``clock``; phase changes, evaluations,
    :meth:`set_checkpoint` and :meth:`close` always write. A background thread does the writing
    and only the latest heartbeat waits for it (older pending ones are dropped). Storage errors are
    logged and the next heartbeat is tried as usual. :meth:`end` writes how the run ended
    (``succeeded``, ``stopped``, ``failed`` and why), even after :meth:`close`. ``writing`` says
    whether this process still writes the run (its S3 writer lease, :mod:`tuneloop.lease`); once it
    says no, nothing more is written, so a writer taken over never overwrites the new writer's
    heartbeat.
    """

    def __init__(
        self,
        storage: Storage,
        uri: str,
        *,
        run: int | None = None,
        job_uid: str | None = None,
        min_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        writing: Callable[[], bool] | None = None,
    ) -> None:
        self.storage = storage
        self.writing = writing
        self.uri = uri
        self.min_interval = min_interval
        self.clock = clock
        self.writes = 0
        """Heartbeats written successfully (for tests and logs)."""
        self.failures = 0
        """Writes that failed."""
        if run is None:
            found = _RUN_IN_URI.search(uri)
            if found is None:
                raise ValueError(f"{uri}: no runs/<n>/ in the URI; pass run=")
            run = int(found.group(1))
        self._state: dict[str, Any] = {"run": run, "job_uid": job_uid, "phase": ""}
        self._metrics: dict[str, float | None] = {}
        self._splits: dict[str, dict[str, float | None]] = {}
        self._last_write: float | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: Heartbeat | None = None
        self._busy = False
        self._closed = False
        self._silenced = False
        self._thread = threading.Thread(target=self._worker, name="tuneloop-heartbeat", daemon=True)
        self._thread.start()

    # --- MetricSink ------------------------------------------------------------------------------

    def phase(self, name: str) -> None:
        with self._lock:
            changed = self._state["phase"] != name
            self._state["phase"] = name
            self._submit(force=changed)

    def step(self, report: StepReport) -> None:
        with self._lock:
            total = max(0, report.total_steps)
            self._state.update(
                step=max(0, report.step),
                total_steps=total,
                epoch=max(0.0, _finite(report.epoch) or 0.0),
                progress_percentage=min(100, max(0, int(100 * report.step / total))) if total else None,
                estimated_remaining_seconds=_seconds(report.eta_seconds),
                loss=_finite(report.loss),
                tokens_per_second=_nonnegative(report.tokens_per_second),
            )
            self._submit(force=False)

    def evaluation(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        with self._lock:
            values = {str(k): _finite(v) for k, v in metrics.items()}
            self._splits[split] = values
            if split in _PRIMARY_SPLITS:
                self._metrics.update(values)
            self._submit(force=True)

    def message(self, text: str) -> None:
        with self._lock:
            self._state["message"] = text[:_MESSAGE_MAX_CHARS]
            self._submit(force=False)

    def close(self, timeout: float = 60.0) -> None:
        """Write the final heartbeat, wait for it (up to ``timeout`` seconds), and stop the writer
        thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._submit(force=True)
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the last heartbeat to %s was not written within %ss", self.uri, timeout)

    # --- beyond the protocol ---------------------------------------------------------------------

    def set_checkpoint(self, step: int, uri: str) -> None:
        """Record the latest complete checkpoint (written at once)."""
        with self._lock:
            self._state["last_checkpoint"] = CheckpointRef(step=max(0, step), uri=uri)
            self._submit(force=True)

    @property
    def last_checkpoint(self) -> CheckpointRef | None:
        """The latest complete checkpoint recorded with :meth:`set_checkpoint`."""
        with self._lock:
            ref = self._state.get("last_checkpoint")
            return ref if isinstance(ref, CheckpointRef) else None

    def end(self, phase: str, message: str, timeout: float = 60.0) -> None:
        """Record how the run ended (``stopped``, ``failed``) and write it, also after :meth:`close`
        (the recipe closes its sinks before the entry point knows why it ended).

        The estimate of the remaining time is dropped: nothing is running any more. Written in the
        caller's thread once the writer is closed; a storage error is logged, never raised."""
        with self._lock:
            self._state.update(phase=phase, message=message[:_MESSAGE_MAX_CHARS], estimated_remaining_seconds=None)
            closed = self._closed
        if not closed:
            self.close(timeout)  # writes the state just set, and waits for it
            return
        self._thread.join(timeout)  # a close() that timed out may still be writing: last write wins
        with self._lock:
            try:
                heartbeat = self._heartbeat()
            except Exception:
                logger.warning("final heartbeat not written: invalid values", exc_info=True)
                return
        if not self._may_write():
            return
        try:
            self.storage.write_json(self.uri, heartbeat.model_dump(mode="json", by_alias=True))
            self.writes += 1
        except Exception as exc:
            self.failures += 1
            logger.warning("final heartbeat to %s failed: %s", self.uri, exc)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted heartbeat is written (or failed); ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending is not None or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.wait(remaining)
            return True

    # --- inside ----------------------------------------------------------------------------------

    def _may_write(self) -> bool:
        """Whether this process still writes the run; said once when it stops."""
        if self.writing is None or self.writing():
            return True
        if not self._silenced:
            self._silenced = True
            logger.warning("heartbeat to %s no longer written: another process writes the run", self.uri)
        return False

    def _submit(self, *, force: bool) -> None:
        """Queue a snapshot when forced or due (the caller holds the lock)."""
        if self._closed:
            return
        now = self.clock()
        if not force and self._last_write is not None and now - self._last_write < self.min_interval:
            return
        try:
            heartbeat = self._heartbeat()
        except Exception:  # a value the model refuses must not stop training
            logger.warning("heartbeat not written: invalid values", exc_info=True)
            return
        self._last_write = now
        self._pending = heartbeat  # coalesce: a newer heartbeat replaces one not yet written
        self._wake.notify_all()

    def _heartbeat(self) -> Heartbeat:
        """A snapshot of the state (the caller holds the lock)."""
        return Heartbeat(
            **self._state,
            metrics=dict(self._metrics),
            splits={k: dict(v) for k, v in self._splits.items()},
            last_updated_time=datetime.now(UTC),
        )

    def _worker(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                heartbeat, self._pending = self._pending, None
                if heartbeat is None:  # closed and nothing left to write
                    self._wake.notify_all()
                    return
                self._busy = True
            written: bool | None = None  # None: not this process's to write any more
            try:
                if self._may_write():
                    self.storage.write_json(self.uri, heartbeat.model_dump(mode="json", by_alias=True))
                    written = True
            except Exception as exc:
                written = False
                logger.warning("heartbeat to %s failed: %s", self.uri, exc)
            with self._lock:
                self._busy = False
                if written:
                    self.writes += 1
                elif written is False:
                    self.failures += 1
                self._wake.notify_all()


def _seconds(value: float | None) -> int | None:
    number = _finite(value)
    return None if number is None else max(0, round(number))


def _nonnegative(value: float | None) -> float | None:
    number = _finite(value)
    return None if number is None else max(0.0, number)
