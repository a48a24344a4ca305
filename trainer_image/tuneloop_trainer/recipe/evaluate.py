"""Evaluation: the candidate (or the promoted model, through the same code) on a split.

Loss-based metrics for every task, classification metrics, perplexity and generated-text
metrics (ROUGE, BLEU); the general-domain perplexity that measures forgetting; fairness across
groups of the test split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tuneloop.api.methods import traits
from tuneloop.api.spec import GENERATION_METRICS, METRIC_OUTPUTS, Method
from tuneloop_trainer.batching import collate_padded, eval_batches
from tuneloop_trainer.data import Example
from tuneloop_trainer.evaluation import (
    FairnessResult,
    classification_metrics,
    fairness_check,
    generation_metrics,
    perplexity,
)
from tuneloop_trainer.features import IGNORE_INDEX, Feature
from tuneloop_trainer.models import max_input_tokens
from tuneloop_trainer.recipe.base import RecipeBase

#: Generated metrics (ROUGE, BLEU) need one generate() call per example; during training
#: validation they are computed on at most this many examples.
MAX_GENERATION_EXAMPLES_DURING_TRAINING = 128
MAX_NEW_TOKENS = 128


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


class EvaluationSteps(RecipeBase):
    """Evaluating the candidate and the promoted model."""

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
        virtual = traits(target.method.type).virtual_tokens
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


def _in_run_classes(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A classifier's logits rearranged into this run's class order (``index``: the output for
    each class, -1 for a class it does not have, which gets probability 0)."""
    picked = logits[:, index.clamp(min=0)]
    return picked.masked_fill(index < 0, float("-inf"))
