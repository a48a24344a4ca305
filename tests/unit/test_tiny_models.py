"""The tiny-model factory: every family builds fast, reloads offline, trains, and tokenizes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BatchEncoding,
)

from tests.harness.model_fixtures import TinyModelDirFactory
from tests.harness.tiny_models import (
    CORPUS,
    FAMILIES,
    GPT2_IM_END,
    MAX_POSITIONS,
    build_tiny_model,
    build_tiny_tokenizer,
    trained_tokenizer_json,
)

pytestmark = pytest.mark.unit

SAMPLE = "The weather report promised sunshine, but the movie was wonderful."


def test_the_hub_is_offline() -> None:
    # Set by tests/conftest.py before transformers is first imported (it is read only then).
    assert huggingface_hub.constants.HF_HUB_OFFLINE


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_fast_and_writes_a_loadable_directory(family: str, tmp_path: Path) -> None:
    # Warm up: the tokenizer training cache and the one-off transformers/torch imports.
    build_tiny_model(family, tmp_path / "warm-up")  # type: ignore[arg-type]
    start = time.perf_counter()
    directory = build_tiny_model(family, tmp_path / family)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start

    assert elapsed < 2.0, f"building the tiny {family} model took {elapsed:.2f}s"
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    weights = (directory / "model.safetensors").stat().st_size
    assert weights < 2_000_000, f"{family} weights are {weights} bytes; tiny means tiny"


def test_tokenizer_training_is_cached_and_cheap() -> None:
    build_tiny_tokenizer("t5")
    start = time.perf_counter()
    for family in FAMILIES:
        build_tiny_tokenizer(family)
    assert time.perf_counter() - start < 1.0


def test_gpt2_reloads_and_computes_a_causal_lm_loss(tiny_model_dir: TinyModelDirFactory) -> None:
    directory = tiny_model_dir("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)

    assert model.config.model_type == "gpt2"
    assert model.config.n_layer == 2
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.model_max_length == MAX_POSITIONS == model.config.n_positions
    assert len(tokenizer) == model.config.vocab_size

    batch = tokenizer([SAMPLE, "hello there"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()  # gradients flow: the model is trainable as loaded
    assert model.get_input_embeddings().weight.grad is not None

    generated = model.generate(**tokenizer(["the movie"], return_tensors="pt"), max_new_tokens=3)
    assert generated.shape[1] <= 2 + 3 + 1


def test_gpt2_chat_template_renders_messages_and_marks_assistant_tokens(
    tiny_model_dir: TinyModelDirFactory,
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my parcel?"},
        {"role": "assistant", "content": "At the depot."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhere is my parcel?<|im_end|>\n"
        "<|im_start|>assistant\nAt the depot.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt.endswith("<|im_start|>assistant\n")

    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert isinstance(encoded, BatchEncoding)
    ids: list[int] = encoded["input_ids"]
    mask: list[int] = encoded["assistant_masks"]
    assistant = tokenizer.decode([i for i, keep in zip(ids, mask, strict=True) if keep])
    assert assistant == "At the depot." + GPT2_IM_END
    # Chat markers are single special tokens that decoding can skip.
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert isinstance(im_start, int)
    assert ids.count(im_start) == 3
    assert "im_start" not in tokenizer.decode(ids, skip_special_tokens=True)


def test_gpt2_generation_stops_at_end_of_turn(tiny_model_dir: TinyModelDirFactory) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    assert set(model.generation_config.eos_token_id) == {
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids(GPT2_IM_END),
    }


@pytest.mark.parametrize("num_labels", [2, 5])
def test_bert_reloads_as_a_classifier_and_as_the_base_encoder(
    tiny_model_dir: TinyModelDirFactory, num_labels: int
) -> None:
    directory = tiny_model_dir("bert", num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    classifier = AutoModelForSequenceClassification.from_pretrained(directory)
    assert classifier.config.num_labels == num_labels
    assert classifier.config.num_hidden_layers == 2

    batch = tokenizer([SAMPLE, "Dull and loud."], padding=True, return_tensors="pt")
    out = classifier(**batch, labels=torch.tensor([0, num_labels - 1]))
    assert out.logits.shape == (2, num_labels)
    assert torch.isfinite(out.loss)

    encoder = AutoModel.from_pretrained(directory)
    assert type(encoder).__name__ == "BertModel"
    hidden = encoder(**batch).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape
    # The encoder weights are the classifier's, not fresh ones.
    torch.testing.assert_close(
        encoder.embeddings.word_embeddings.weight, classifier.bert.embeddings.word_embeddings.weight
    )


def test_bert_tokenizer_adds_cls_sep_and_pair_segments(tiny_model_dir: TinyModelDirFactory) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("bert"))
    assert (tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token, tokenizer.mask_token) == (
        "[CLS]",
        "[SEP]",
        "[PAD]",
        "[MASK]",
    )
    single = tokenizer("The movie was great")
    tokens = tokenizer.convert_ids_to_tokens(single["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    pair = tokenizer("first part", "second part")
    tokens = tokenizer.convert_ids_to_tokens(pair["input_ids"])
    assert tokens.count("[SEP]") == 2
    assert pair["token_type_ids"][0] == 0 and pair["token_type_ids"][-1] == 1
    # Uncased, accents stripped, round-trips modulo case.
    text = tokenizer.decode(single["input_ids"], skip_special_tokens=True)
    assert text == "the movie was great"


def test_base_only_checkpoint_gets_a_fresh_head(tmp_path: Path) -> None:
    directory = build_tiny_model("bert", tmp_path / "bert-base", base_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=4)
    assert model.classifier.out_features == 4


def test_t5_reloads_and_computes_a_seq2seq_loss(tiny_model_dir: TinyModelDirFactory) -> None:
    directory = tiny_model_dir("t5")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSeq2SeqLM.from_pretrained(directory)
    assert model.config.num_layers == model.config.num_decoder_layers == 2
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.pad_token_id, tokenizer.eos_token_id) == (
        "<pad>",
        "</s>",
        0,
        1,
    )
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id

    batch = tokenizer(
        ["summarize: the team finished the project early", "translate to French: good morning"],
        text_target=["done early", "bonjour"],
        padding=True,
        return_tensors="pt",
    )
    assert batch["labels"][0, -1].item() in (tokenizer.eos_token_id, tokenizer.pad_token_id)
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == tokenizer.pad_token_id, -100)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    generated = model.generate(**tokenizer(["hello"], return_tensors="pt"), max_new_tokens=4)
    assert generated[0, 0].item() == model.config.decoder_start_token_id


UNSEEN_TEXT = (
    "An UNEXPECTEDLY quirky thriller (2024) -- jazz, zebras & XYZ-quotes: 'wow', #1 at 99% [ok]?",
    "Queues of vexed jockeys quizzed the box-office about Wednesday's refunds.",
)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_text(family: str, tiny_model_dir: TinyModelDirFactory) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(family))  # type: ignore[arg-type]
    assert 500 <= len(tokenizer) <= 1000
    for sentence in (*CORPUS[:20], *UNSEEN_TEXT):
        ids: list[int] = tokenizer(sentence)["input_ids"]
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert isinstance(decoded, str)
        if family == "gpt2":
            assert decoded == sentence
            continue
        assert tokenizer.unk_token_id not in ids, tokenizer.convert_ids_to_tokens(ids)
        if family == "t5":
            assert decoded == sentence
        else:
            # Uncased WordPiece: lowercased, and decoding puts spaces around punctuation.
            assert decoded.replace(" ", "") == sentence.lower().replace(" ", "")


def test_gpt2_tokenizer_encodes_any_text_without_unknowns(tiny_model_dir: TinyModelDirFactory) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    text = "Zürich, naïve café — 東京 🙂 tabs\tand\nnewlines"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_same_seed_same_weights_different_seed_different_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    rng_before = torch.random.get_rng_state()
    first = load_file(build_tiny_model("gpt2", tmp_path / "a", seed=7) / "model.safetensors")
    again = load_file(build_tiny_model("gpt2", tmp_path / "b", seed=7) / "model.safetensors")
    other = load_file(build_tiny_model("gpt2", tmp_path / "c", seed=8) / "model.safetensors")
    assert torch.equal(torch.random.get_rng_state(), rng_before), "the global RNG must be left alone"

    assert first.keys() == again.keys()
    for name, tensor in first.items():
        torch.testing.assert_close(tensor, again[name], rtol=0, atol=0)
    assert any(not torch.equal(tensor, other[name]) for name, tensor in first.items())
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()


def test_tokenizers_are_identical_in_every_process() -> None:
    # Pinned losses in trainer tests rely on this; tokenizers' WordPiece and Unigram trainers are
    # not deterministic across processes (hash-map order), which is why BERT and T5 use BPE pieces.
    script = (
        "import hashlib\n"
        "from tests.harness.tiny_models import FAMILIES, trained_tokenizer_json\n"
        "for f in FAMILIES: print(f, hashlib.sha256(trained_tokenizer_json(f).encode()).hexdigest())\n"
    )
    here = {f: hashlib.sha256(trained_tokenizer_json(f).encode()).hexdigest() for f in FAMILIES}
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
        there = dict(line.split() for line in done.stdout.splitlines())
        assert there == here


def test_unknown_family_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model family"):
        build_tiny_model("llama", tmp_path)  # type: ignore[arg-type]
