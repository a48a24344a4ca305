"""What the loss learns: completions and assistant turns only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from tuneloop_trainer.features import IGNORE_INDEX, build_features, chat_segments

pytestmark = pytest.mark.unit


def ex(**fields):
    return SimpleNamespace(fields=fields, group=None)


@pytest.fixture
def gpt2_tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))


def learned_text(tok, feature) -> str:
    return tok.decode([t for t, label in zip(feature.input_ids, feature.labels, strict=True) if label != IGNORE_INDEX])


def test_prompt_tokens_are_not_learned(gpt2_tok) -> None:
    (f,) = build_features(
        [ex(prompt="What is the capital?", completion=" Paris.")],
        "causal-lm",
        gpt2_tok,
        64,
        {"prompt": "prompt", "completion": "completion"},
    )
    assert learned_text(gpt2_tok, f).startswith(" Paris.")
    assert "capital" not in learned_text(gpt2_tok, f)
    assert f.labels[0] == IGNORE_INDEX


def test_only_assistant_turns_are_learned(gpt2_tok) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "good morning"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "very well"},
    ]
    (f,) = build_features([ex(messages=messages)], "causal-lm", gpt2_tok, 256, {"messages": "messages"})
    learned = learned_text(gpt2_tok, f)
    assert "good morning" in learned and "very well" in learned
    assert "hello there" not in learned and "how are you" not in learned and "brief" not in learned
    segments = chat_segments(gpt2_tok, messages)
    assert "".join(t for t, _ in segments) == gpt2_tok.apply_chat_template(messages, tokenize=False)


def test_plain_text_is_all_learned(gpt2_tok) -> None:
    (f,) = build_features([ex(text="the cat sat")], "causal-lm", gpt2_tok, 64, {"text": "text"})
    assert f.labels == f.input_ids
    assert f.input_ids[-1] == gpt2_tok.eos_token_id


def test_truncation_keeps_the_answer(gpt2_tok) -> None:
    long_prompt = "word " * 200
    (f,) = build_features(
        [ex(prompt=long_prompt, completion=" the answer")],
        "causal-lm",
        gpt2_tok,
        32,
        {"prompt": "prompt", "completion": "completion"},
    )
    assert f.length <= 32
    assert "answer" in learned_text(gpt2_tok, f)


def test_classification_and_seq2seq(tiny_model_dir) -> None:
    bert = AutoTokenizer.from_pretrained(tiny_model_dir("bert"))
    (c,) = build_features([ex(text="a fine day", label=1)], "sequence-classification", bert, 16, {})
    assert c.labels == 1 and c.input_ids[0] == bert.cls_token_id
    t5 = AutoTokenizer.from_pretrained(tiny_model_dir("t5"))
    (s,) = build_features([ex(source="long text here", target="short")], "seq2seq", t5, 16, {})
    assert t5.decode(s.labels, skip_special_tokens=True).strip() == "short"
