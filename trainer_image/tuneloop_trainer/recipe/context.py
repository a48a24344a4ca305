"""What a run is given and what it ends with: :class:`RunContext` (the job, the run number, where
to write) and :class:`RunResult` (the outcome, also the termination-message summary)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.api import FineTuneJob
from tuneloop.api.status import Reason
from tuneloop.text import clip
from tuneloop_trainer.data.profile import DataDrift
from tuneloop_trainer.evaluation import FairnessResult, ForgettingResult, GateResult, PromotedEvaluation
from tuneloop_trainer.progress import Sinks

#: Longest ``message`` in the termination summary (the operator shows it in status).
MAX_SUMMARY_MESSAGE_CHARS = 1000


@dataclass
class RunContext:
    """Everything a run needs besides the spec."""

    job: FineTuneJob
    run: int
    output_uri: str
    """Base output location (``spec.output.uri``, or ``--output``)."""
    work_dir: Path
    """Local scratch space (checkpoints staged here, model written here before upload)."""
    sinks: Sinks = field(default_factory=Sinks)
    cache_dir: Path | None = None
    job_uid: str | None = None
    """The FineTuneJob's uid in a cluster (``None`` for ``tuneloop run``): part of the identity
    recorded in checkpoints, so that only the same job, run and spec resume them."""
    writer_check: Callable[[], None] | None = None
    """Called right before a checkpoint manifest and the final outputs are written: raises
    (``OutputOwned``) once another process took the run over (the S3 writer lease,
    :mod:`tuneloop.lease`); ``None``: nothing to check (a local output, or not the main process)."""

    def checkpoint_identity(self) -> dict[str, Any]:
        """Who writes this run's checkpoints: job namespace, name and uid, run, spec hash."""
        from tuneloop.contract import spec_hash  # noqa: PLC0415

        meta = self.job.metadata
        return {
            "namespace": meta.namespace,
            "name": meta.name,
            "uid": self.job_uid,
            "run": self.run,
            "specHash": spec_hash(self.job.spec),
        }

    @property
    def spec(self) -> Any:
        return self.job.spec

    def run_uri(self, relative: str) -> str:
        from tuneloop.storage import safe_join  # noqa: PLC0415

        return safe_join(self.output_uri, relative)


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    """Finite values, rounded as the termination summary carries them."""
    return {k: round(v, 6) for k, v in metrics.items() if math.isfinite(v)}


@dataclass
class RunResult:
    """How a run ended (also the termination-message summary)."""

    passed: bool
    metrics: dict[str, float]
    validation_metrics: dict[str, float]
    gates: list[GateResult]
    forgetting: ForgettingResult | None
    fairness: FairnessResult | None
    model_uri: str
    card_uri: str
    steps: int
    best_step: int | None
    data_fingerprint: str
    stopped_early: bool
    promoted: PromotedEvaluation | None = None
    """The model promoted when the run started, evaluated on the same splits (``None``: none)."""
    data_drift: DataDrift | None = None
    """How far the training data moved since the promoted run (``None``: nothing promoted)."""

    def message(self) -> str:
        """One sentence on the outcome: which gates or limits failed and by how much."""
        compared = ""
        if self.promoted is not None:
            compared = (
                f" (compared with promoted run {self.promoted.run} on the same test split)"
                if self.promoted.error is None
                else f" (promoted run {self.promoted.run} could not be evaluated: {self.promoted.error})"
            )
        if self.passed:
            text = f"trained; every gate passed{compared}; model: {self.model_uri}"
        else:
            failed = [f"gate {g.metric}: {g.message}" for g in self.gates if not g.passed]
            if self.forgetting is not None and not self.forgetting.passed:
                failed.append(
                    f"forgetting: general-domain perplexity rose {self.forgetting.relative_increase:+.1%} "
                    f"(limit {self.forgetting.max_increase:.0%})"
                )
            if self.fairness is not None and not self.fairness.passed:
                failed.append(f"fairness: {self.fairness.message}")
            text = "not to be promoted: " + "; ".join(failed)
        return clip(text, MAX_SUMMARY_MESSAGE_CHARS)

    def summary(self) -> dict[str, Any]:
        """The termination message (``tuneloop_trainer.main.termination_message`` keeps it within
        4 KiB, dropping the least important keys first)."""
        out: dict[str, Any] = {
            "result": "Succeeded" if self.passed else "GateFailed",
            "reason": Reason.SUCCEEDED if self.passed else Reason.GATE_FAILED,
            "message": self.message(),
            "metrics": _rounded(self.metrics),
            "modelUri": self.model_uri,
            "gates": [{k: g.to_dict()[k] for k in ("metric", "passed", "value")} for g in self.gates],
            "steps": self.steps,
            "bestStep": self.best_step,
            "dataFingerprint": self.data_fingerprint,
        }
        if self.promoted is not None:
            out["promotedRun"] = self.promoted.run
            out["promotedMetrics"] = _rounded(self.promoted.metrics)
        if self.data_drift is not None and self.data_drift.score is not None:
            out["dataDrift"] = round(self.data_drift.score, 6)
            out["dataDriftDetail"] = _rounded(self.data_drift.distances)
        return out
