"""The run's outputs: the candidate's weights and tokenizer, the model card, and the report
(metrics, validation report, curves, error analysis, data profile), uploaded under the run."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

from tuneloop.contract import Layout
from tuneloop_trainer.adapters import quiet_bias_warning
from tuneloop_trainer.analysis import ErrorAnalysis
from tuneloop_trainer.evaluation import FairnessResult, ForgettingResult, GateResult, PromotedEvaluation
from tuneloop_trainer.recipe.base import RecipeBase
from tuneloop_trainer.recipe.evaluate import EvalOutput
from tuneloop_trainer.report import ModelCard, comparison, plot_curves, write_model_card


class OutputSteps(RecipeBase):
    """Writing and uploading the model, its card and the report."""

    def _outputs_dir(self) -> Path:
        return self.ctx.work_dir / "outputs"

    def _write_model(self) -> str:
        """Write the candidate's weights and tokenizer locally (uploaded by :meth:`save`);
        returns the save format."""
        local = self._outputs_dir()
        shutil.rmtree(local, ignore_errors=True)
        model_dir = local / "model"
        model_dir.mkdir(parents=True)
        model = self.accelerator.unwrap_model(self.model)
        save_format = self.spec.save_format()
        if save_format == "merged":
            model = model.merge_and_unload()
        if self.accelerator.is_main_process:
            with quiet_bias_warning(self.spec.method.type):
                model.save_pretrained(model_dir, safe_serialization=True)
            self.tokenizer.save_pretrained(model_dir)
        return save_format

    def save(
        self,
        *,
        metrics: dict[str, float],
        test: EvalOutput,
        gates: list[GateResult],
        forgetting: ForgettingResult | None,
        fairness: FairnessResult | None,
        passed: bool,
        promoted: PromotedEvaluation | None,
        save_format: str,
        analysis: ErrorAnalysis | None = None,
    ) -> tuple[str, str]:
        """Write model card and report next to the model written by :meth:`_write_model`, then
        upload them all."""
        self.sinks.phase("uploading")
        run = self.ctx.run
        local = self._outputs_dir()
        model_dir = local / "model"
        report_dir = local / "report"
        report_dir.mkdir(parents=True, exist_ok=True)
        model_uri = self.ctx.run_uri(Layout.model(run)) + "/"
        card = ModelCard(
            job=self.ctx.job.metadata.name,
            run=run,
            task=self.spec.task,
            base_model=self.spec.model.uri,
            method=self.spec.method.type,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            data_fingerprint=self.data.fingerprint,
            validation_report=self.data.report.to_dict(),
            hyperparameters={
                **self.hp.to_wire(),
                "learningRate": self.spec.learning_rate(),
                "packing": self.packing,
                "totalSteps": self.total_steps,
                "stepsTrained": self.state.step,
                "bestStep": self.state.best_step,
                "stoppedEarly": self.stopped_early,
                "parameterGroups": self.param_groups_summary,
            },
            metrics=metrics,
            validation_metrics=self.state.best_validation,
            per_class=test.extra.get("classification", {}).get("per_class"),
            out_of_domain={k: v for k, v in metrics.items() if k.startswith("ood_")} or None,
            forgetting=forgetting.to_dict() if forgetting else None,
            fairness=fairness.to_dict() if fairness else None,
            gates=[g.to_dict() for g in gates],
            passed=passed,
            notes=self.notes,
            model_uri=model_uri,
            save_format=save_format,
            promoted=comparison(metrics, gates, promoted),
            data_drift=self.data_drift.to_dict() if self.data_drift is not None else None,
            baselines=self.before_training.baselines.to_dict(metrics) if self.before_training.baselines else None,
            error_analysis=analysis.to_dict() if analysis is not None else None,
            privacy=self.privacy.spent(self.state.step).to_dict() if self.privacy is not None else None,
        )
        write_model_card(card, local)
        plot_curves(self.state.history, report_dir)
        if analysis is not None:
            analysis.write(report_dir)
        (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (report_dir / "validation-report.json").write_text(json.dumps(self.data.report.to_dict(), indent=2))
        (report_dir / "history.json").write_text(json.dumps(self.state.history.to_dict()))
        if self.data_profile is not None:
            (report_dir / Path(Layout.data_profile(run)).name).write_text(
                json.dumps(self.data_profile.to_dict(), ensure_ascii=False)
            )
        if self.accelerator.is_main_process:
            if self.ctx.writer_check is not None:  # never overwrite the model of a writer that took over
                self.ctx.writer_check()
            storage = self.sources.storage(self.ctx.output_uri)
            storage.upload_dir(model_dir, model_uri)
            storage.upload_dir(report_dir, self.ctx.run_uri(Layout.report(run)) + "/")
            storage.upload_file(local / "model-card.md", self.ctx.run_uri(Layout.model_card(run)))
            storage.upload_file(local / "model-card.json", self.ctx.run_uri(Layout.model_card_json(run)))
        return model_uri, self.ctx.run_uri(Layout.model_card(run))
