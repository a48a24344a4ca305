"""Discriminative learning rates and gradual unfreezing do what they promise."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from tuneloop.api.spec import Unfreezing
from tuneloop_trainer.optim import GradualUnfreezer, block_lists, layer_map, parameter_groups

pytestmark = pytest.mark.unit


@pytest.fixture
def bert(tiny_model_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("bert"))


def lr_of(groups, name: str) -> float:
    return next(g["lr"] for g in groups if name in g["names"])


def test_blocks_are_found_bottom_up(bert, tiny_model_dir) -> None:
    assert [name for name, _ in block_lists(bert)] == ["bert.encoder.layer"]
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_dir("t5"))
    assert [name for name, _ in block_lists(t5)] == ["encoder.block", "decoder.block"]
    assert layer_map(t5).num_layers == 4


def test_layerwise_decay_assigns_learning_rates(bert) -> None:
    groups = parameter_groups(bert, lr=1e-3, weight_decay=0.01, layerwise_decay=0.5)
    names = [n for n, _ in bert.named_parameters()]
    emb = next(n for n in names if "word_embeddings" in n)
    low = next(n for n in names if "encoder.layer.0." in n and n.endswith("weight") and "LayerNorm" not in n)
    high = next(n for n in names if "encoder.layer.1." in n and n.endswith("weight") and "LayerNorm" not in n)
    head = next(n for n in names if n.startswith("classifier") and n.endswith("weight"))
    # L = 2 blocks: head depth 3 gets lr, block 2 lr*0.5, block 1 lr*0.25, embeddings lr*0.125
    assert lr_of(groups, head) == pytest.approx(1e-3)
    assert lr_of(groups, high) == pytest.approx(5e-4)
    assert lr_of(groups, low) == pytest.approx(2.5e-4)
    assert lr_of(groups, emb) == pytest.approx(1.25e-4)


def test_no_weight_decay_on_biases_and_norms(bert) -> None:
    groups = parameter_groups(bert, lr=1e-3, weight_decay=0.1, layerwise_decay=None)
    for g in groups:
        for n in g["names"]:
            if n.endswith("bias") or "LayerNorm" in n:
                assert g["weight_decay"] == 0.0, n
    assert sum(len(g["params"]) for g in groups) == len(list(bert.parameters()))


def test_gradual_unfreezing_really_freezes(bert) -> None:
    groups = parameter_groups(bert, lr=1e-2, weight_decay=0.0, layerwise_decay=None)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    unfreezer = GradualUnfreezer(bert, Unfreezing(start_layers=1, layers_per_stage=1, every_steps=1), 10)
    frozen = set(unfreezer.frozen_names())
    assert any("encoder.layer.0." in n for n in frozen)
    assert any("embeddings" in n for n in frozen)
    assert not any("encoder.layer.1." in n or n.startswith("classifier") for n in frozen)
    before = {n: p.detach().clone() for n, p in bert.named_parameters()}
    batch = {"input_ids": torch.tensor([[2, 10, 11, 3]]), "labels": torch.tensor([1])}
    bert.train()
    bert(**batch).loss.backward()
    optimizer.step()
    for n, p in bert.named_parameters():
        if n in frozen:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert not torch.equal(dict(bert.named_parameters())["classifier.weight"], before["classifier.weight"])
    # stage 1: the second block thaws; stage 2: embeddings too
    assert unfreezer.on_step(1)
    assert not any("encoder.layer.0." in n for n in unfreezer.frozen_names())
    assert any("embeddings" in n for n in unfreezer.frozen_names())
    unfreezer.on_step(2)
    assert unfreezer.frozen_names() == []
