"""Where training progress goes: the sink protocol and the console progress display.

The loop reports to one :class:`Sinks` fan-out and never asks which rank it runs on:
non-zero ranks get no sinks at all (``Sinks([])``), so there is no ``if rank == 0`` in
the loop. The Prometheus exporter and the S3 heartbeat are sinks too.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO


@dataclass
class StepReport:
    """What one optimizer step did."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float | None
    tokens: int
    """Non-padding tokens in the step."""
    samples: int
    seconds: float
    """Wall time of the step."""
    tokens_per_second: float = 0.0
    eta_seconds: float | None = None


class MetricSink(Protocol):
    def phase(self, name: str) -> None: ...
    def step(self, report: StepReport) -> None: ...
    def evaluation(self, step: int, split: str, metrics: Mapping[str, float]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class Sinks:
    """Fan-out to every sink."""

    sinks: Sequence[MetricSink] = field(default_factory=list)

    def phase(self, name: str) -> None:
        for s in self.sinks:
            s.phase(name)

    def step(self, report: StepReport) -> None:
        for s in self.sinks:
            s.step(report)

    def evaluation(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        for s in self.sinks:
            s.evaluation(step, split, metrics)

    def message(self, text: str) -> None:
        for s in self.sinks:
            s.message(text)

    def close(self) -> None:
        for s in self.sinks:
            s.close()

    def data_report(self, report: Mapping[str, Any]) -> None:
        """The data validation report (optional for sinks: Prometheus counts rows and drops)."""
        for s in self.sinks:
            if hasattr(s, "record_data_report"):
                s.record_data_report(report)

    def checkpoint(self, step: int, uri: str, save_seconds: float, upload_seconds: float | None, size: int) -> None:
        """A checkpoint became complete. Optional for sinks: the heartbeat records it as the
        last complete checkpoint, Prometheus records its cost."""
        for s in self.sinks:
            if hasattr(s, "set_checkpoint"):
                s.set_checkpoint(step, uri)
            if hasattr(s, "record_checkpoint"):
                s.record_checkpoint(save_seconds, upload_seconds, size)


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class ConsoleProgress:
    """A progress bar with loss, throughput and ETA.

    On a terminal it redraws one line; in a log (a pod, CI) it prints a line at most every
    ``interval`` seconds, so logs stay readable.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 10.0, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval
        self.width = width
        self._last = 0.0
        self._open_line = False

    def _write_line(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def phase(self, name: str) -> None:
        self._write_line(f"== {name}")

    def step(self, report: StepReport) -> None:
        now = time.monotonic()
        last = report.step >= report.total_steps
        if not self.tty and not last and now - self._last < self.interval:
            return
        self._last = now
        frac = min(1.0, report.step / max(1, report.total_steps))
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        text = (
            f"[{bar}] {report.step}/{report.total_steps} ({frac:4.0%}) epoch {report.epoch:.2f} "
            f"loss {report.loss:.4f} lr {report.learning_rate:.2e} {report.tokens_per_second:,.0f} tok/s "
            f"ETA {format_seconds(report.eta_seconds)}"
        )
        if self.tty:
            self.stream.write("\r" + text.ljust(120))
            self.stream.flush()
            self._open_line = True
            if last:
                self._write_line("")
        else:
            self._write_line(text)

    def evaluation(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        self._write_line(f"   {split} @ step {step}: {shown}")

    def message(self, text: str) -> None:
        self._write_line(text)

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.flush()


class Throughput:
    """Tokens/s and ETA over a sliding window of recent steps (first steps excluded from
    nothing: a slow first step shows up, then fades out of the window)."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._steps: list[tuple[int, float]] = []

    def add(self, tokens: int, seconds: float) -> float:
        self._steps.append((tokens, seconds))
        del self._steps[: -self.window]
        total_s = sum(s for _, s in self._steps)
        return sum(t for t, _ in self._steps) / total_s if total_s > 0 else 0.0

    def seconds_per_step(self) -> float:
        return sum(s for _, s in self._steps) / len(self._steps) if self._steps else 0.0
