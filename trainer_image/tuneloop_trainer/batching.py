"""Batches that waste no compute on padding.

* Classification and seq2seq: *length-grouped* batches. Examples are shuffled, cut into
  mega-chunks of ``50 × batch_size``, sorted by length inside each chunk and batched, then
  the batch order is shuffled. Batches hold examples of similar length, so padding to
  the longest in the batch costs little, while the order stays random enough for SGD.
* Causal LM: *packing*. Examples are placed whole into rows of ``max_seq_length`` tokens
  (first-fit decreasing), with position ids restarting at 0 for each example and no
  attention mask: transformers then builds a block-diagonal causal mask from the position
  ids, so no token attends across an example boundary. The first token of each example
  gets label -100, so no example is trained to predict the next one's start.

Every order is a pure function of (seed, epoch), so a resumed run replays the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tuneloop_trainer.features import IGNORE_INDEX, Feature

MEGA_CHUNK = 50


def epoch_rng(seed: int, epoch: int) -> random.Random:
    return random.Random(seed * 1_000_003 + epoch)  # noqa: S311 - data order, not security


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches of similar-length examples, in a seeded random order."""
    rng = epoch_rng(seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    chunk = batch_size * MEGA_CHUNK
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    rng.shuffle(batches)
    return batches


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches grouped by length (order does not matter for metrics)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class PackedRow:
    """Examples placed whole into one row."""

    members: list[int]
    length: int


def pack_rows(lengths: Sequence[int], row_length: int) -> list[PackedRow]:
    """First-fit-decreasing bin packing of examples into rows of at most ``row_length`` tokens.

    Examples are never split: an example cut in two would be trained without its context.
    """
    rows: list[PackedRow] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = min(lengths[i], row_length)
        for row in rows:
            if row.length + size <= row_length:
                row.members.append(i)
                row.length += size
                break
        else:
            rows.append(PackedRow([i], size))
    return rows


def packed_batches(
    lengths: Sequence[int], row_length: int, batch_size: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """Batches of packed rows, in a seeded random order.

    Rows per batch are chosen so a batch holds about ``batch_size`` examples, as an
    unpacked batch would: packing then changes the speed, not the optimisation.
    """
    rows = pack_rows(lengths, row_length)
    rng = epoch_rng(seed, epoch)
    rng.shuffle(rows)
    mean_members = max(1.0, len(lengths) / max(1, len(rows)))
    rows_per_batch = max(1, round(batch_size / mean_members))
    return [[r.members for r in rows[i : i + rows_per_batch]] for i in range(0, len(rows), rows_per_batch)]


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate_padded(features: Sequence[Feature], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest member (dynamic padding)."""
    input_ids = _pad([f.input_ids for f in features], pad_id)
    attention = _pad([[1] * f.length for f in features], 0)
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if task == "sequence-classification":
        batch["labels"] = torch.tensor([int(f.labels) for f in features], dtype=torch.long)  # type: ignore[arg-type]
    else:
        batch["labels"] = _pad([f.labels for f in features], IGNORE_INDEX)  # type: ignore[misc]
    return batch


def collate_packed(features: Sequence[Feature], rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; position ids restart per example; no attention mask."""
    width = max(sum(features[i].length for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            f = features[i]
            ids = f.input_ids
            lab = list(f.labels)  # type: ignore[arg-type]
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids)
            lab[0] = IGNORE_INDEX  # never learn to predict an example's start from the previous one
            labels[r, at : at + n] = torch.tensor(lab)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        if at < width:  # the tail is its own segment: positions restart, nothing learned
            positions[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
