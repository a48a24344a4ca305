"""Training batches and the training loss: which rows each process trains on in an epoch,
how they are collated (padded or packed), and the summed loss of a micro-batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tuneloop_trainer.batching import collate_packed, collate_padded, length_grouped_batches, packed_batches
from tuneloop_trainer.features import IGNORE_INDEX
from tuneloop_trainer.recipe.base import RecipeBase


class BatchSteps(RecipeBase):
    """Batching and the loss, for the training loop."""

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
