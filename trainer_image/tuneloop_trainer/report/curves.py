"""Training curves as PNG files (matplotlib, imported only when they are drawn)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tuneloop.api.spec import metric_direction
from tuneloop_trainer.report.history import TrainingHistory


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have a finite ``key``."""
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        value, step = row.get(key), row.get("step")
        if isinstance(value, int | float) and math.isfinite(value) and step is not None:
            xs.append(float(step))
            ys.append(float(value))
    return xs, ys


def _ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to 0."""
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_curves(history: TrainingHistory, directory: Path) -> list[Path]:
    """Write training curves as PNGs and return the files written.

    * ``loss.png``: training loss per step (raw, and smoothed when noisy) with the
      validation loss at each evaluation: the gap between them shows overfitting.
    * ``learning_rate.png``: the schedule as run (warmup, decay), at its peak: the largest
      parameter group's rate (the head's under layer-wise decay).
    * ``grad_norm.png``: gradient norms before clipping; spikes precede divergence.
    * ``metrics.png``: each validation metric against the step, one panel per metric
      (their scales differ: BLEU is 0-100, F1 0-1).

    A plot with no data is not written. Figures are drawn on the Agg canvas without pyplot,
    so no display is needed and the caller's matplotlib backend and state are untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        path = directory / name
        fig.savefig(path, format="png", dpi=100)
        written.append(path)

    train_x, train_y = _series(history.train, "loss")
    eval_x, eval_y = _series(history.eval, "eval_loss")
    if train_x or eval_x:
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot()
        if train_x:
            noisy = len(train_y) > 50
            ax.plot(train_x, train_y, color="tab:blue", alpha=0.3 if noisy else 1.0, linewidth=1, label="train")
            if noisy:
                ax.plot(train_x, _ema(train_y, 0.9), color="tab:blue", linewidth=2, label="train (smoothed)")
        if eval_x:
            ax.plot(eval_x, eval_y, color="tab:orange", marker="o", linewidth=2, label="validation")
        ax.set(xlabel="step", ylabel="loss", title="Loss")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss.png")

    for key, title, name in (
        ("learning_rate", "Learning rate", "learning_rate.png"),
        ("grad_norm", "Gradient norm (before clipping)", "grad_norm.png"),
    ):
        xs, ys = _series(history.train, key)
        if not xs:
            continue
        fig = Figure(figsize=(8, 4))
        ax = fig.add_subplot()
        ax.plot(xs, ys, color="tab:green", linewidth=1.5)
        ax.set(xlabel="step", ylabel=key.replace("_", " "), title=title)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        save(fig, name)

    panels = [(m, *_series(history.eval, m)) for m in history.eval_metric_names() if m != "eval_loss"]
    panels = [p for p in panels if p[1]]
    if panels:
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig = Figure(figsize=(4.5 * cols, 3.5 * rows))
        for i, (metric, xs, ys) in enumerate(panels, start=1):
            ax = fig.add_subplot(rows, cols, i)
            ax.plot(xs, ys, color="tab:purple", marker="o", linewidth=1.5)
            better = "lower" if metric_direction(metric) == "min" else "higher"
            ax.set(xlabel="step", title=f"{metric} ({better} is better)")
            ax.grid(alpha=0.3)
        fig.suptitle("Validation metrics")
        save(fig, "metrics.png")
    return written
