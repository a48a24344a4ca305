"""The fine-tuning recipe: one class, read top to bottom.

``setup()`` validates the data and loads the model before any long work; ``train()`` is
the loop; ``finish()`` restores the best checkpoint, runs the final evaluations (test,
out-of-domain, forgetting, fairness), checks the gates and writes model, model card and
report. The same code runs in a pod and under ``tuneloop run``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from transformers import get_scheduler

from tuneloop.api import FineTuneJob
from tuneloop.api.spec import GENERATION_METRICS, METRIC_OUTPUTS, Method, ModelSource, Unfreezing, metric_direction
from tuneloop.contract import Layout, PromotedPointer, spec_hashes
from tuneloop_trainer.adapters import quiet_bias_warning
from tuneloop_trainer.analysis import ErrorAnalysis, analyse_errors
from tuneloop_trainer.augment import augment_training_split
from tuneloop_trainer.baselines import BeforeTraining, apply_gain_gates, run_before_training, untouched
from tuneloop_trainer.batching import (
    collate_packed,
    collate_padded,
    eval_batches,
    length_grouped_batches,
    packed_batches,
)
from tuneloop_trainer.checkpoints import CheckpointManager, CheckpointState, capture_rng, restore_rng
from tuneloop_trainer.data import Example, PreparedData, prepare_data
from tuneloop_trainer.data.profile import DataDrift, DataProfile, build_profile, data_drift, tokenizer_fingerprint
from tuneloop_trainer.data.replay import EpochRows
from tuneloop_trainer.errors import InvalidConfigError, UnsupportedModelError
from tuneloop_trainer.evaluation import (
    EarlyStopper,
    FairnessResult,
    ForgettingResult,
    GateResult,
    PromotedEvaluation,
    classification_metrics,
    evaluate_gates,
    fairness_check,
    forgetting_check,
    generation_metrics,
    perplexity,
)
from tuneloop_trainer.features import IGNORE_INDEX, Feature, build_features
from tuneloop_trainer.lengths import measure_lengths
from tuneloop_trainer.models import (
    LoadedModel,
    TrainedModel,
    check_fits_task,
    fit_max_seq_length,
    load_config,
    load_model,
    load_tokenizer,
    load_trained_model,
    max_input_tokens,
    mixed_precision,
    resolve_model,
)
from tuneloop_trainer.optim import (
    ddp_kwargs_handlers,
    describe_groups,
    parameter_groups,
    peak_learning_rate,
    prepare_for_training,
)
from tuneloop_trainer.privacy import DifferentialPrivacy
from tuneloop_trainer.progress import Sinks, StepReport, Throughput
from tuneloop_trainer.report import ModelCard, TrainingHistory, comparison, plot_curves, write_model_card
from tuneloop_trainer.sources import Sources

log = logging.getLogger(__name__)

#: Generated metrics (ROUGE, BLEU) need one generate() call per example; during training
#: validation they are computed on at most this many examples.
MAX_GENERATION_EXAMPLES_DURING_TRAINING = 128
MAX_NEW_TOKENS = 128
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


@dataclass
class EvalOutput:
    """One evaluation pass."""

    metrics: dict[str, float]
    per_example_loss: list[float] = field(default_factory=list)
    per_example_units: list[int] = field(default_factory=list)
    predictions: list[Any] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalTarget:
    """A model :meth:`FineTuneRecipe.evaluate` runs: the candidate, or the promoted model, with
    what feeding it depends on."""

    model: Any
    tokenizer: Any
    config: Any
    """Its (base) model config: how many positions a decoder has."""
    method: Method
    """Its adaptation method: virtual tokens change batching and generation."""
    label_index: torch.Tensor | None = None
    """Classification, when its classes differ from this run's: for each class id of this run's
    data, the model's output that has the same name (-1: it has no such class)."""


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
        return text if len(text) <= MAX_SUMMARY_MESSAGE_CHARS else text[: MAX_SUMMARY_MESSAGE_CHARS - 1] + "…"

    def summary(self) -> dict[str, Any]:
        """The termination message (``tuneloop_trainer.main.termination_message`` keeps it within
        4 KiB, dropping the least important keys first)."""
        out: dict[str, Any] = {
            "result": "Succeeded" if self.passed else "GateFailed",
            "reason": "Succeeded" if self.passed else "GateFailed",
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class FineTuneRecipe:
    """Fine-tune one run of a FineTuneJob."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.spec = ctx.job.spec
        self.hp = self.spec.hyperparameters
        self.sinks = ctx.sinks
        self.sources = Sources(self.spec.storage, ctx.cache_dir or ctx.work_dir / "cache")
        self.history = TrainingHistory()
        self.step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped_early = False
        # Set by the SIGTERM handler, which is installed before setup(): a stop requested while
        # the data is validated or the model loads must not be forgotten.
        self.stop_requested = False
        self.base_forgetting_perplexity: float | None = None
        self.notes: list[str] = []
        self.promoted_pointer: PromotedPointer | None = None
        self.data_profile: DataProfile | None = None
        self.promoted_profile: DataProfile | None = None
        self.data_drift: DataDrift | None = None
        self.privacy: DifferentialPrivacy | None = None
        """DP-SGD (``spec.privacy``): Poisson batches, per-example clipping, noise, the ε spent."""

    # --- setup ----------------------------------------------------------------------

    def setup(self) -> None:
        """Data first (cheap, and most failures are there), then the model."""
        seed_everything(self.hp.seed)
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision(self.hp.precision),
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=ddp_kwargs_handlers(self._unfreezing() is not None),
            # total_steps counts this process's optimizer steps: the schedule advances once per
            # step. (accelerate's default steps it once per process, which with N processes ran
            # the warmup and decay N times too fast: the LR hit zero at 1/N of a distributed run.)
            step_scheduler_with_optimizer=False,
        )
        self.device = self.accelerator.device
        self.sinks.phase("validating")
        # Read before any long work: a malformed pointer is a configuration error (exit 10).
        self.promoted_pointer = self._read_promoted_pointer()
        self.resolved = resolve_model(self.spec.model, self.sources.download_model, self.sources.cache_dir)
        self._setup_tokenizer_and_data()
        self._setup_model()
        self._setup_features()
        self._setup_optimizer()

    def _unfreezing(self) -> Unfreezing | None:
        """``method.unfreezing`` when it applies (full fine-tuning), else ``None``."""
        return self.spec.method.unfreezing if self.spec.method.type == "full" else None

    def _setup_tokenizer_and_data(self) -> None:
        # Read once, here, through the error path that names the model (an unreachable hub
        # model is a permanent UnsupportedModel failure, not a crash); load_model reuses it.
        self.model_config = load_config(self.resolved)
        family = check_fits_task(self.model_config, self.spec.task, self.resolved.uri)
        # A maxSeqLength past the model's positions would crash on the first long batch, maybe
        # hours in: lower it now, visibly. self.hp is the effective settings from here on
        # (features, packing, the model card); the spec keeps what the user wrote.
        max_len, length_warning = fit_max_seq_length(
            self.hp.max_seq_length, self.model_config, self.spec.method, self.resolved.uri
        )
        if length_warning is not None:
            self.hp = self.hp.model_copy(update={"max_seq_length": max_len})
            self.notes.append(length_warning)
        self.tokenizer = load_tokenizer(self.resolved, family)
        columns = self.spec.columns()
        tokenizer = self.tokenizer

        def count_tokens(example: Example) -> int:
            text = (
                " ".join(m["content"] for m in example.fields["messages"])
                if "messages" in example.fields
                else " ".join(str(example.fields[r]) for r in columns if r != "label" and r in example.fields)
            )
            return len(tokenizer(text, add_special_tokens=True)["input_ids"])

        check_length = self.spec.dataset.cleaning.max_tokens is not None
        self.data: PreparedData = prepare_data(
            self.spec, self.sources.fetch_data, count_tokens=count_tokens if check_length else None
        )
        if length_warning is not None:  # printed with the report's lines below, and kept in it
            self.data.report.warnings.append(length_warning)
        self._profile_data()
        # After profiling: the profile and fingerprint describe the user's rows, not variants.
        augment_training_split(self.spec, self.data)
        self.sinks.data_report(self.data.report.to_dict())
        for line in self.data.report.summary_lines():
            self.sinks.message(f"   {line}")

    def _read_promoted_pointer(self) -> PromotedPointer | None:
        """``promoted.json`` under the output (written by the operator, or by hand for local
        runs): the model this run is compared with. ``None`` when nothing is promoted."""
        from pydantic import ValidationError  # noqa: PLC0415

        from tuneloop.storage import NotFoundError  # noqa: PLC0415

        uri = self.ctx.run_uri(Layout.PROMOTED)
        try:
            raw = self.sources.storage(uri).read_bytes(uri)
        except NotFoundError:
            return None
        advice = (
            "the operator writes it when it promotes a run; fix or delete the object (deleting it means nothing is "
            "promoted), or set spec.promotion.pin to a run whose model exists"
        )
        try:
            return PromotedPointer.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'the object'}: {e['msg']}" for e in exc.errors()[:5]
            )
            raise InvalidConfigError(
                f"{uri} is not a valid promoted-model pointer (format tuneloop-promoted/1): {problems}; {advice}"
            ) from None

    def _profile_data(self) -> None:
        """Profile the training split and, when a run is promoted, measure how far the data moved
        since (:mod:`tuneloop_trainer.data.profile`); both go into the validation report."""
        tokenizer = self.tokenizer

        def tokenize(texts: Sequence[str]) -> list[list[int]]:
            return cast("list[list[int]]", tokenizer(list(texts), add_special_tokens=False)["input_ids"])

        self.data_profile = build_profile(
            self.data.train,
            tokenize=tokenize,
            token_name=lambda token: str(tokenizer.convert_ids_to_tokens(int(cast("int", token)))),
            tokenizer=tokenizer_fingerprint(tokenizer.get_vocab()),
            label_names=self.data.label_names,
            run=self.ctx.run,
        )
        pointer = self.promoted_pointer
        if pointer is None:
            return
        profile, why_not = self._read_promoted_profile(pointer.run)
        self.promoted_profile = profile
        if profile is None:
            self.data_drift = DataDrift(pointer.run, None, reason=why_not)
        else:
            self.data_drift = data_drift(self.data_profile, profile, pointer.run)
        report = self.data.report
        report.data_drift = self.data_drift.to_dict()
        report.data_drift_line = self.data_drift.summary_line()

    def _read_promoted_profile(self, run: int) -> tuple[DataProfile | None, str]:
        """The promoted run's data profile, or why there is none (never fatal: drift is a report)."""
        from tuneloop.storage import NotFoundError, StorageError  # noqa: PLC0415

        uri = self.ctx.run_uri(Layout.data_profile(run))
        try:
            raw = self.sources.storage(uri).read_json(uri)
        except NotFoundError:
            return None, f"run {run} has no data profile ({uri}; runs by earlier trainers did not write one)"
        except StorageError as exc:
            return None, f"its data profile could not be read: {exc}"
        try:
            return DataProfile.from_dict(raw), ""
        except ValueError as exc:
            return None, f"its data profile {uri} is not usable: {exc}"

    def _setup_model(self) -> None:
        self.loaded: LoadedModel = load_model(
            self.spec, self.resolved, label_names=self.data.label_names, config=self.model_config
        )
        trainable, total = self.loaded.parameter_counts()
        self.sinks.message(
            f"   model {self.resolved.uri} ({self.loaded.family}, {self.loaded.config.model_type}): "
            f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / max(1, total):.2f} %), "
            f"method {self.spec.method.type}, precision {self.accelerator.mixed_precision}"
        )
        if self.loaded.fresh_weights:  # a damaged or mismatched checkpoint: say it where it is read
            fresh = self.loaded.fresh_weights
            note = (
                f"{self.resolved.uri} lacks {len(fresh)} weight(s) of the pretrained model, which were initialised "
                f"at random: {', '.join(fresh[:5])}{' …' if len(fresh) > 5 else ''}; check the checkpoint "
                "(a renamed or dropped tensor) or that it is the architecture its config names"
            )
            self.sinks.message(f"   WARNING: {note}")
            self.notes.append(note)
        dropout = self.loaded.dropout
        if dropout is not None:  # hyperparameters.dropout: what it set, or that it could set nothing
            self.sinks.message(f"   {dropout.summary()}")
            if dropout.warning is not None:
                self.notes.append(dropout.warning)

    def _report_lengths(self) -> None:
        """Token lengths per split and what maxSeqLength truncated (:mod:`tuneloop_trainer.lengths`):
        into the validation report, the log, and a warning when truncation is common."""
        data = self.data
        lengths = measure_lengths(
            {
                "train": (data.train, self.train_features),
                "validation": (data.validation, self.validation_features),
                "test": (data.test, self.test_features),
                "out_of_domain": (data.out_of_domain, self.ood_features),
                "forgetting": (data.forgetting, self.forgetting_features),
            },
            self.spec.task,
            self.tokenizer,
            self.hp.max_seq_length,
            self.spec.columns(),
        )
        data.report.lengths = lengths.to_dict()
        for line in lengths.summary_lines():
            self.sinks.message(f"   {line}")
        for warning in lengths.warnings():
            data.report.warnings.append(warning)
            self.sinks.message(f"   warning: {warning}")

    def _setup_features(self) -> None:
        columns = self.spec.columns()
        max_len = self.hp.max_seq_length
        tok = self.tokenizer

        def feats(examples: Sequence[Example]) -> list[Feature]:
            return build_features(examples, self.spec.task, tok, max_len, columns)

        self.train_features = feats(self.data.train)
        self.validation_features = feats(self.data.validation)
        self.test_features = feats(self.data.test)
        self.ood_features = feats(self.data.out_of_domain)
        self.forgetting_features = feats(self.data.forgetting)
        self._report_lengths()
        if not self.train_features:
            from tuneloop_trainer.errors import InvalidDataError  # noqa: PLC0415

            raise InvalidDataError("no training examples after cleaning and splitting")
        self.before_training = self._before_training()
        # Packing needs position ids to reach the attention; virtual-token methods prepend
        # tokens and shift positions, so they train on padded batches instead.
        self.packing = self.spec.packing() and self.spec.method.type not in ("prefix-tuning", "prompt-tuning")
        if self.spec.packing() and not self.packing:
            self.notes.append(f"packing is off: {self.spec.method.type} prepends virtual tokens")
        # dataset.replay: each epoch's own draw, after the user's rows (data/replay.py).
        self.epoch_rows = EpochRows(len(self.train_features), self.data.replay, self.hp.epochs)
        n_user = len(self.train_features)
        self.train_features += [
            replace(f, index=n_user + k) for k, f in enumerate(feats(self.epoch_rows.replay_examples()))
        ]
        if self.spec.privacy is not None:
            self.privacy = DifferentialPrivacy(
                self.spec.privacy,
                train_rows=len(self.train_features),
                batch_size=self.hp.batch_size,
                mixed_precision=self.accelerator.mixed_precision,
            )
        self.batches_per_epoch = len(self._train_batches(0))
        world = self.accelerator.num_processes
        per_rank = self.batches_per_epoch // world if world > 1 else self.batches_per_epoch
        self.steps_per_epoch = max(1, math.ceil(per_rank / self.hp.gradient_accumulation_steps))
        self.total_steps = self.steps_per_epoch * self.hp.epochs
        if self.hp.max_steps is not None:
            self.total_steps = min(self.total_steps, self.hp.max_steps)

    def _before_training(self) -> BeforeTraining:
        """Baselines and label-error detection (:mod:`tuneloop_trainer.baselines`), on the base
        model before any step; ``dataset.labelIssues: drop`` leaves the flagged rows out of training."""
        model = self.loaded.model
        if not getattr(model, "is_loaded_in_4bit", False):  # bitsandbytes placed it already
            model.to(self.device)
        evaluated = (self.data.test, self.test_features, "test")
        if not self.test_features:
            evaluated = (self.data.validation, self.validation_features, "validation")

        def evaluate_base(features: Sequence[Feature], examples: Sequence[Example]) -> dict[str, float]:
            base = EvalTarget(model, self.tokenizer, self.model_config, Method(type="full"))
            with untouched(model) as plain:
                base.model = plain
                return self.evaluate(features, examples, final=True, target=base).metrics

        found = run_before_training(
            self.spec,
            model=model,
            train=(self.data.train, self.train_features),
            evaluated=evaluated,
            label_names=self.data.label_names,
            pad_id=int(self.tokenizer.pad_token_id),
            device=self.device,
            batch_size=self.hp.batch_size * 2,
            autocast=self.accelerator.autocast,
            evaluate_base=evaluate_base,
        )
        if self.accelerator.num_processes > 1:
            # Each process ran the stage on the same rows; devices may still differ in the last
            # bits and flag different rows, and every process must train on the same ones.
            box: list[Any] = [found]
            broadcast_object_list(box, from_process=0)
            found = box[0]
        lines = found.baselines.lines() if found.baselines is not None else []
        if found.label_issues is not None:
            self.data.report.label_issues = found.label_issues.to_dict()
            self.data.report.label_issues_line = found.label_issues.summary_line()
            lines.append(self.data.report.label_issues_line)
        if found.keep is not None:
            self.data.train = [self.data.train[i] for i in found.keep]
            self.train_features = [replace(self.train_features[i], index=j) for j, i in enumerate(found.keep)]
            self.data.report.sizes["train"] = len(self.data.train)
        for line in lines:
            self.sinks.message(f"   {line}")
        return found

    def _setup_optimizer(self) -> None:
        model = self.loaded.model
        lr = self.spec.learning_rate()
        groups = parameter_groups(model, lr, self.hp.weight_decay, self.spec.method.layerwise_lr_decay)
        for line in describe_groups(groups):
            log.info("param group %s", line)
        self.param_groups_summary = describe_groups(groups)
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr)
        warmup = round(self.hp.warmup_ratio * self.total_steps)
        scheduler = get_scheduler(
            self.hp.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps
        )
        if self.privacy is not None:  # per-example gradient hooks and the DP optimizer (clipping, noise)
            optimizer = self.privacy.attach(model, optimizer, self.total_steps)
        # Unfreezing starts after the optimizer (every block's parameters are in a group) and
        # after DDP is built (every block is all-reduced once unfrozen): optim.prepare_for_training.
        self.model, self.optimizer, self.scheduler, self.unfreezer = prepare_for_training(
            self.accelerator,
            model,
            optimizer,
            scheduler,
            unfreezing=self._unfreezing(),
            steps_per_epoch=self.steps_per_epoch,
        )
        self.class_weights = (
            torch.tensor(self.data.class_weights, dtype=torch.float32, device=self.device)
            if self.data.class_weights
            else None
        )
        if self.privacy is not None:
            self.privacy.check_per_sample_gradients(lambda rows: self._forward_loss_sum(*self._collate_train(rows)[:2]))
        es = self.spec.early_stopping
        self.selection_metric = es.metric if es else "eval_loss"
        mode = (es.mode if es and es.mode else None) or metric_direction(self.selection_metric)
        self.stopper = EarlyStopper(
            metric=self.selection_metric,
            mode=mode,
            patience=es.patience if es else 10**9,
            min_delta=es.min_delta if es else 0.0,
        )
        if self.forgetting_features:
            self.base_forgetting_perplexity = self._forgetting_perplexity(base=True)
            self.sinks.message(
                f"   base model perplexity on general-domain data: {self.base_forgetting_perplexity:.3f}"
            )
        self._setup_checkpoints(mode)
        self._resume()

    # --- checkpoints ------------------------------------------------------------------

    def _setup_checkpoints(self, mode: Literal["min", "max"]) -> None:
        storage = self.sources.storage(self.ctx.output_uri)
        self.checkpoints = CheckpointManager(
            storage,
            self.ctx.run_uri(Layout.checkpoints(self.ctx.run)),
            self.ctx.work_dir / "checkpoints",
            keep=self.spec.output.checkpoint.keep,
            best_metric_mode=mode,
            identity=self.ctx.checkpoint_identity(),
            spec_hashes=spec_hashes(self.spec),
        )
        self.resume_epoch, self.resume_offset = 0, 0
        self.last_checkpoint_time = time.monotonic()
        self.last_selection_value: float | None = None
        self._pending_checkpoint: tuple[int, str] | None = None

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        full = self.spec.method.type == "full"
        tensors = {n: p.detach() for n, p in model.named_parameters() if full or p.requires_grad}
        # The best weights so far travel too: a resumed run must still end on the best state.
        if self.best_state is not None:
            tensors.update({f"best::{n}": t for n, t in self.best_state.items()})
        return tensors

    def save_checkpoint(self, epoch: int, next_batch: int, *, blocking: bool = False) -> None:
        """Snapshot locally (the only stall), upload in the background."""
        self._report_completed_checkpoint()  # save() waits for the previous upload first
        state = CheckpointState(
            tensors=self._checkpoint_tensors(),
            objects={
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": capture_rng(),
                # fp16 loss scaling state (bf16 and fp32 have none)
                **({"scaler": self.accelerator.scaler.state_dict()} if self.accelerator.scaler is not None else {}),
            },
            meta={
                "step": self.step,
                "epoch": epoch,
                "nextBatch": next_batch,
                "stopper": self.stopper.state_dict(),
                "unfreezingStage": self.unfreezer.stage if self.unfreezer is not None else None,
                "history": self.history.to_dict(),
                "bestStep": getattr(self, "best_step", None),
                "bestValidation": getattr(self, "best_validation", {}),
                "metrics": getattr(self, "last_validation", {}),
            },
        )
        if self.accelerator.is_main_process:
            self.checkpoints.save(self.step, state, metric=self.last_selection_value, blocking=blocking)
            self._pending_checkpoint = (self.step, self.checkpoints.step_uri(self.step))
            if blocking:
                self._report_completed_checkpoint()
        self.last_checkpoint_time = time.monotonic()

    def _report_completed_checkpoint(self) -> None:
        if self._pending_checkpoint is None:
            return
        self.checkpoints.wait()
        step, uri = self._pending_checkpoint
        self._pending_checkpoint = None
        cm = self.checkpoints
        self.sinks.checkpoint(step, uri, cm.last_save_seconds or 0.0, cm.last_upload_seconds, cm.last_bytes or 0)

    def _checkpoint_due(self) -> bool:
        policy = self.spec.output.checkpoint
        if self.stop_requested:
            return True
        if policy.every_steps and self.step % policy.every_steps == 0:
            return True
        return bool(policy.every_minutes and time.monotonic() - self.last_checkpoint_time >= 60 * policy.every_minutes)

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint of this run, if there is one."""
        loaded = self.checkpoints.load()
        if loaded is None:
            self._explain_foreign_checkpoints()
            return
        info, state = loaded
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, tensor in state.tensors.items():
                if name.startswith("best::"):
                    continue
                params[name].copy_(tensor.to(params[name].device))
        best = {n.removeprefix("best::"): t for n, t in state.tensors.items() if n.startswith("best::")}
        self.best_state = best or None
        self.optimizer.load_state_dict(state.objects["optimizer"])
        self.scheduler.load_state_dict(state.objects["scheduler"])
        restore_rng(state.objects["rng"])
        if self.accelerator.scaler is not None and "scaler" in state.objects:
            self.accelerator.scaler.load_state_dict(state.objects["scaler"])
        meta = state.meta
        self.step = int(meta["step"])
        self.resume_epoch, self.resume_offset = int(meta["epoch"]), int(meta["nextBatch"])
        self.stopper.load_state_dict(meta["stopper"])
        if self.unfreezer is not None and meta.get("unfreezingStage") is not None:
            self.unfreezer.apply_stage(int(meta["unfreezingStage"]))
        self.history = TrainingHistory.from_dict(meta["history"])
        if meta.get("bestStep") is not None:
            self.best_step = int(meta["bestStep"])
        if meta.get("bestValidation"):
            self.best_validation = dict(meta["bestValidation"])
        self.sinks.message(f"   resumed from the checkpoint at step {info.step} ({info.uri})")

    def _explain_foreign_checkpoints(self) -> None:
        """Say why checkpoints found under this run's prefix are not resumed."""
        foreign = self.checkpoints.foreign()
        if not foreign:
            return
        mine = self.ctx.checkpoint_identity()
        theirs = foreign[-1].manifest.get("identity")
        if not isinstance(theirs, dict):
            why = "they do not record which job and spec wrote them (an older trainer)"
        else:
            differ = [k for k in ("namespace", "name", "uid", "run", "specHash") if theirs.get(k) != mine.get(k)]
            names = {
                "specHash": "the spec (hyperparameters, data, model...)",
                "uid": "the job's uid (a re-created job)",
            }
            why = "they were written with another " + ", ".join(names.get(k, k) for k in differ)
        steps = ", ".join(str(info.step) for info in foreign[-5:])
        self.sinks.message(
            f"   not resuming the checkpoint(s) at step {steps} under {self.checkpoints.checkpoints_uri}: {why}; "
            "training starts fresh (they are deleted after this run's first checkpoint)"
        )

    # --- batching -------------------------------------------------------------------

    def _train_batches(self, epoch: int) -> list[list[int]] | list[list[list[int]]]:
        if self.privacy is not None:  # DP-SGD's guarantee assumes Poisson-sampled batches
            return self.privacy.batches()
        rows = self.epoch_rows.rows(epoch)  # the user's rows and this epoch's replay draw
        lengths = [self.train_features[i].length for i in rows]
        if self.packing:
            packed = packed_batches(lengths, self.hp.max_seq_length, self.hp.batch_size, self.hp.seed, epoch)
            return [[[rows[i] for i in seq] for seq in batch] for batch in packed]
        return [
            [rows[i] for i in batch]
            for batch in length_grouped_batches(lengths, self.hp.batch_size, self.hp.seed, epoch)
        ]

    def _global_mean_divisor(self, units: int, world: int) -> float:
        """What this process divides its summed loss by so that the step's gradient is the
        mean over the units (rows, label tokens) of the whole global batch. DDP averages the
        processes' gradients: dividing each by its own units would weigh a rank's short batch
        (or few label tokens) as much as a full one. With N processes each divides by
        (all units) / N: one scalar all-reduce per step."""
        if world <= 1:
            return float(units)
        total = self.accelerator.reduce(torch.tensor(float(units), device=self.device), reduction="sum")
        return max(1.0, float(total)) / world

    def _rank_batches(self, epoch: int, rank: int, world: int) -> list[Any]:
        """This process's share of an epoch. Every rank gets the same number of batches
        (the remainder is dropped; the next epoch's shuffle drops others): a rank with one
        step more would wait forever in the gradient all-reduce."""
        batches = self._train_batches(epoch)
        if world > 1:
            batches = batches[: len(batches) // world * world]
        return batches[rank::world]

    def _collate_train(self, batch: Any) -> tuple[dict[str, torch.Tensor], int, int]:
        """(tensors, units the loss averages over, non-padding tokens)."""
        pad = int(self.tokenizer.pad_token_id)
        if self.packing:
            tensors = collate_packed(self.train_features, batch, pad)
            tokens = sum(self.train_features[i].length for row in batch for i in row)
        else:
            feats = [self.train_features[i] for i in batch]
            tensors = collate_padded(feats, pad, self.spec.task)
            tokens = sum(f.length for f in feats)
        return tensors, self._units(tensors), tokens

    def _units(self, tensors: dict[str, torch.Tensor]) -> int:
        labels = tensors["labels"]
        if self.spec.task == "sequence-classification":
            return int(labels.shape[0])
        if self.spec.task == "causal-lm":
            return int((labels[:, 1:] != IGNORE_INDEX).sum())
        return int((labels != IGNORE_INDEX).sum())

    # --- loss -----------------------------------------------------------------------

    def _forward_loss_sum(self, tensors: dict[str, torch.Tensor], units: int) -> torch.Tensor:
        """Summed loss of a micro-batch (so micro-batches of different sizes weigh right)."""
        batch = {k: v.to(self.device) for k, v in tensors.items()}
        if self.spec.task == "sequence-classification":
            labels = batch.pop("labels")
            logits = self.model(**batch).logits
            return F.cross_entropy(logits.float(), labels, weight=self.class_weights, reduction="sum")
        if "position_ids" in batch:
            batch["use_cache"] = False  # type: ignore[assignment]
        out = self.model(**batch)
        # transformers averages over the micro-batch's label tokens; times their count is the sum.
        return out.loss.float() * units

    # --- training ---------------------------------------------------------------------

    def train(self) -> None:
        if self.stop_requested:
            # Asked to stop before the first step: nothing new to checkpoint; the next attempt
            # resumes from wherever the last complete checkpoint is.
            raise Interrupted(f"stopped on request before training (at step {self.step})")
        self.sinks.phase("training")
        acc = self.accelerator
        model = self.model
        throughput = Throughput()
        rank, world = acc.process_index, acc.num_processes
        accum = self.hp.gradient_accumulation_steps
        params = [p for p in model.parameters() if p.requires_grad]
        eval_every = self.spec.evaluation.every_steps
        # Fault-injection knob for preemption tests: slows every step down (seconds).
        step_delay = float(os.environ.get("TUNELOOP_FAULT_STEP_DELAY", "0") or 0)
        start_time = time.monotonic()
        for epoch in range(self.resume_epoch, self.hp.epochs):
            batches = self._rank_batches(epoch, rank, world)
            first = self.resume_offset if epoch == self.resume_epoch else 0
            for start in range(first, len(batches), accum):
                if self.step >= self.total_steps:
                    break
                if self.unfreezer is not None and self.unfreezer.on_step(self.step):
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
                self.step += 1
                if step_delay:
                    time.sleep(step_delay)
                seconds = time.monotonic() - t0
                tokens = sum(t for _, _, t in group)
                tps = throughput.add(tokens, seconds)
                remaining = (self.total_steps - self.step) * throughput.seconds_per_step()
                report = StepReport(
                    step=self.step,
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
                self.history.append_train(
                    step=report.step,
                    epoch=report.epoch,
                    loss=report.loss,
                    learning_rate=report.learning_rate,
                    grad_norm=report.grad_norm,
                    tokens_per_second=tps,
                )
                self.sinks.step(report)
                end_of_epoch = start + accum >= len(batches)
                due = (eval_every and self.step % eval_every == 0) or (not eval_every and end_of_epoch)
                stop = (due or self.step >= self.total_steps) and self._validate_and_maybe_stop(report.epoch)
                if self._checkpoint_due() and not stop and self.step < self.total_steps:
                    at = (epoch + 1, 0) if end_of_epoch else (epoch, start + accum)
                    self.save_checkpoint(*at, blocking=self.stop_requested)
                    if self.stop_requested:
                        # A stop that arrived while this save waited for the previous upload
                        # started it in the background: finish it before saying it is saved.
                        self._report_completed_checkpoint()
                        raise Interrupted(f"stopped at step {self.step} on request; checkpoint saved")
                if stop:
                    self.stopped_early = True
                    self.sinks.message(
                        f"   early stopping at step {self.step}: no {self.selection_metric} improvement in "
                        f"{self.stopper.patience} evaluations "
                        f"(best {self.stopper.best:.4g} at step {self.stopper.best_step})"
                    )
                    break
            if self.stopped_early or self.step >= self.total_steps:
                break
        self.train_seconds = time.monotonic() - start_time
        self._report_completed_checkpoint()
        if self.accelerator.is_main_process:
            self._remove_incomplete_checkpoints()

    def _remove_incomplete_checkpoints(self) -> None:
        """Training is over: what killed attempts left half-uploaded can never be resumed."""
        from tuneloop.storage import StorageError  # noqa: PLC0415

        try:
            removed = self.checkpoints.remove_incomplete()
        except (StorageError, OSError) as exc:
            # Leftovers cost storage, not correctness: say so and carry on.
            log.warning("removing incomplete checkpoints failed: %s", exc)
            return
        if removed:
            steps = ", ".join(str(s) for s in removed)
            self.sinks.message(f"   removed incomplete checkpoint(s) at step {steps} left by an interrupted attempt")

    def _validate_and_maybe_stop(self, epoch: float) -> bool:
        if not self.validation_features:
            self._snapshot_best()  # nothing to select on: the last state is the result
            return False
        out = self.evaluate(self.validation_features, self.data.validation, final=False)
        metrics = out.metrics
        self.history.append_eval(step=self.step, epoch=epoch, **metrics)
        self.sinks.evaluation(self.step, "validation", metrics)
        self.last_validation = dict(metrics)
        value = metrics.get(self.selection_metric)
        if value is None or not math.isfinite(value):
            return False
        self.last_selection_value = value
        best_before = self.stopper.best_step
        stop = self.stopper.update(value, step=self.step)
        if self.stopper.best_step != best_before:
            self._snapshot_best()
            self.best_validation = dict(metrics)
        return stop

    def _snapshot_best(self) -> None:
        """Keep the best weights on the CPU: all of them for full fine-tuning (unfreezing
        changes which are trainable), only the trained ones for PEFT methods."""
        model = self.accelerator.unwrap_model(self.model)
        full = self.spec.method.type == "full"
        self.best_state = {
            name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if full or p.requires_grad
        }
        self.best_step = self.step

    def _restore_best(self) -> None:
        if self.best_state is None:
            return
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.best_state:
                    p.copy_(self.best_state[name].to(p.device))

    # --- evaluation -------------------------------------------------------------------

    def _wants_generation(self, final: bool) -> bool:
        if self.spec.task == "sequence-classification":
            return False
        families = set(self.spec.metric_families()) & GENERATION_METRICS
        if not families:
            return False
        return final or any(self.selection_metric in METRIC_OUTPUTS[f] for f in families)

    def _candidate(self) -> EvalTarget:
        return EvalTarget(self.model, self.tokenizer, self.model_config, self.spec.method)

    @torch.no_grad()
    def evaluate(
        self,
        features: Sequence[Feature],
        examples: Sequence[Example],
        *,
        final: bool,
        target: EvalTarget | None = None,
    ) -> EvalOutput:
        """Loss-based metrics for every task, classification metrics, perplexity, and
        generated-text metrics when asked for; of the candidate, or of ``target`` (the promoted
        model, through the very same code)."""
        target = target or self._candidate()
        model = target.model
        model.eval()
        pad = int(target.tokenizer.pad_token_id)
        n = len(features)
        losses = [0.0] * n
        units = [0] * n
        predictions: list[Any] = [None] * n
        for batch_idx in eval_batches([f.length for f in features], self.hp.batch_size * 2):
            feats = [features[i] for i in batch_idx]
            tensors = {k: v.to(self.device) for k, v in collate_padded(feats, pad, self.spec.task).items()}
            with self.accelerator.autocast():
                if self.spec.task == "sequence-classification":
                    labels = tensors.pop("labels")
                    logits = model(**tensors).logits.float()
                    if target.label_index is not None:
                        logits = _in_run_classes(logits, target.label_index.to(logits.device))
                    per = F.cross_entropy(logits, labels, reduction="none")
                    for j, i in enumerate(batch_idx):
                        losses[i] = float(per[j])
                        units[i] = 1
                        predictions[i] = int(logits[j].argmax())
                    continue
                logits = model(**tensors).logits.float()
            labels = tensors["labels"]
            if self.spec.task == "causal-lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            if logits.shape[1] != labels.shape[1]:  # virtual tokens prepended by prompt/prefix tuning
                logits = logits[:, -labels.shape[1] :]
            per_tok = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(labels.shape)
            mask = labels != IGNORE_INDEX
            for j, i in enumerate(batch_idx):
                losses[i] = float(per_tok[j][mask[j]].sum())
                units[i] = int(mask[j].sum())
        total_units = max(1, sum(units))
        eval_loss = sum(losses) / total_units
        metrics: dict[str, float] = {"eval_loss": eval_loss}
        out = EvalOutput(metrics, losses, units)
        families = self.spec.metric_families()
        if self.spec.task == "sequence-classification":
            refs = [int(f.labels) for f in features]  # type: ignore[arg-type]
            cls = classification_metrics(predictions, refs, self.data.label_names or [])
            metrics.update({k: float(cls[k]) for k in ("accuracy", "f1", "precision", "recall") if k in families})
            out.predictions, out.references = predictions, refs
            out.extra["classification"] = cls
        if "perplexity" in families:
            metrics["perplexity"] = perplexity(sum(losses), total_units)
        if self._wants_generation(final):
            limit = None if final else MAX_GENERATION_EXAMPLES_DURING_TRAINING
            texts, references = self._generate(features, limit, target)
            out.predictions, out.references = list(texts), list(references)
            metrics.update(generation_metrics(texts, references, [f for f in families if f in GENERATION_METRICS]))
        return out

    def _prompt_and_reference(self, feature: Feature) -> tuple[list[int], list[int]]:
        labels = feature.labels
        assert isinstance(labels, list)
        if self.spec.task == "seq2seq":
            return feature.input_ids, [t for t in labels if t != IGNORE_INDEX]
        learned = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        if learned and learned[0] > 0:  # prompt/completion or chat: the prompt is what is not learned
            first = learned[0]
            return feature.input_ids[:first], [t for t in labels[first:] if t != IGNORE_INDEX]
        half = max(1, feature.length // 2)  # plain text: continue the first half
        return feature.input_ids[:half], feature.input_ids[half:]

    def _generate(
        self, features: Sequence[Feature], limit: int | None, target: EvalTarget
    ) -> tuple[list[str], list[str]]:
        model = self.accelerator.unwrap_model(target.model)
        tok = target.tokenizer
        pad = int(tok.pad_token_id)
        chosen = list(features)[:limit] if limit else list(features)
        pairs = [self._prompt_and_reference(f) for f in chosen]
        # A decoder's prompt and what it generates share its positions: keep the end of long
        # prompts so that at least some new tokens fit (an index past the position embeddings
        # would crash the evaluation after all the training).
        room = self._decoder_positions(target)
        if room is not None:
            keep = max(1, room - min(MAX_NEW_TOKENS, max(1, room // 4)))
            pairs = [(p[-keep:], r) for p, r in pairs]
        preds: list[str] = []
        # Virtual-token methods break position ids under left padding (peft 0.21 with
        # transformers 5): generate one example at a time, unpadded, for them.
        virtual = target.method.type in ("prefix-tuning", "prompt-tuning")
        batch_size = 1 if virtual else max(1, self.hp.batch_size)
        for start in range(0, len(pairs), batch_size):
            part = pairs[start : start + batch_size]
            width = max(len(p) for p, _ in part)
            max_new = min(MAX_NEW_TOKENS, max(len(r) for _, r in part) + 8)
            if room is not None:
                max_new = max(1, min(max_new, room - width))
            if self.spec.task == "seq2seq":  # encoders take right padding
                ids = torch.full((len(part), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, (p, _) in enumerate(part):
                    ids[j, : len(p)] = torch.tensor(p)
                    mask[j, : len(p)] = 1
            else:  # decoders continue from the last token: pad on the left
                ids = torch.full((len(part), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, (p, _) in enumerate(part):
                    ids[j, width - len(p) :] = torch.tensor(p)
                    mask[j, width - len(p) :] = 1
            with self.accelerator.autocast():
                if virtual and self.spec.task == "causal-lm":
                    out = self._greedy_without_cache(model, ids.to(self.device), max_new, tok.eos_token_id)
                else:
                    out = model.generate(
                        input_ids=ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        max_new_tokens=max_new,
                        do_sample=False,
                        num_beams=1,
                        pad_token_id=pad,
                    )
                    if self.spec.task != "seq2seq":
                        out = out[:, width:]
            preds.extend(tok.batch_decode(out, skip_special_tokens=True))
        refs = tok.batch_decode([r for _, r in pairs], skip_special_tokens=True)
        return [p.strip() for p in preds], [r.strip() for r in refs]

    def _decoder_positions(self, target: EvalTarget) -> int | None:
        """How many tokens (prompt and generated) a decoder takes; ``None`` for encoder-decoders
        (the generated text has positions of its own) and models without absolute positions."""
        if self.spec.task != "causal-lm":
            return None
        limit = max_input_tokens(target.config, target.method)
        return limit.tokens if limit is not None and limit.tokens > 1 else None

    @staticmethod
    def _greedy_without_cache(model: Any, ids: torch.Tensor, max_new: int, eos: int | None) -> torch.Tensor:
        """Greedy decoding by full forward passes. For prompt tuning on decoders, where
        ``generate()`` computes position ids past the virtual tokens (peft 0.21 with
        transformers 5); quadratic, but only used on one example at a time."""
        new: list[int] = []
        for _ in range(max_new):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
        return torch.tensor([new], dtype=torch.long)

    def _forgetting_perplexity(self, *, base: bool) -> float:
        model = self.accelerator.unwrap_model(self.model)
        ctx = model.disable_adapter() if base and hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with ctx:
            out = self.evaluate(self.forgetting_features, self.data.forgetting, final=False)
        return perplexity(sum(out.per_example_loss), max(1, sum(out.per_example_units)))

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
        self.sinks.evaluation(self.step, "test", metrics)
        if self.privacy is not None:
            spent = self.privacy.spent(self.step)
            metrics.update(spent.metrics())
            self.sinks.message(f"   {spent.summary_line()}")
        if self.ood_features:
            ood = self.evaluate(self.ood_features, self.data.out_of_domain, final=True)
            metrics.update({f"ood_{k}": v for k, v in ood.metrics.items()})
            self.sinks.evaluation(self.step, "out-of-domain", ood.metrics)
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
            validation_metrics=getattr(self, "best_validation", {}),
            gates=gates,
            forgetting=forgetting,
            fairness=fairness,
            model_uri=model_uri,
            card_uri=card_uri,
            steps=self.step,
            best_step=getattr(self, "best_step", None),
            data_fingerprint=self.data.fingerprint,
            stopped_early=self.stopped_early,
            promoted=promoted,
            data_drift=self.data_drift,
        )

    def _fairness(self, test: EvalOutput, examples: Sequence[Example]) -> FairnessResult | None:
        settings = self.spec.evaluation.fairness
        if settings is None or not examples:
            return None
        groups = [e.group for e in examples]
        metric = settings.metric
        compute: Callable[[list[int]], float]
        if metric in ("accuracy", "f1", "precision", "recall"):

            def compute(idx: list[int]) -> float:
                sub = classification_metrics(
                    [test.predictions[i] for i in idx], [test.references[i] for i in idx], self.data.label_names or []
                )
                return float(sub[metric])
        elif metric in ("eval_loss", "perplexity"):

            def compute(idx: list[int]) -> float:
                loss = sum(test.per_example_loss[i] for i in idx) / max(1, sum(test.per_example_units[i] for i in idx))
                return perplexity(loss * 1.0, 1) if metric == "perplexity" else loss
        else:
            family = next(f for f, outs in METRIC_OUTPUTS.items() if metric in outs)

            def compute(idx: list[int]) -> float:
                got = generation_metrics(
                    [test.predictions[i] for i in idx], [test.references[i] for i in idx], [family]
                )
                return float(got[metric])

        return fairness_check(metric, groups, compute, settings.max_gap)

    # --- the promoted model -------------------------------------------------------------

    def _evaluate_promoted(self, pointer: PromotedPointer, test_examples: Sequence[Example]) -> PromotedEvaluation:
        """The promoted model on this run's test split (and out-of-domain set), through
        :meth:`evaluate` like the candidate. A model that cannot be loaded is reported, not
        raised: the gates that need it fail, the others are judged as usual."""
        where = f"run {pointer.run}, {pointer.model_uri}"
        self.sinks.message(
            f"   evaluating the promoted model ({where}) on this run's test split ({len(test_examples):,} rows)"
            + (f" and out-of-domain set ({len(self.data.out_of_domain):,} rows)" if self.data.out_of_domain else "")
        )
        self._release_candidate()
        try:
            trained = self._load_promoted(pointer)
        except _PromotedUnavailable as exc:
            self.sinks.message(f"   the promoted model ({where}) could not be evaluated: {exc}")
            return PromotedEvaluation(pointer.run, pointer.model_uri, {}, error=str(exc))
        try:
            metrics = self._measure_promoted(trained, test_examples)
        finally:  # the last reference to it: freed here, not when the run ends
            del trained
            _free_memory()
        return PromotedEvaluation(pointer.run, pointer.model_uri, metrics)

    def _measure_promoted(self, trained: TrainedModel, test_examples: Sequence[Example]) -> dict[str, float]:
        target = self._promoted_target(trained)
        features = self._promoted_features(trained, test_examples)
        metrics = dict(self.evaluate(features, test_examples, final=True, target=target).metrics)
        self.sinks.evaluation(self.step, "promoted", metrics)
        if self.data.out_of_domain:
            ood_features = self._promoted_features(trained, self.data.out_of_domain)
            ood = self.evaluate(ood_features, self.data.out_of_domain, final=True, target=target).metrics
            metrics.update({f"ood_{k}": v for k, v in ood.items()})
            self.sinks.evaluation(self.step, "promoted-out-of-domain", ood)
        return metrics

    def _release_candidate(self) -> None:
        """Drop the candidate model and the optimizer state (its weights are on disk by now)."""
        self.accelerator.free_memory()
        for name in ("model", "optimizer", "scheduler", "unfreezer", "loaded"):
            if hasattr(self, name):
                delattr(self, name)
        self.best_state = None
        _free_memory()

    def _load_promoted(self, pointer: PromotedPointer) -> TrainedModel:
        """Bring the promoted model to local disk and load it for this job's task; raises
        :class:`_PromotedUnavailable` saying why it cannot be (a transient storage error is
        raised as it is: the run is retried)."""
        from tuneloop.storage import NotFoundError, StorageError  # noqa: PLC0415
        from tuneloop_trainer.errors import PERMANENT_STORAGE_CODES  # noqa: PLC0415

        uri = pointer.model_uri
        try:
            directory = self._fetch_promoted(uri)
            base = self.resolved
            if pointer.base_model_uri and pointer.base_model_uri != self.spec.model.uri:
                try:
                    source = ModelSource(uri=pointer.base_model_uri)
                except ValueError:
                    raise _PromotedUnavailable(
                        f"its baseModelUri {pointer.base_model_uri[:200]!r} is not a model URI (hf://, s3://, file://)"
                    ) from None
                base = resolve_model(source, self.sources.download_model, self.sources.cache_dir)
            names = self.promoted_profile.label_names if self.promoted_profile is not None else None
            trained = load_trained_model(self.spec, directory, uri, base, names or self.data.label_names)
        except NotFoundError:
            raise _PromotedUnavailable("it no longer exists") from None
        except StorageError as exc:
            if exc.code in PERMANENT_STORAGE_CODES:
                raise _PromotedUnavailable(str(exc)) from None
            raise
        except UnsupportedModelError as exc:
            raise _PromotedUnavailable(exc.message) from None
        except torch.cuda.OutOfMemoryError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # what loaders raise for files they cannot use
            raise _PromotedUnavailable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from None
        if not getattr(trained.model, "is_loaded_in_4bit", False):  # bitsandbytes placed it already
            trained.model.to(self.device)
        return trained

    def _fetch_promoted(self, uri: str) -> Path:
        """The promoted model's directory on local disk."""
        import hashlib  # noqa: PLC0415

        scheme = uri.split("://", 1)[0]
        if scheme == "file":
            path = Path(uri.removeprefix("file://"))
            if not path.is_dir():
                raise _PromotedUnavailable(f"it no longer exists ({path} is not a directory)")
            return path
        if scheme != "s3":
            raise _PromotedUnavailable("its URI is not s3:// or file://, which this trainer reads models from")
        if not self.sources.storage(uri).list(uri):
            raise _PromotedUnavailable("it no longer exists (nothing is stored under it)")
        dest = self.sources.cache_dir / "promoted" / hashlib.sha256(uri.encode()).hexdigest()[:24]
        return self.sources.download_model(uri, dest)

    def _promoted_target(self, trained: TrainedModel) -> EvalTarget:
        index = None
        current = self.data.label_names
        if current is not None and trained.label_names is not None and trained.label_names != current:
            outputs = {name: i for i, name in enumerate(trained.label_names)}
            index = torch.tensor([outputs.get(name, -1) for name in current], dtype=torch.long)
            missing = [n for n in current if n not in outputs]
            self.sinks.message(
                f"   the promoted model was trained on the classes {', '.join(trained.label_names)}"
                + (f"; it cannot predict {', '.join(missing)}" if missing else "")
            )
        return EvalTarget(trained.model, trained.tokenizer, trained.config, trained.method, index)

    def _promoted_features(self, trained: TrainedModel, examples: Sequence[Example]) -> list[Feature]:
        """The examples as the promoted model reads them: its own tokenizer, and no more tokens
        than it takes."""
        max_len = self.hp.max_seq_length
        limit = max_input_tokens(trained.config, trained.method)
        if limit is not None and 1 <= limit.tokens < max_len:
            max_len = limit.tokens
        return build_features(examples, self.spec.task, trained.tokenizer, max_len, self.spec.columns())

    # --- outputs ------------------------------------------------------------------------

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
                "stepsTrained": self.step,
                "bestStep": getattr(self, "best_step", None),
                "stoppedEarly": self.stopped_early,
                "parameterGroups": self.param_groups_summary,
            },
            metrics=metrics,
            validation_metrics=getattr(self, "best_validation", {}),
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
            privacy=self.privacy.spent(self.step).to_dict() if self.privacy is not None else None,
        )
        write_model_card(card, local)
        plot_curves(self.history, report_dir)
        if analysis is not None:
            analysis.write(report_dir)
        (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (report_dir / "validation-report.json").write_text(json.dumps(self.data.report.to_dict(), indent=2))
        (report_dir / "history.json").write_text(json.dumps(self.history.to_dict()))
        if self.data_profile is not None:
            (report_dir / Path(Layout.data_profile(run)).name).write_text(
                json.dumps(self.data_profile.to_dict(), ensure_ascii=False)
            )
        if self.accelerator.is_main_process:
            storage = self.sources.storage(self.ctx.output_uri)
            storage.upload_dir(model_dir, model_uri)
            storage.upload_dir(report_dir, self.ctx.run_uri(Layout.report(run)) + "/")
            storage.upload_file(local / "model-card.md", self.ctx.run_uri(Layout.model_card(run)))
            storage.upload_file(local / "model-card.json", self.ctx.run_uri(Layout.model_card_json(run)))
        return model_uri, self.ctx.run_uri(Layout.model_card(run))

    # --- all together -------------------------------------------------------------------

    def run(self) -> RunResult:
        try:
            self.setup()
            self.train()
            return self.finish()
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        checkpoints = getattr(self, "checkpoints", None)
        if checkpoints is not None:
            try:
                checkpoints.close()
            except Exception:  # a failed upload must not hide the error that ended the run
                log.exception("checkpoint upload failed while shutting down")
        self.sinks.close()


class Interrupted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; the run is to be resumed."""


class _PromotedUnavailable(Exception):
    """The promoted model cannot be evaluated; the message says why, for the gates' messages."""


def _in_run_classes(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A classifier's logits rearranged into this run's class order (``index``: the output for
    each class, -1 for a class it does not have, which gets probability 0)."""
    picked = logits[:, index.clamp(min=0)]
    return picked.masked_fill(index < 0, float("-inf"))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
