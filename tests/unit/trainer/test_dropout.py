"""``hyperparameters.dropout`` reaches every dropout layer of BERT, DistilBERT, GPT-2 and T5
through their configs, and a model with nothing to set says so."""

from __future__ import annotations

from typing import Any

import pytest
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    PretrainedConfig,
    T5Config,
)

from tuneloop_trainer.dropout import apply_dropout

pytestmark = pytest.mark.unit

TINY: dict[str, tuple[Any, Any, dict[str, list[str]]]] = {
    "bert": (
        BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16),
        AutoModelForSequenceClassification,
        {
            "attention": ["attention_probs_dropout_prob"],
            "hidden": ["hidden_dropout_prob"],
            "classifier": ["classifier_dropout"],
        },
    ),
    "distilbert": (
        DistilBertConfig(vocab_size=40, dim=8, n_layers=1, n_heads=2, hidden_dim=16),
        AutoModelForSequenceClassification,
        {
            "attention": ["attention_dropout"],
            "hidden": ["dropout"],
            "classifier": ["qa_dropout", "seq_classif_dropout"],
        },
    ),
    "gpt2": (
        GPT2Config(vocab_size=40, n_embd=8, n_layer=1, n_head=2, n_positions=16),
        AutoModelForCausalLM,
        {"attention": ["attn_pdrop"], "hidden": ["embd_pdrop", "resid_pdrop"], "classifier": ["summary_first_dropout"]},
    ),
    "t5": (
        T5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2),
        AutoModelForSeq2SeqLM,
        {"hidden": ["dropout_rate"], "classifier": ["classifier_dropout"]},
    ),
}


def dropout_probabilities(model: nn.Module) -> set[float]:
    """Every nn.Dropout's p, and the attention dropout the attention modules pass to SDPA."""
    found = {float(m.p) for m in model.modules() if isinstance(m, nn.Dropout)}
    for m in model.modules():
        for name in ("dropout_prob", "attention_dropout", "dropout"):
            value = getattr(m, name, None)
            if isinstance(value, float):
                found.add(value)
    return found


@pytest.mark.parametrize("family", list(TINY))
def test_every_dropout_layer_takes_the_value(family: str) -> None:
    config, auto, expected = TINY[family]
    config = type(config).from_dict(config.to_dict())  # a fresh copy per test
    before = dropout_probabilities(auto.from_config(config))
    assert 0.37 not in before
    setting = apply_dropout(config, 0.37)
    assert setting.changed == expected  # which attributes, in which kind
    assert setting.warning is None
    assert dropout_probabilities(auto.from_config(config)) == {0.37}  # no layer left at its old rate
    summary = setting.summary()
    assert summary.startswith("dropout 0.37 set on")
    assert all(name in summary for names in expected.values() for name in names)


def test_distilberts_classifier_head_is_reached() -> None:
    """The defect: seq_classif_dropout (the head's own rate) was not in a fixed list."""
    config = DistilBertConfig(vocab_size=40, dim=8, n_layers=1, n_heads=2, hidden_dim=16, num_labels=3)
    apply_dropout(config, 0.0)
    model = AutoModelForSequenceClassification.from_config(config)
    assert model.dropout.p == 0.0


def test_a_model_without_dropout_is_told() -> None:
    config = PretrainedConfig(layerdrop=0.2, drop_path_rate=0.1, use_dropout=True)
    setting = apply_dropout(config, 0.1)
    assert setting.names == []
    assert setting.warning is not None and "has no effect" in setting.warning
    assert setting.summary() == setting.warning
    assert (config.layerdrop, config.drop_path_rate, config.use_dropout) == (0.2, 0.1, True)  # not dropout: untouched
