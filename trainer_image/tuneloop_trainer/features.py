"""Turn cleaned examples into token ids and loss labels, per task.

What the loss sees matters as much as the model: for prompt/completion pairs and chat
conversations only the completion and the assistant's turns are learned (prompt and user
tokens get the label -100, which the loss ignores), so the model learns to answer rather
than to imitate users.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from tuneloop_trainer.errors import InvalidDataError

if TYPE_CHECKING:
    from tuneloop_trainer.data import Example

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: Used when a decoder's tokenizer ships without a chat template. Plain and explicit, so
#: a model trained with it can be prompted the same way at serving time.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class Feature:
    """One tokenized example."""

    input_ids: list[int]
    labels: list[int] | int
    """Token labels (-100 = not learned), or the class id for classification."""
    group: str | None = None
    index: int = 0
    """Position in the split, to map predictions back to examples."""

    @property
    def length(self) -> int:
        return len(self.input_ids)


def _batch_ids(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int, **kwargs: Any
) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(list(texts), truncation=True, max_length=max_len, **kwargs)
    return [list(ids) for ids in encoded["input_ids"]]


def classification_features(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> list[Feature]:
    ids = _batch_ids(tokenizer, [e.fields["text"] for e in examples], max_len)
    return [
        Feature(input_ids=i, labels=int(e.fields["label"]), group=e.group, index=n)
        for n, (i, e) in enumerate(zip(ids, examples, strict=True))
    ]


def seq2seq_features(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[Feature]:
    sources = _batch_ids(tokenizer, [e.fields["source"] for e in examples], max_len)
    targets = _batch_ids(tokenizer, [e.fields["target"] for e in examples], max_len)
    return [
        Feature(input_ids=s, labels=t, group=e.group, index=n)
        for n, (s, t, e) in enumerate(zip(sources, targets, examples, strict=True))
    ]


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a chat template if it has none; True when the fallback was used."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    log.warning("the tokenizer has no chat template; using Tuneloop's plain <|role|> template")
    return True


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, generation: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return str(text)


def chat_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, learned) pieces.

    Each assistant turn is what the template adds between the conversation up to it
    rendered *with* a generation prompt and rendered *including* the turn, so the role
    header stays unlearned and the answer plus its end-of-turn token is learned.
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation=True) if i else ""
        full = _render(tokenizer, messages[: i + 1], generation=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise InvalidDataError(
                "the tokenizer's chat template does not render conversations incrementally, so assistant "
                "turns cannot be located; use prompt/completion columns instead"
            )
        segments.append((prompt[len(done) :], False))
        segments.append((full[len(prompt) :], True))
        done = full
    rest = _render(tokenizer, messages, generation=False)[len(done) :]
    if rest:
        segments.append((rest, False))
    return [(text, learned) for text, learned in segments if text]


def causal_features(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_len: int, layout: str
) -> list[Feature]:
    """Token ids and labels for causal-lm: ``text``, ``prompt``/``completion`` or ``messages``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    features: list[Feature] = []
    if layout == "text":
        ids_list = _batch_ids(tokenizer, [e.fields["text"] for e in examples], max_len - len(eos))
        for n, (text_ids, e) in enumerate(zip(ids_list, examples, strict=True)):
            full = text_ids + eos
            features.append(Feature(full, list(full), e.group, n))
        return features
    if layout == "prompt":
        prompts = _batch_ids(tokenizer, [e.fields["prompt"] for e in examples], max_len)
        completions = _batch_ids(
            tokenizer, [e.fields["completion"] for e in examples], max_len, add_special_tokens=False
        )
        for n, (prompt_ids, completion_ids, e) in enumerate(zip(prompts, completions, examples, strict=True)):
            answer = completion_ids + eos
            # Keep the end of the prompt (nearest the answer) and as much answer as fits.
            keep_prompt = max(0, min(len(prompt_ids), max_len - min(len(answer), max_len // 2)))
            prompt = prompt_ids[len(prompt_ids) - keep_prompt :]
            answer = answer[: max_len - len(prompt)]
            features.append(Feature(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, e.group, n))
        return features
    ensure_chat_template(tokenizer)
    for n, e in enumerate(examples):
        ids: list[int] = []
        labels: list[int] = []
        for text, learned in chat_segments(tokenizer, e.fields["messages"]):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if learned else [IGNORE_INDEX] * len(piece))
        features.append(Feature(ids[:max_len], labels[:max_len], e.group, n))
    return features


def build_features(
    examples: Sequence[Example], task: str, tokenizer: PreTrainedTokenizerBase, max_len: int, columns: dict[str, str]
) -> list[Feature]:
    """Tokenize a split for a task."""
    if task == "sequence-classification":
        return classification_features(examples, tokenizer, max_len)
    if task == "seq2seq":
        return seq2seq_features(examples, tokenizer, max_len)
    layout = "messages" if "messages" in columns else "prompt" if "prompt" in columns else "text"
    return causal_features(examples, tokenizer, max_len, layout)
