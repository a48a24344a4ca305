"""Batching: length grouping cuts padding; packing never lets examples see each other."""

from __future__ import annotations

import random

import pytest
import torch

from tuneloop_trainer.batching import (
    collate_packed,
    collate_padded,
    length_grouped_batches,
    pack_rows,
    packed_batches,
)
from tuneloop_trainer.features import IGNORE_INDEX, Feature

pytestmark = pytest.mark.unit


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded


def test_length_grouping_covers_every_example_once_and_cuts_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(5000)]
    grouped = length_grouped_batches(lengths, 32, seed=1, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(5000))
    shuffled = list(range(5000))
    rng.shuffle(shuffled)
    plain = [shuffled[i : i + 32] for i in range(0, 5000, 32)]
    assert padding_fraction(grouped, lengths) < 0.1
    assert padding_fraction(plain, lengths) > 0.3


def test_batch_order_is_a_function_of_seed_and_epoch() -> None:
    lengths = list(range(1, 300))
    assert length_grouped_batches(lengths, 8, 3, 1) == length_grouped_batches(lengths, 8, 3, 1)
    assert length_grouped_batches(lengths, 8, 3, 1) != length_grouped_batches(lengths, 8, 3, 2)


def test_packing_places_every_example_whole() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(5, 100) for _ in range(400)]
    rows = pack_rows(lengths, 128)
    assert sorted(i for r in rows for i in r.members) == list(range(400))
    assert all(r.length <= 128 for r in rows)
    assert sum(lengths) / (len(rows) * 128) > 0.9  # rows are nearly full


def test_packed_batches_hold_about_batch_size_examples() -> None:
    lengths = [20] * 640
    batches = packed_batches(lengths, 200, batch_size=32, seed=0, epoch=0)
    sizes = [sum(len(row) for row in b) for b in batches]
    assert all(abs(s - 32) <= 10 for s in sizes[:-1])


def test_packed_collation_restarts_positions_and_masks_boundaries() -> None:
    feats = [Feature([1, 2, 3], [1, 2, 3]), Feature([4, 5], [IGNORE_INDEX, 5]), Feature([6, 7, 8, 9], [6, 7, 8, 9])]
    batch = collate_packed(feats, [[0, 1], [2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5], [IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX]]
    assert "attention_mask" not in batch


def test_padded_collation() -> None:
    feats = [Feature([1, 2, 3], 1), Feature([4], 0)]
    batch = collate_padded(feats, pad_id=9, task="sequence-classification")
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir) -> None:
    """The logits of an example inside a packed row equal its logits alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2")).eval()
    a, b = [5, 17, 33, 8, 91], [44, 2, 7]
    feats = [Feature(a, list(a)), Feature(b, list(b))]
    packed = collate_packed(feats, [[0, 1]], pad_id=0)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone_b = model(input_ids=torch.tensor([b]), use_cache=False).logits
        alone_a = model(input_ids=torch.tensor([a]), use_cache=False).logits
    torch.testing.assert_close(together[0, len(a) :], alone_b[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[0, : len(a)], alone_a[0], rtol=1e-4, atol=1e-5)
