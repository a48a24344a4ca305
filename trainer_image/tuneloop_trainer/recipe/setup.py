"""The setup steps: data, tokenizer, model, features and optimizer, in the order ``setup()`` runs
them (:class:`~tuneloop_trainer.recipe.fine_tune.FineTuneRecipe`).

Data comes first (cheap, and most failures are there), then the model; each step creates the
attributes that :class:`~tuneloop_trainer.recipe.base.RecipeBase` declares for it.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from transformers import get_scheduler

from tuneloop.api.methods import traits
from tuneloop.api.spec import Method, Unfreezing
from tuneloop_trainer.augment import augment_training_split
from tuneloop_trainer.baselines import BeforeTraining, run_before_training, untouched
from tuneloop_trainer.data import Example, prepare_data
from tuneloop_trainer.data.profile import DataDrift, build_profile, data_drift, tokenizer_fingerprint
from tuneloop_trainer.data.replay import EpochRows
from tuneloop_trainer.features import Feature, build_features
from tuneloop_trainer.lengths import measure_lengths
from tuneloop_trainer.models import (
    check_fits_task,
    fit_max_seq_length,
    load_config,
    load_model,
    load_tokenizer,
    mixed_precision,
)
from tuneloop_trainer.optim import ddp_kwargs_handlers, describe_groups, parameter_groups, prepare_for_training
from tuneloop_trainer.privacy import DifferentialPrivacy
from tuneloop_trainer.recipe.batches import BatchSteps
from tuneloop_trainer.recipe.evaluate import EvalTarget
from tuneloop_trainer.recipe.promoted import PromotedSteps

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SetupSteps(PromotedSteps, BatchSteps):
    """Everything ``setup()`` builds before the first step."""

    def _setup_accelerator(self) -> None:
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

    def _unfreezing(self) -> Unfreezing | None:
        """``method.unfreezing`` when it applies (full fine-tuning), else ``None``."""
        return self.spec.method.unfreezing if traits(self.spec.method.type).unfreezing else None

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
        self.data = prepare_data(
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

    def _setup_model(self) -> None:
        self.loaded = load_model(self.spec, self.resolved, label_names=self.data.label_names, config=self.model_config)
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
        self.packing = self.spec.packing() and not traits(self.spec.method.type).virtual_tokens
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
        batches_per_epoch = len(self._train_batches(0))
        world = self.accelerator.num_processes
        per_rank = batches_per_epoch // world if world > 1 else batches_per_epoch
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
        self.state.unfreezing_stage = self.unfreezer.stage if self.unfreezer is not None else None
        self.class_weights = (
            torch.tensor(self.data.class_weights, dtype=torch.float32, device=self.device)
            if self.data.class_weights
            else None
        )
        if self.privacy is not None:
            self.privacy.check_per_sample_gradients(lambda rows: self._forward_loss_sum(*self._collate_train(rows)[:2]))

    def _measure_base_forgetting(self) -> None:
        """The base model's perplexity on the general-domain data (``evaluation.forgetting``),
        before any step: what the tuned model's is compared with."""
        if not self.forgetting_features:
            return
        self.base_forgetting_perplexity = self._forgetting_perplexity(base=True)
        self.sinks.message(f"   base model perplexity on general-domain data: {self.base_forgetting_perplexity:.3f}")
