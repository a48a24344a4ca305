"""The training history: per-step training records and per-evaluation validation records,
kept in every checkpoint and drawn as the run's curves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from tuneloop_trainer.report.jsonsafe import json_safe

#: Keys of an evaluation record that are coordinates, not metrics.
_EVAL_COORDINATES: Final = frozenset({"step", "epoch"})


@dataclass
class TrainingHistory:
    """Per-step training records and per-evaluation validation records.

    ``train`` rows: ``step``, ``epoch``, ``loss``, ``learning_rate``, ``grad_norm``,
    ``tokens_per_second``. ``eval`` rows: ``step``, ``epoch``, ``eval_loss`` and whatever
    metrics the evaluation computed, under their metric names.
    """

    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)

    def append_train(
        self,
        *,
        step: int,
        epoch: float,
        loss: float,
        learning_rate: float,
        grad_norm: float | None = None,
        tokens_per_second: float | None = None,
    ) -> None:
        self.train.append(
            {
                "step": int(step),
                "epoch": float(epoch),
                "loss": float(loss),
                "learning_rate": float(learning_rate),
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_second": None if tokens_per_second is None else float(tokens_per_second),
            }
        )

    def append_eval(self, *, step: int, epoch: float, **metrics: float) -> None:
        self.eval.append({"step": int(step), "epoch": float(epoch), **{k: float(v) for k, v in metrics.items()}})

    def eval_metric_names(self) -> list[str]:
        """Metric names across all evaluations, in order of first appearance."""
        names: dict[str, None] = {}
        for row in self.eval:
            names.update((k, None) for k in row if k not in _EVAL_COORDINATES)
        return list(names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a NaN loss (a diverged step) becomes ``null``."""
        return {"train": json_safe(self.train), "eval": json_safe(self.eval)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingHistory:
        train, evals = data.get("train", []), data.get("eval", [])
        if not isinstance(train, list) or not isinstance(evals, list):
            raise ValueError("a training history has lists under 'train' and 'eval'")
        return cls(train=[dict(r) for r in train], eval=[dict(r) for r in evals])
