"""The fine-tuning recipe: one class, read top to bottom.

``setup()`` validates the data and loads the model before any long work, then resumes an
interrupted attempt; ``train()`` is the loop; ``finish()`` restores the best weights, runs the final
evaluations (test, out-of-domain, forgetting, fairness), checks the gates and writes model, model
card and report. The same code runs in a pod and under ``tuneloop run``. The steps themselves live
in the modules next to this one; the loop's state is :class:`~tuneloop_trainer.recipe.state.LoopState`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import torch

from tuneloop_trainer.analysis import analyse_errors
from tuneloop_trainer.baselines import apply_gain_gates
from tuneloop_trainer.evaluation import evaluate_gates, forgetting_check
from tuneloop_trainer.models import resolve_model
from tuneloop_trainer.optim import peak_learning_rate
from tuneloop_trainer.progress import StepReport, Throughput
from tuneloop_trainer.recipe.checkpointing import CheckpointSteps
from tuneloop_trainer.recipe.context import RunResult
from tuneloop_trainer.recipe.outputs import OutputSteps
from tuneloop_trainer.recipe.setup import SetupSteps, seed_everything

log = logging.getLogger(__name__)


class FineTuneRecipe(SetupSteps, CheckpointSteps, OutputSteps):
    """Fine-tune one run of a FineTuneJob."""

    def setup(self) -> None:
        """Data first (cheap, and most failures are there), then the model and the optimizer,
        then the state of an interrupted attempt."""
        seed_everything(self.hp.seed)
        self._setup_accelerator()
        self.sinks.phase("validating")
        # Read before any long work: a malformed pointer is a configuration error (exit 10).
        self.promoted_pointer = self._read_promoted_pointer()
        self.resolved = resolve_model(self.spec.model, self.sources.download_model, self.sources.cache_dir)
        self._setup_tokenizer_and_data()
        self._setup_model()
        self._setup_features()
        self._setup_optimizer()
        self._measure_base_forgetting()
        self._setup_checkpoints()
        self._resume()

    # --- training ---------------------------------------------------------------------

    def train(self) -> None:
        if self.stop_requested:
            # Asked to stop before the first step: nothing new to checkpoint; the next attempt
            # resumes from wherever the last complete checkpoint is.
            raise Interrupted(f"stopped on request before training (at step {self.state.step})")
        self.sinks.phase("training")
        state = self.state
        acc = self.accelerator
        model = self.model
        throughput = Throughput()
        rank, world = acc.process_index, acc.num_processes
        accum = self.hp.gradient_accumulation_steps
        params = [p for p in model.parameters() if p.requires_grad]
        eval_every = self.spec.evaluation.every_steps
        # Fault-injection knob for preemption tests: slows every step down (seconds).
        step_delay = float(os.environ.get("TUNELOOP_FAULT_STEP_DELAY", "0") or 0)
        # Where this attempt starts: at the beginning, or where the resumed checkpoint left off.
        start_epoch, start_batch = state.epoch, state.next_batch
        # What a kill would lose is counted from here: the resumed checkpoint (or nothing) is durable.
        self.cadence.durable(state.step, time.monotonic())
        for epoch in range(start_epoch, self.hp.epochs):
            batches = self._rank_batches(epoch, rank, world)
            first = start_batch if epoch == start_epoch else 0
            for start in range(first, len(batches), accum):
                if state.step >= self.total_steps:
                    break
                if self.unfreezer is not None and self.unfreezer.on_step(state.step):
                    state.unfreezing_stage = self.unfreezer.stage
                    params = [p for p in model.parameters() if p.requires_grad]
                t0 = time.monotonic()
                model.train()
                # A Poisson draw (privacy) may be empty: the step then applies noise alone.
                group = [self._collate_train(b) for b in batches[start : start + accum] if len(b)]
                total_units = max(1, sum(u for _, u, _ in group))
                divisor = self._global_mean_divisor(total_units, world)
                loss_total = 0.0
                for i, (tensors, units, _tokens) in enumerate(group):
                    sync = contextlib.nullcontext() if i == len(group) - 1 else acc.no_sync(model)
                    rows = int(tensors["input_ids"].shape[0])
                    if self.privacy is not None:
                        self.privacy.start_batch(rows)
                    with sync, acc.autocast():
                        loss_sum = self._forward_loss_sum(tensors, units)
                    # DP-SGD: each example's gradient must be that of its own loss (not / batch tokens).
                    acc.backward(loss_sum / (self.privacy.loss_divisor(rows) if self.privacy else divisor))
                    loss_total += float(loss_sum.detach())
                if self.privacy is not None:  # the DP optimizer clips each example's gradient instead
                    self.privacy.before_step(empty=not group)
                    grad_norm = None
                else:
                    grad_norm = acc.clip_grad_norm_(params, self.hp.max_grad_norm) if params else None
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if step_delay:
                    time.sleep(step_delay)
                seconds = time.monotonic() - t0
                tokens = sum(t for _, _, t in group)
                tps = throughput.add(tokens, seconds)
                remaining = (self.total_steps - state.step) * throughput.seconds_per_step()
                report = StepReport(
                    step=state.step,
                    total_steps=self.total_steps,
                    epoch=epoch + min(1.0, (start + accum) / max(1, len(batches))),
                    loss=loss_total / total_units,
                    learning_rate=peak_learning_rate(self.optimizer),
                    grad_norm=float(grad_norm) if grad_norm is not None else None,
                    tokens=tokens,
                    samples=sum(
                        len(b) if not self.packing else sum(len(r) for r in b) for b in batches[start : start + accum]
                    ),
                    seconds=seconds,
                    tokens_per_second=tps,
                    eta_seconds=remaining,
                )
                state.history.append_train(
                    step=report.step,
                    epoch=report.epoch,
                    loss=report.loss,
                    learning_rate=report.learning_rate,
                    grad_norm=report.grad_norm,
                    tokens_per_second=tps,
                )
                self.sinks.step(report)
                end_of_epoch = start + accum >= len(batches)
                state.epoch, state.next_batch = (epoch + 1, 0) if end_of_epoch else (epoch, start + accum)
                due = (eval_every and state.step % eval_every == 0) or (not eval_every and end_of_epoch)
                stop = (due or state.step >= self.total_steps) and self._validate_and_maybe_stop(report.epoch)
                if not stop and state.step < self.total_steps:
                    # A kill must never lose more than one interval: the next step waits for the
                    # upload in flight if it would go past that.
                    self._checkpoint_and_hold(throughput.seconds_per_step())
                    if self.stop_requested:
                        self._ensure_stop_checkpoint()
                        raise Interrupted(f"stopped at step {state.step} on request; checkpoint saved")
                if stop:
                    self.stopped_early = True
                    self.sinks.message(
                        f"   early stopping at step {state.step}: no {self.selection_metric} improvement in "
                        f"{state.stopper.patience} evaluations "
                        f"(best {state.stopper.best:.4g} at step {state.stopper.best_step})"
                    )
                    break
            if self.stopped_early or state.step >= self.total_steps:
                break
        self._report_completed_checkpoint()
        if self.accelerator.is_main_process:
            self._remove_incomplete_checkpoints()

    def _validate_and_maybe_stop(self, epoch: float) -> bool:
        """Validate, keep the best weights, and say whether early stopping ends training."""
        state = self.state
        if not self.validation_features:
            self._snapshot_best()  # nothing to select on: the last state is the result
            return False
        out = self.evaluate(self.validation_features, self.data.validation, final=False)
        metrics = out.metrics
        state.history.append_eval(step=state.step, epoch=epoch, **metrics)
        self.sinks.evaluation(state.step, "validation", metrics)
        state.last_validation = dict(metrics)
        value = metrics.get(self.selection_metric)
        if value is None or not math.isfinite(value):
            return False
        self.last_selection_value = value
        best_before = state.stopper.best_step
        stop = state.stopper.update(value, step=state.step)
        if state.stopper.best_step != best_before:
            self._snapshot_best()
            state.best_validation = dict(metrics)
        return stop

    def _snapshot_best(self) -> None:
        """Keep the best weights on the CPU (those a checkpoint keeps)."""
        self.state.best_weights = {name: p.detach().to("cpu", copy=True) for name, p in self._kept_parameters().items()}
        self.state.best_step = self.state.step

    def _restore_best(self) -> None:
        best = self.state.best_weights
        if best is None:
            return
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in best:
                    p.copy_(best[name].to(p.device))

    # --- finish -----------------------------------------------------------------------

    def finish(self) -> RunResult:
        """Final evaluation on the best weights, the promoted model on the same splits, gates,
        and outputs."""
        self.sinks.phase("evaluating")
        if self.privacy is not None:
            self.privacy.detach()
        self._restore_best()
        test_features, test_examples = self.test_features, self.data.test
        if not test_features:
            test_features, test_examples = self.validation_features, self.data.validation
            self.notes.append("no test split: final metrics are on the validation split")
        test = self.evaluate(test_features, test_examples, final=True)
        metrics = dict(test.metrics)
        self.sinks.evaluation(self.state.step, "test", metrics)
        if self.privacy is not None:
            spent = self.privacy.spent(self.state.step)
            metrics.update(spent.metrics())
            self.sinks.message(f"   {spent.summary_line()}")
        if self.ood_features:
            ood = self.evaluate(self.ood_features, self.data.out_of_domain, final=True)
            metrics.update({f"ood_{k}": v for k, v in ood.metrics.items()})
            self.sinks.evaluation(self.state.step, "out-of-domain", ood.metrics)
        forgetting = None
        forgetting_spec = self.spec.evaluation.forgetting
        if forgetting_spec is not None and self.base_forgetting_perplexity is not None:
            tuned = self._forgetting_perplexity(base=False)
            forgetting = forgetting_check(self.base_forgetting_perplexity, tuned, forgetting_spec.max_increase)
            metrics["forgetting_increase"] = forgetting.relative_increase
        fairness = self._fairness(test, test_examples)
        analysis = analyse_errors(
            self.spec, test_examples, test, self.data.label_names, split="test" if self.test_features else "validation"
        )
        if fairness is not None:
            metrics["fairness_gap"] = fairness.gap
        # The candidate is done with: written to disk, it leaves memory before the promoted
        # model loads, so that the two are never held at once.
        save_format = self._write_model()
        promoted = None
        if self.promoted_pointer is not None:
            promoted = self._evaluate_promoted(self.promoted_pointer, test_examples)
        baselines = self.before_training.baselines
        if baselines is not None:  # baseline_<name>_<metric> and gain_over_baseline
            metrics.update(baselines.summary_metrics(metrics))
        gates = apply_gain_gates(
            self.spec.promotion.gates, evaluate_gates(self.spec.promotion.gates, metrics, promoted), baselines
        )
        passed = (
            all(g.passed for g in gates)
            and (forgetting is None or forgetting.passed)
            and (fairness is None or fairness.passed)
        )
        model_uri, card_uri = self.save(
            metrics=metrics,
            test=test,
            gates=gates,
            forgetting=forgetting,
            fairness=fairness,
            passed=passed,
            promoted=promoted,
            save_format=save_format,
            analysis=analysis,
        )
        return RunResult(
            passed=passed,
            metrics=metrics,
            validation_metrics=self.state.best_validation,
            gates=gates,
            forgetting=forgetting,
            fairness=fairness,
            model_uri=model_uri,
            card_uri=card_uri,
            steps=self.state.step,
            best_step=self.state.best_step,
            data_fingerprint=self.data.fingerprint,
            stopped_early=self.stopped_early,
            promoted=promoted,
            data_drift=self.data_drift,
        )

    # --- all together -------------------------------------------------------------------

    def run(self) -> RunResult:
        try:
            self.setup()
            self.train()
            return self.finish()
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.checkpoints is not None:
            try:
                self.checkpoints.close()
            except Exception:  # a failed upload must not hide the error that ended the run
                log.exception("checkpoint upload failed while shutting down")
        self.sinks.close()


class Interrupted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; the run is to be resumed."""
